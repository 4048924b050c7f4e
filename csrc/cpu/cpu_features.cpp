// Instruction-set detection and selection for the CPU kernels.
#include "duogpt/cpu_features.h"

#include <atomic>

#include "duogpt/check.h"
#include "gemv_isa.h"

namespace duogpt {
namespace {

#if defined(DUOGPT_X86_SIMD)
bool has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2") &&
         __builtin_cpu_supports("popcnt");
}
bool has_avx512() {
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vbmi2");
}
#endif

const cpu::GemvKernels* kernels_for(const std::string& name) {
  if (name == "scalar") return &cpu::gemv_kernels_scalar();
#if defined(DUOGPT_X86_SIMD)
  if (name == "avx2" && has_avx2()) return &cpu::gemv_kernels_avx2();
  if (name == "avx512" && has_avx512()) return &cpu::gemv_kernels_avx512();
#endif
  return nullptr;
}

std::atomic<const cpu::GemvKernels*>& selected() {
  static std::atomic<const cpu::GemvKernels*> kernels{kernels_for(supported_cpu_isas().back())};
  return kernels;
}

}  // namespace

std::vector<std::string> supported_cpu_isas() {
  std::vector<std::string> isas{"scalar"};
#if defined(DUOGPT_X86_SIMD)
  if (has_avx2()) isas.push_back("avx2");
  if (has_avx512()) isas.push_back("avx512");
#endif
  return isas;
}

std::string cpu_isa() { return selected().load()->name; }

void set_cpu_isa(const std::string& name) {
  const cpu::GemvKernels* k = kernels_for(name);
  DUOGPT_CHECK(k != nullptr, "instruction set '", name, "' is unknown or not supported by this CPU");
  selected().store(k);
}

std::vector<std::string> cpu_features() {
  std::vector<std::string> found;
#if defined(DUOGPT_X86)
  // __builtin_cpu_supports takes only string literals, hence the macro.
#define DUOGPT_REPORT(name) \
  if (__builtin_cpu_supports(name)) found.emplace_back(name)
  DUOGPT_REPORT("sse4.2");
  DUOGPT_REPORT("popcnt");
  DUOGPT_REPORT("avx");
  DUOGPT_REPORT("avx2");
  DUOGPT_REPORT("fma");
  DUOGPT_REPORT("f16c");
  DUOGPT_REPORT("bmi2");
  DUOGPT_REPORT("avx512f");
  DUOGPT_REPORT("avx512bw");
  DUOGPT_REPORT("avx512vl");
  DUOGPT_REPORT("avx512dq");
  DUOGPT_REPORT("avx512vbmi2");
  DUOGPT_REPORT("avx512bf16");
#undef DUOGPT_REPORT
#endif
  return found;
}

namespace cpu {
const GemvKernels& active_gemv_kernels() { return *selected().load(); }
}  // namespace cpu

}  // namespace duogpt
