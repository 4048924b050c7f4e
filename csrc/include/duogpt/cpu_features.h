/// Run-time choice of the CPU instruction set used by the GEMV kernels.
#pragma once

#include <string>
#include <vector>

namespace duogpt {

/// Instruction sets this CPU can run, best last: a subset of {"scalar", "avx2", "avx512"}.
std::vector<std::string> supported_cpu_isas();

/// Name of the instruction set the kernels use now.
std::string cpu_isa();

/// Use `name` from now on (for tests and benchmarks of each code path); it must be supported.
void set_cpu_isa(const std::string& name);

/// CPU features relevant to the kernels that this CPU reports (e.g. "avx2", "f16c", "avx512f").
std::vector<std::string> cpu_features();

}  // namespace duogpt
