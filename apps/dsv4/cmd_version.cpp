// `dsv4 version`: build information.
#include <cstdio>

#include "command.h"

namespace {
DSV4_COMMAND("version", "Print version and build information", [](CLI::App&) {
  return []() {
#ifdef DSV4_HAVE_CUDA
    const char* cuda = "yes";
#else
    const char* cuda = "no";
#endif
    std::printf("dsv4 0.1.0 (cuda backend: %s)\n", cuda);
    return 0;
  };
});
}  // namespace
