// What the C++ CPU kernels share: the x86 test, the target attributes of their SIMD paths and the
// run-time choice among them (made in qlinear_cpu.cpp, which owns csd::qlinear_cpu_set_isa; every
// kernel follows the same setting, so forcing a path in a test forces it everywhere).
#pragma once

#if (defined(__x86_64__) || defined(__i386__)) && !defined(CSD_NO_X86)
#define CSD_X86 1
#include <immintrin.h>
#else
#define CSD_X86 0  // other CPUs (ARM, ...) build the scalar path only
#endif

#define CSD_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,fma,f16c")))
#define CSD_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
// The BF16 dot products need a compiler that knows them (GCC 10, clang 11); older ones build the
// other paths, and the avx512bf16 level is then reported as unsupported.
#if CSD_X86 && ((defined(__clang__) && __clang_major__ >= 11) || (!defined(__clang__) && __GNUC__ >= 10))
#define CSD_BF16 1
#else
#define CSD_BF16 0
#endif
#define CSD_TARGET_AVX512BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx512bf16,fma,f16c")))

namespace csd_cpu {

enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Vnni = 3, kAvx512Bf16 = 4 };
constexpr int kNumIsas = 5;

// the path in force now: the best this CPU has, or the one csd::qlinear_cpu_set_isa forced
int active_isa();

}  // namespace csd_cpu
