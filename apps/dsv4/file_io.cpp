// See file_io.h.
#include "file_io.h"

#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>

#include "common/error.h"

namespace dsv4::app {

void require_input_file(const std::string& path, const char* what) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) fail("%s '%s': %s", what, path.c_str(), std::strerror(errno));
  // Pipes and /dev/stdin are fine; a directory is not (it would read as an empty file).
  if (S_ISDIR(st.st_mode)) fail("%s '%s': is a directory", what, path.c_str());
}

std::string read_whole_file(const std::string& path, const char* what) {
  require_input_file(path, what);
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("%s '%s': cannot open: %s", what, path.c_str(), std::strerror(errno));
  std::string s((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) fail("%s '%s': read failed", what, path.c_str());
  return s;
}

std::string write_temp(const std::string& path, const std::function<void(std::ostream&)>& write) {
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) fail("%s: is a directory", path.c_str());
  static std::atomic<unsigned> counter{0};
  std::string tmp = strfmt("%s.tmp.%d.%u", path.c_str(), int(::getpid()), counter.fetch_add(1));
  try {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) fail("%s: cannot create '%s': %s", path.c_str(), tmp.c_str(), std::strerror(errno));
    write(f);
    f.flush();
    if (!f) fail("%s: write failed (temporary file '%s')", path.c_str(), tmp.c_str());
    f.close();
    if (!f) fail("%s: close failed (temporary file '%s')", path.c_str(), tmp.c_str());
  } catch (...) {
    std::remove(tmp.c_str());
    throw;
  }
  return tmp;
}

void commit_temp(const std::string& tmp, const std::string& path) {
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    std::remove(tmp.c_str());
    fail("%s: cannot rename '%s' over it: %s", path.c_str(), tmp.c_str(), std::strerror(err));
  }
}

void write_file_atomically(const std::string& path, const std::function<void(std::ostream&)>& write) {
  commit_temp(write_temp(path, write), path);
}

}  // namespace dsv4::app
