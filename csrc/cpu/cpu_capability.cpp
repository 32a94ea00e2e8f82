// Detection and selection of the CPU kernels' instruction set (see cpu_capability.h).
#include "cpu_capability.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <mutex>

namespace etc_ext {
namespace {

bool cpu_supports(CpuCapability capability) {
#if ETC_EXT_X86_DISPATCH
  // __builtin_cpu_supports also checks that the OS saves the wide registers (XCR0).
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  switch (capability) {
    case CpuCapability::kAVX512:
      return avx512;
    case CpuCapability::kAVX2:
      return avx2;
    default:
      return true;
  }
#else
  return capability == CpuCapability::kDefault;
#endif
}

std::string supported_names() {
  std::string names;
  for (const CpuCapability c : supported_cpu_capabilities()) {
    names += names.empty() ? "" : ", ";
    names += cpu_capability_name(c);
  }
  return names;
}

CpuCapability checked(CpuCapability capability, const char* source) {
  TORCH_CHECK_VALUE(cpu_supports(capability), source, " asks for the ", cpu_capability_name(capability),
                    " kernels, but this CPU supports only: ", supported_names());
  return capability;
}

// -1 until the first call reads the environment.
std::atomic<int> current{-1};
std::mutex init_mutex;

}  // namespace

const char* cpu_capability_name(CpuCapability capability) {
  switch (capability) {
    case CpuCapability::kAVX512:
      return "avx512";
    case CpuCapability::kAVX2:
      return "avx2";
    default:
      return "default";
  }
}

std::optional<CpuCapability> parse_cpu_capability(const std::string& name) {
  for (const CpuCapability c : {CpuCapability::kDefault, CpuCapability::kAVX2, CpuCapability::kAVX512}) {
    if (name == cpu_capability_name(c)) return c;
  }
  return std::nullopt;
}

std::vector<CpuCapability> supported_cpu_capabilities() {
  std::vector<CpuCapability> out;
  for (const CpuCapability c : {CpuCapability::kDefault, CpuCapability::kAVX2, CpuCapability::kAVX512}) {
    if (cpu_supports(c)) out.push_back(c);
  }
  return out;
}

CpuCapability best_cpu_capability() { return supported_cpu_capabilities().back(); }

CpuCapability cpu_capability() {
  const int value = current.load(std::memory_order_relaxed);
  if (value >= 0) return static_cast<CpuCapability>(value);
  std::lock_guard<std::mutex> lock(init_mutex);
  if (current.load() < 0) {
    CpuCapability chosen = best_cpu_capability();
    if (const char* env = std::getenv("ETC_EXT_CPU_CAPABILITY"); env != nullptr && *env != '\0') {
      const std::optional<CpuCapability> parsed = parse_cpu_capability(env);
      TORCH_CHECK_VALUE(parsed.has_value(), "ETC_EXT_CPU_CAPABILITY must be one of default, avx2, avx512, got '",
                        env, "'");
      chosen = checked(*parsed, "ETC_EXT_CPU_CAPABILITY");
    }
    current.store(static_cast<int>(chosen));
  }
  return static_cast<CpuCapability>(current.load());
}

void set_cpu_capability(CpuCapability capability) {
  current.store(static_cast<int>(checked(capability, "set_cpu_capability")));
}

}  // namespace etc_ext
