// `dsv4 tokenize [-m FILE] [--chat] [--think none|high|max] (--text STR | --file PATH)`: prints the token ids
// on one line, separated by spaces. Without -m the built-in DeepSeek V4 vocabulary is used. --chat renders
// the text as one user message with the official encoder (no system prompt) and tokenizes the rendered
// prompt.
#include <cstdio>
#include <memory>
#include <string>

#include "command.h"
#include "common/error.h"
#include "dsv4/text.h"
#include "file_io.h"

namespace {

struct TokenizeArgs {
  std::string model, text, file, think = "high";
  bool chat = false, have_text = false;
};

int run_tokenize(const TokenizeArgs& a) {
  dsv4::Tokenizer tok = a.model.empty() ? dsv4::Tokenizer::builtin() : dsv4::Tokenizer::from_gguf(a.model);
  std::string text = a.have_text ? a.text : dsv4::app::read_whole_file(a.file, "--file");
  std::vector<dsv4::Token> ids;
  if (a.chat) {
    dsv4::ChatMessage m;
    m.role = "user";
    m.content = text;
    dsv4::ChatOptions o;
    o.mode = a.think == "none" ? dsv4::ThinkingMode::Chat : dsv4::ThinkingMode::Thinking;
    o.effort = a.think == "max" ? dsv4::ReasoningEffort::Max : dsv4::ReasoningEffort::None;
    ids = tok.encode(dsv4::render_chat(std::span(&m, 1), o));
  } else {
    ids = tok.encode(text);
  }
  std::string line;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i) line += ' ';
    line += std::to_string(ids[i]);
  }
  std::printf("%s\n", line.c_str());
  return 0;
}

DSV4_COMMAND("tokenize", "Print the token ids of a text (optionally rendered as a chat prompt)",
             [](CLI::App& sub) {
               auto a = std::make_shared<TokenizeArgs>();
               sub.add_option("-m,--model", a->model,
                              "GGUF file whose tokenizer to use (default: built-in DeepSeek V4)");
               sub.add_flag("--chat", a->chat,
                            "render as one user message with the official V4 encoder first");
               sub.add_option("--think", a->think, "thinking mode for --chat: none, high (default) or max")
                   ->check(CLI::IsMember({"none", "high", "max"}));
               auto* t = sub.add_option("--text", a->text, "text to tokenize");
               auto* f = sub.add_option("--file", a->file, "file whose bytes to tokenize");
               t->excludes(f);
               f->excludes(t);
               return [a, t, f]() {
                 a->have_text = t->count() > 0;
                 if (!a->have_text && f->count() == 0) dsv4::fail("tokenize: give --text STR or --file PATH");
                 return run_tokenize(*a);
               };
             });

}  // namespace
