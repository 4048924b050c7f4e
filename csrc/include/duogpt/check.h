// Error handling shared by the CPU and CUDA code: every failure becomes a C++ exception that
// pybind11 turns into a Python exception. Nothing here exits or prints.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace duogpt {

// Raised for inconsistent arguments (sizes, dtype codes); pybind11 maps it to ValueError.
struct ArgumentError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

namespace detail {
template <typename... Args>
std::string concat(const char* file, int line, const Args&... args) {
  std::ostringstream os;
  os << file << ":" << line << ": ";
  (os << ... << args);
  return os.str();
}
}  // namespace detail

}  // namespace duogpt

// DUOGPT_CHECK(cond, "message", value, ...): throw duogpt::ArgumentError when cond is false.
// Preconditions survive release builds (no assert).
#define DUOGPT_CHECK(cond, ...)                                                          \
  do {                                                                                   \
    if (!(cond)) {                                                                       \
      throw ::duogpt::ArgumentError(::duogpt::detail::concat(__FILE__, __LINE__, __VA_ARGS__)); \
    }                                                                                    \
  } while (0)
