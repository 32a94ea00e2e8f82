// Runtime choice of the instruction set the CPU kernels run with, like ATen's CPU_CAPABILITY.
//
// Every CPU kernel is compiled three times into the same binary: for the compiler's default
// target (the baseline: SSE2 on x86-64, NEON on AArch64), for AVX2 (x86-64-v3: AVX2, FMA,
// F16C) and for AVX-512 (x86-64-v4: F, BW, DQ, VL). The best one the CPU supports runs; the
// environment variable ETC_EXT_CPU_CAPABILITY=default|avx2|avx512 (or set_cpu_capability)
// picks a lower one, for tests and benchmarks. No -march=native is needed for speed, so a
// binary built on one machine runs at full speed on another.
//
// How a kernel file uses it: the hot loops are a template on an Isa struct below (vector
// width and register count size the register tiles), and one entry per instruction set
// instantiates it under ETC_EXT_TARGET_*:
//
//   template <typename Isa> void scale_rows(float* x, int64_t n);
//   ETC_EXT_TARGET_BASELINE void scale_rows_baseline(float* x, int64_t n) { scale_rows<IsaBaseline>(x, n); }
//   ETC_EXT_TARGET_AVX2 void scale_rows_avx2(float* x, int64_t n) { scale_rows<IsaAvx2>(x, n); }
//   ETC_EXT_TARGET_AVX512 void scale_rows_avx512(float* x, int64_t n) { scale_rows<IsaAvx512>(x, n); }
//   const CpuKernels<void (*)(float*, int64_t)> kScaleRows{scale_rows_baseline, scale_rows_avx2, scale_rows_avx512};
//   ... kScaleRows.pick()(x, n);
//
// `flatten` inlines the whole template into each entry, so it is compiled for that entry's
// target; functions it cannot inline (library calls) keep the baseline code. This is why a
// per-function target and not a per-file -mavx2: inline functions of ATen and the standard
// library instantiated in an AVX2 file could be what the linker keeps for baseline callers.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace etc_ext {

enum class CpuCapability : int { kDefault = 0, kAVX2 = 1, kAVX512 = 2 };

// The instruction set the kernels run with now: ETC_EXT_CPU_CAPABILITY when set (read at
// the first call; an unknown or unsupported value raises), else the best supported one.
CpuCapability cpu_capability();
// The best instruction set this CPU (and its OS) supports.
CpuCapability best_cpu_capability();
// Every capability this CPU supports, lowest first.
std::vector<CpuCapability> supported_cpu_capabilities();
// Makes the kernels run with `capability` from now on; raises if the CPU lacks it.
void set_cpu_capability(CpuCapability capability);
// "default", "avx2", "avx512"; and back (nullopt for an unknown name).
const char* cpu_capability_name(CpuCapability capability);
std::optional<CpuCapability> parse_cpu_capability(const std::string& name);

// One kernel entry per instruction set; pick() is the one cpu_capability() selects.
template <typename Fn>
struct CpuKernels {
  Fn baseline, avx2, avx512;
  Fn pick() const {
    switch (cpu_capability()) {
      case CpuCapability::kAVX512:
        return avx512;
      case CpuCapability::kAVX2:
        return avx2;
      default:
        return baseline;
    }
  }
};

// What a kernel needs to know of an instruction set to size its register tiles: the width of
// one vector register and how many there are.
struct IsaBaseline {
  static constexpr int kVectorBytes = 16;  // SSE2 xmm / NEON q registers
  static constexpr int kRegisters = 16;
};
struct IsaAvx2 {
  static constexpr int kVectorBytes = 32;  // ymm
  static constexpr int kRegisters = 16;
};
struct IsaAvx512 {
  static constexpr int kVectorBytes = 64;  // zmm
  static constexpr int kRegisters = 32;
};

}  // namespace etc_ext

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define ETC_EXT_X86_DISPATCH 1
#define ETC_EXT_TARGET_BASELINE __attribute__((flatten))
#define ETC_EXT_TARGET_AVX2 \
  __attribute__((target("avx2,fma,f16c,bmi,bmi2,lzcnt,movbe,popcnt"), flatten))
#define ETC_EXT_TARGET_AVX512                                                              \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512cd,avx2,fma,f16c,bmi,bmi2," \
                        "lzcnt,movbe,popcnt"),                                             \
                 flatten))
#else
// Other architectures: the AVX2/AVX-512 entries exist (so kernel files need no #if) but are
// plain copies of the baseline; best_cpu_capability() never selects them.
#define ETC_EXT_X86_DISPATCH 0
#define ETC_EXT_TARGET_BASELINE __attribute__((flatten))
#define ETC_EXT_TARGET_AVX2 __attribute__((flatten))
#define ETC_EXT_TARGET_AVX512 __attribute__((flatten))
#endif
