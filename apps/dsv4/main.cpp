// dsv4: one binary, many subcommands (run, serve, bench, convert, tokenize, logits, inspect, ...).
// Errors thrown by the engine (dsv4::Error) are printed as one line and give exit code 1.
#include <algorithm>
#include <cstdio>
#include <exception>
#include <map>

#include "command.h"
#include "common/error.h"

namespace dsv4::app {
std::vector<Command>& command_registry() {
  static std::vector<Command> commands;
  return commands;
}
}  // namespace dsv4::app

int main(int argc, char** argv) {
  using namespace dsv4::app;
  CLI::App app{"dsv4 — DeepSeek V4 Flash inference engine"};
  app.require_subcommand(0, 1);
  std::map<CLI::App*, std::function<int()>> actions;
  CLI::App* run_sub = nullptr;
  for (auto& cmd : command_registry()) {
    CLI::App* sub = app.add_subcommand(cmd.name, cmd.description);
    actions[sub] = cmd.setup(*sub);
    if (cmd.name == "run") run_sub = sub;
  }
  // No subcommand means `run` (as ds4): re-parse with "run" inserted.
  bool first_is_sub = argc > 1 && argv[1][0] != '-';
  bool wants_help = argc > 1 && (std::string(argv[1]) == "-h" || std::string(argv[1]) == "--help");
  std::vector<std::string> args(argv + 1, argv + argc);
  if (run_sub && !first_is_sub && !wants_help) args.insert(args.begin(), "run");
  std::reverse(args.begin(), args.end());  // CLI11 consumes a reversed vector
  try {
    app.parse(args);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    // Same one-line shape as every other error, so scripts can match "dsv4: error:".
    std::fprintf(stderr, "dsv4: error: %s (see dsv4 --help)\n", e.what());
    return e.get_exit_code() != 0 ? e.get_exit_code() : 1;
  }
  try {
    for (auto& [sub, action] : actions)
      if (sub->parsed()) return action();
    std::fputs(app.help().c_str(), stdout);
    return 0;
  } catch (const dsv4::Error& e) {
    std::fprintf(stderr, "dsv4: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dsv4: internal error: %s\n", e.what());
    return 2;
  }
}
