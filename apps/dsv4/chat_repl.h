// Terminal front end of `dsv4 run`: printing a turn (dimmed reasoning, answer, status line) and the
// interactive loop (readline, /commands, Ctrl+C interrupts generation).
#pragma once

#include <atomic>
#include <string>

#include "chat_session.h"

namespace dsv4::app {

struct TermStyle {
  bool color = false;  // ANSI dim for reasoning and status (stdout is a terminal)
};

// Set by SIGINT while a turn is generating; the turn stops at the next token.
std::atomic<bool>& interrupt_flag();
// Installs the SIGINT handler used by run (interrupt generation; at the prompt, clear the line).
void install_sigint_handler();

// Runs one turn and prints it; returns false if it failed (message already printed).
bool print_turn(ChatSession& chat, const std::string& user_text, const TermStyle& style);

// The interactive loop; returns the process exit code.
int run_repl(ChatSession& chat, const TermStyle& style);

}  // namespace dsv4::app
