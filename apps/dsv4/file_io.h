// Whole-file helpers for the dsv4 commands: inputs are checked to be readable regular files (a directory
// "opens" fine with std::ifstream and then reads as empty, which would silently tokenize nothing), and
// outputs are written to a temporary file that is renamed over the target only once complete, so a failed
// write never destroys what was saved there before.
#pragma once

#include <functional>
#include <iosfwd>
#include <string>

namespace dsv4::app {

// Bytes of the file at `path`; throws dsv4::Error naming `what` and the path when it is missing, a
// directory, or unreadable.
std::string read_whole_file(const std::string& path, const char* what);

// Throws dsv4::Error naming `what` and the path unless `path` exists and is not a directory (cheap check
// for inputs too large to read whole).
void require_input_file(const std::string& path, const char* what);

// Calls write(stream) on a temporary file next to `path`, then renames it over `path`. On any failure (the
// callback throws, the stream goes bad, rename fails) the temporary file is removed and `path` is untouched.
void write_file_atomically(const std::string& path, const std::function<void(std::ostream&)>& write);

// Two-phase variant for outputs made of several files: write_temp() leaves a finished temporary file and
// returns its name; commit_temp() renames it over `path`. Call commit only after every temp is written.
std::string write_temp(const std::string& path, const std::function<void(std::ostream&)>& write);
void commit_temp(const std::string& tmp, const std::string& path);

}  // namespace dsv4::app
