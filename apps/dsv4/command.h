// Subcommand registry for the dsv4 binary. Each apps/dsv4/cmd_<name>.cpp defines one subcommand and registers
// it with a static DSV4_COMMAND(...) object, so adding a subcommand never touches main.cpp.
#pragma once

#include <CLI/CLI.hpp>

#include <functional>
#include <string>
#include <vector>

namespace dsv4::app {

// setup() adds options to `sub` and returns the action run when the subcommand is chosen.
// The action returns the process exit code.
struct Command {
  std::string name;
  std::string description;
  std::function<std::function<int()>(CLI::App& sub)> setup;
};

std::vector<Command>& command_registry();

struct CommandRegistrar {
  explicit CommandRegistrar(Command c) { command_registry().push_back(std::move(c)); }
};

}  // namespace dsv4::app

#define DSV4_CONCAT_INNER(a, b) a##b
#define DSV4_CONCAT(a, b) DSV4_CONCAT_INNER(a, b)
#define DSV4_COMMAND(...) \
  static ::dsv4::app::CommandRegistrar DSV4_CONCAT(dsv4_command_, __LINE__)(::dsv4::app::Command{__VA_ARGS__})
