// GgufWriter never clobbers an existing file before finish(): bytes go to a temporary file next to the target
// and are renamed over it at the end. A failed or abandoned write must leave the old file byte-identical and
// no temporary file behind (the project rule "nothing already saved is lost").
#include <gtest/gtest.h>

#include <filesystem>

#include "common/error.h"
#include "gguf/gguf.h"
#include "gguf_test_util.h"

namespace dsv4 {
namespace {

using test::read_bytes;
using test::TempPath;
using test::write_bytes;

// Files in the directory of `path` whose name starts with its file name followed by ".tmp".
int leftover_temps(const std::string& path) {
  std::filesystem::path p(path);
  std::string prefix = p.filename().string() + ".tmp";
  int n = 0;
  for (const auto& e : std::filesystem::directory_iterator(p.parent_path()))
    if (e.path().filename().string().rfind(prefix, 0) == 0) ++n;
  return n;
}

TEST(GgufWriterAtomic, AbandonedWriteKeepsTheOldFile) {
  TempPath out("atomic_abandon");
  const std::vector<uint8_t> good = {'G', 'O', 'O', 'D', 1, 2, 3};
  write_bytes(out, good);
  {
    GgufWriter w(out);
    w.add_u32("k", 1);
    w.add_tensor("a", 0, {4});
    w.begin_data();
    float x[2] = {};
    w.write_tensor_data("a", x, sizeof x);  // half of the tensor, then the writer dies (an exception upstream)
    EXPECT_THROW(w.finish(), Error);
  }
  EXPECT_EQ(read_bytes(out), good);
  EXPECT_EQ(leftover_temps(out), 0);
}

TEST(GgufWriterAtomic, FinishReplacesTheOldFile) {
  TempPath out("atomic_finish");
  write_bytes(out, {'o', 'l', 'd'});
  {
    GgufWriter w(out);
    w.add_u32("k", 7);
    w.begin_data();
    // Before finish() the target still holds the old bytes.
    EXPECT_EQ(read_bytes(out), (std::vector<uint8_t>{'o', 'l', 'd'}));
    w.finish();
  }
  auto f = GgufFile::open(out);
  EXPECT_EQ(f->get_u32("k"), 7u);
  EXPECT_EQ(leftover_temps(out), 0);
}

TEST(GgufWriterAtomic, DirectoryTargetIsRefusedUpFront) {
  std::string dir = std::filesystem::temp_directory_path().string();
  try {
    GgufWriter w(dir);
    FAIL() << "a directory was accepted as the output file";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("is a directory"), std::string::npos) << e.what();
  }
}

TEST(GgufWriterAtomic, UnwritableDirectoryNamesThePath) {
  try {
    GgufWriter w("/nonexistent_dsv4_dir/x.gguf");
    FAIL() << "created a file in a directory that does not exist";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent_dsv4_dir/x.gguf"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace dsv4
