// Runs the dsv4 binary (DSV4_BINARY) and captures its output, for end-to-end CLI tests.
#pragma once

#include <cstdio>
#include <string>

namespace dsv4::test {

struct Ran {
  int status = -1;
  std::string out;
};

// Runs `dsv4 <args>` through the shell; stderr is merged into out when merge_stderr.
inline Ran run_dsv4(const std::string& args, bool merge_stderr = false) {
  std::string cmd = std::string("'") + DSV4_BINARY + "' " + args + (merge_stderr ? " 2>&1" : " 2>/dev/null");
  Ran r;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return r;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) r.out.append(buf, n);
  int st = pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

}  // namespace dsv4::test
