// A CUDA session's logits stay on the device after eval (ForwardOptions::device_logits): Session::argmax reduces
// them there (argmax_usable_cuda) and logits() copies them out on demand. Checked on the tiny synthetic model
// (q2 mix) against a second CUDA session fed the same tokens through Engine::eval_batch, whose forward downloads
// the last row's logits to the host as before: logits bitwise equal (tolerance 0: the same kernels on the same
// inputs, only the destination of the row differs; an all-rows eval would not do, its final head runs the
// prefill GEMM over every row), argmax equal to the host rule over them, through prefill, greedy decode (graphs
// recorded and replayed), clone and save/restore.
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <sstream>
#include <string>
#include <vector>

#include "backend/cuda/cuda_backend.h"
#include "common/argmax.h"
#include "convert/synth.h"
#include "dsv4/engine.h"
#include "ops_common.h"

namespace dsv4 {
namespace {

TEST(CudaSession, ArgmaxAndLazyLogitsEqualTheHostPath) {
  if (!cuda_backend_available()) GTEST_SKIP() << "no CUDA device present";
  const std::string path = (std::filesystem::temp_directory_path() /
                            ("dsv4-session-" + std::to_string(::getpid()) + ".gguf")).string();
  SynthOptions so;
  so.shape = "tiny", so.mix = Mix::Q2, so.out_path = path;
  synth_model(so);
  {
    EngineOptions eo;
    eo.model_path = path;
    eo.backend = BackendKind::Cuda;
    auto e = Engine::load(eo);
    const size_t V = size_t(e->info().n_vocab);
    auto s = e->new_session(256), ref = e->new_session(256);
    EXPECT_THROW(s->argmax(), Error);
    std::vector<Token> prompt;
    for (int i = 0; i < 40; ++i) prompt.push_back(Token((i * 7919 + 13) % int(V)));
    auto ref_eval = [&](std::span<const Token> toks) {  // the host-logits path (eval_batch of one session)
      Session* const one[1] = {ref.get()};
      const std::span<const Token> slices[1] = {toks};
      e->eval_batch(one, slices);
      return std::vector<float>(ref->logits().begin(), ref->logits().end());
    };
    s->eval(prompt);
    std::vector<float> last = ref_eval(prompt);
    auto same = [&](const Session& a, const char* what) {
      const Token t = a.argmax();
      EXPECT_EQ(t, Token(argmax_usable(last.data(), int64_t(V)))) << what;
      const auto lg = a.logits();
      ASSERT_EQ(lg.size(), V) << what;
      EXPECT_EQ(std::memcmp(lg.data(), last.data(), V * sizeof(float)), 0) << what;
      EXPECT_EQ(a.argmax(), t) << what << " (host copy)";
    };
    same(*s, "prefill");
    for (int i = 0; i < 24; ++i) {  // greedy decode: graphs are recorded and replayed on both sessions
      const Token next = s->argmax();
      s->eval(std::span<const Token>(&next, 1));
      last = ref_eval(std::span<const Token>(&next, 1));
      if (i % 6 == 5) same(*s, "decode");
    }
    const Token t = s->argmax();
    auto c = s->clone();
    EXPECT_EQ(c->argmax(), t);
    std::stringstream ss;
    s->save(ss);
    auto r = e->new_session(256);
    r->restore(ss);
    EXPECT_EQ(r->argmax(), t);
    same(*s, "after clone and save");
  }
  std::remove(path.c_str());
}

}  // namespace
}  // namespace dsv4
