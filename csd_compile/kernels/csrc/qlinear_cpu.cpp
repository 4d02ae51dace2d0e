// CPU kernel of csd::qlinear: y = x @ W_b^T for a nested quantized weight at a runtime bit-width.
//
// Weight layout (csd_compile/quant/nested.py): qdata uint8 [2, N, K/2], plane 0 the high nibbles of
// the 8-bit codes, plane 1 the low ones, both in the same layout (ours, the same on every CPU): rows in
// blocks of 64; inside a block, for every input feature k, 32 bytes where byte j holds row j (low
// nibble) and row j + 32 (high nibble). Rows past the last full block: for every k, (N % 64) / 2
// bytes, byte i holding rows 2i (low) and 2i + 1 (high).
//
// The b-bit code is c = q8 >> (8 - b) and decodes to w = c * S + Z with, per (row, group),
// S = m * scale and Z = zero + (m - 1) / 2 * scale, m = 2^(8 - b). So per group
//     sum_k x[k] * w[k] = S * sum_k x[k] * c[k] + Z * sum_k x[k]
// and the inner loop multiplies activations by raw integer codes, in float (exact: codes are small
// integers), rows in vector lanes: for every k it expands the codes of a row block into float lanes
// once and feeds every activation row of the pass (up to four, eight with AVX-512, held in
// registers), then applies S and Z once per group. A verify pass thus reads the weight from memory
// once and decodes each tile once per pass; past 24 rows (16 with int8 activations or on the scalar
// path, 64 on the bf16 dot-product path: kMaxBlockedRows below) the whole weight is dequantized
// once for a GEMM.
//
// Instruction sets. The extension is compiled for baseline x86-64 (no -march=native: one build runs
// on any CPU) and the inner loops exist three times, chosen at run time with __builtin_cpu_supports
// (a fourth level, avx512vnni, runs the avx512 float loops and the VNNI int8 ones, below; a fifth,
// avx512bf16, adds bf16 dot products for bf16 activations, Bf16Avx512 below, and is avx512vnni for
// other activations):
//   avx512  (AVX-512F/BW/VL + FMA): bytes -> 32-bit lanes with vpmovzxbd; 2/3/4-bit codes become
//           floats by a 16-entry table lookup (vpermps reads only the low 4 bits of each lane, so
//           one lookup decodes a nibble without masking), 8-bit codes are merged with one
//           ternary-logic op and converted. 64 rows x 4 activation rows or 32 x 8: 16 accumulators.
//   avx2    (AVX2 + FMA, e.g. AMD Zen 3): the same in 8-lane registers; with 16 registers the 64
//           rows are walked in 8-row chunks, as many per pass as the accumulators allow.
//   scalar  plain loops (the compiler vectorizes them for the baseline target); the only path on
//           other CPUs (ARM, ...), where the x86 code is left out (as with -DCSD_NO_X86).
// Scales and zeros come packed (nested.pack_scale_zero, what QLinear passes on CPU: per 64-row block,
// per group, the block's 64 scales then its 64 zeros, so that a unit of work reads them as one
// sequential stream beside its codes), or as [N, G] tensors, column-major as nested.py stores them (a
// block's 64 values of a group are one vector load, and the next block's are prefetched) or row-major
// (gathered; they stay in L1 from one group to the next). Packed against column-major, the embedded
// model's decode step took 0.81x the time at 4 bits with bf16 activations (AMD Zen 4), 0.87x at 8
// bits with fp32 activations, 0.83x on the AVX2 path forced there (README, fixed-cost section).
// Column-major, a unit's scales and zeros are 256-byte runs N floats apart, one per group; why that
// costs so much (DRAM pages, the prefetchers' stream tables) was not isolated. Packed, the hand
// prefetch of the next block's scales (kept for the other layouts) only got in the way of the
// hardware prefetchers. On the float paths the code stream is prefetched ahead by hand: at
// M = 1 the product is a stream of the weight bytes, and without the prefetches a cold weight ran at
// half the speed of a cached one (the bf16 dot-product path prefetches 2-4-bit codes a line at a
// time instead, and leaves 8-bit ones to the hardware: Bf16Avx512).
// Work is split over threads in units of (64-row block, range of groups); K is split only when there
// are few blocks (N = 192 is 3 of them), and those partial sums are added at the end.
// csd::qlinear_cpu_multi_native runs several weights on one x (a layer's q/k/v, gate/up) as one such
// loop: x converted once, every weight's units in one parallel loop, each weight at its own bits.
// csd::qlinear_cpu_set_isa forces a path (tests, benchmarks); csd::qlinear_cpu_isa names the active
// one, csd::qlinear_cpu_supported_isas those this CPU can run.
// Activations: float by default (the loops above); csd::qlinear_cpu_set_activations("int8") switches
// the blocked path to int8-quantized activations and byte-dot products (see "int8-activation paths").

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include "cpu_isa.h"
#include <torch/extension.h>  // pybind11 and its at::Tensor casters: the direct entry at the end
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

namespace csd_cpu {
namespace {

constexpr int64_t kBlock = 64;
// Past this many activation rows, dequantizing once and calling a dense GEMM is faster: the int8
// paths' limit (their buffers are sized by it) and the scalar path's, the SIMD float paths' and the
// bf16 dot products' (half a float FMA's cost per product). AMD Zen 4, 1536x576, 4 bits, 2 threads,
// blocked against dequantize + GEMM in alternate calls: avx512vnni 17 rows 0.25 against 0.32 ms,
// 24 rows 0.34 / 0.38, 32 rows 0.46 / 0.40 (avx2 breaks even near 24); avx512bf16 64 rows 0.57 /
// 0.63, 96 rows 0.78 / 0.72.
constexpr int64_t kMaxBlockedRows = 16;
constexpr int64_t kMaxFloatRows = 24;
constexpr int64_t kMaxBf16Rows = 64;
// below this much work (weights x rows) a fork/join costs more than it saves
constexpr int64_t kMinParallelWork = 1 << 15;
// how far ahead of the inner loop the code bytes are prefetched
constexpr int64_t kCodesAhead = 2048;

// ---------------------------------------------------------------------------------------------
// Run-time choice of the instruction set.

const char* const kIsaNames[] = {"scalar", "avx2", "avx512", "avx512vnni", "avx512bf16"};

bool cpu_supports(int isa) {
#if CSD_X86
  __builtin_cpu_init();  // cheap; needed if anything runs this before libgcc's constructor
  switch (isa) {
    case kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case kAvx512Vnni: return cpu_supports(kAvx512) && __builtin_cpu_supports("avx512vnni");
    case kAvx512Bf16:
#if CSD_BF16
      return cpu_supports(kAvx512Vnni) && __builtin_cpu_supports("avx512vbmi") &&
             __builtin_cpu_supports("avx512bf16");
#else
      return false;  // this compiler cannot build the path
#endif
    case kAvx2:  // F16C: the fp16 scales' conversions (every AVX2 CPU has it)
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    default: return true;
  }
#else
  return isa == kScalar;
#endif
}

int best_isa() {
  static const int best = cpu_supports(kAvx512Bf16) ? kAvx512Bf16
                          : cpu_supports(kAvx512Vnni) ? kAvx512Vnni
                          : cpu_supports(kAvx512)   ? kAvx512
                          : cpu_supports(kAvx2)     ? kAvx2
                                                    : kScalar;
  return best;
}

std::atomic<int> g_forced_isa{-1};  // -1: the best the CPU has
std::atomic<bool> g_int8_act{false};  // true: activations quantized to int8 per 32 features

}  // namespace

int active_isa() {
  const int f = g_forced_isa.load(std::memory_order_relaxed);
  return f < 0 ? best_isa() : f;
}

namespace {

// ---------------------------------------------------------------------------------------------
// What every kernel reads. res is [M][64] (row block of the output, fp32), accumulated into.

struct Ctx {
  const float* x;     // [M, K] activations in fp32
  const uint16_t* xb; // [M, K] the same as bf16 bits where x came in as bf16 (Bf16Avx512 only), else null
  const float* xsum;  // [M, G] their per-group sums
  const float* scale; // [N, G], element (n, g) at at(n, g); null when sz16 is set
  const float* zero;  // [N, G], the same strides
  const int8_t* xq;   // [M, K] the activations quantized per 32 features (int8 paths only)
  const float* xd;    // [M, K/32] their scales
  const int32_t* xqs; // [M, K/32] the sums of the quantized values per block
  int64_t M, N, K, G, gs;
  float mult, half;   // m = 2^(8-b) and (m-1)/2: S = m * scale, Z = zero + half * scale
  int64_t sn, sg;     // strides of scale / zero: (G, 1) row-major; sn = 1 where adjacent rows are adjacent
  int64_t sb;         // offset from one 64-row block to the next: 64 sn, or 128 G when packed (64 G: sym)
  bool packed;        // the packed layout (nested.pack_scale_zero): zero = scale + 64, no scale prefetch
  // the packed layout in fp16 (IEEE half bits), else null: the pair held is the 4-bit rung's (16 s,
  // z + 7.5 s), or with sym the step s alone (z = -128 s); mult / half above are set for it (see
  // "fp16 scales" below)
  const uint16_t* sz16;
  bool sym;
  int64_t at(int64_t n, int64_t g) const { return (n >> 6) * sb + (n & 63) * sn + g * sg; }
  // one row's scale and zero as floats (the scalar paths)
  float scale_at(int64_t n, int64_t g) const { return sz16 ? half_bits_to_float(sz16[at(n, g)]) : scale[at(n, g)]; }
  float zero_at(int64_t n, int64_t g) const {
    return sym ? 0.0f : sz16 ? half_bits_to_float(sz16[at(n, g) + 64]) : zero[at(n, g)];
  }
  static float half_bits_to_float(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }
};

// fp16 scales (nested.pack_scale_zero with fp16="auto" or True). The packed pair of a group is then
// (a, b) = (16 s, z + 7.5 s), the 4-bit rung's step and zero: a GGUF Q4_0 / Q4_1 block's own d and
// m, which fp16 holds exactly (where s and z, as nested.py stores them, are not). Every rung is
// still S = mult * a and Z = b + half * a, with
//     mult = 2^(8-b) / 16  and  half = ((2^(8-b) - 1) / 2 - 7.5) / 16,
// so the loops below only load the pair differently (a conversion per 16 values, once per group).
// A symmetric grid (z = -128 s: a GGUF Q8_0 block, d q) is packed as its step alone, a = s (the
// file's d) and b = 0: then mult = 2^(8-b) and half = (2^(8-b) - 1) / 2 - 128, and the zero loads
// below give 0.
enum class Pair { kFloat, kFp16, kSymFp16 };
inline void rung_constants(int64_t bits, Pair pair, float& mult, float& half) {
  const float m = static_cast<float>(1 << (8 - bits));
  mult = pair == Pair::kFp16 ? m / 16.0f : m;
  half = pair == Pair::kFp16      ? (0.5f * (m - 1.0f) - 7.5f) / 16.0f
         : pair == Pair::kSymFp16 ? 0.5f * (m - 1.0f) - 128.0f
                                  : 0.5f * (m - 1.0f);
}

// The b-bit code from the high nibble h and low nibble l of an 8-bit code (scalar paths).
inline int rung_code(int h, int l, int bits) { return bits == 8 ? (h << 4) | l : h >> (4 - bits); }

// Portable path: decode the group's 64 x gs codes one k at a time into floats, FMA per row.
struct Scalar {
  static constexpr int kRows = 4;
  static constexpr bool kPrefetchCodes = true;
  template <int BITS, int MR>
  static void group(const Ctx& c, const uint8_t* hb, const uint8_t* lb, int64_t n0, int64_t g, int64_t m0,
                    float* res) {
    float acc[MR][kBlock] = {};
    float w[kBlock];
    for (int64_t k = g * c.gs; k < (g + 1) * c.gs; ++k) {
      const uint8_t* h = hb + k * 32;
      const uint8_t* l = lb + k * 32;
      for (int j = 0; j < 32; ++j) {
        w[j] = static_cast<float>(rung_code(h[j] & 15, l[j] & 15, BITS));
        w[j + 32] = static_cast<float>(rung_code(h[j] >> 4, l[j] >> 4, BITS));
      }
      for (int m = 0; m < MR; ++m) {
        const float xv = c.x[(m0 + m) * c.K + k];
        for (int j = 0; j < kBlock; ++j) acc[m][j] += xv * w[j];
      }
    }
    for (int j = 0; j < kBlock; ++j) {
      const float s = c.scale_at(n0 + j, g), z = c.zero_at(n0 + j, g);
      const float S = c.mult * s, Z = z + c.half * s;
      for (int m = 0; m < MR; ++m) res[(m0 + m) * kBlock + j] += S * acc[m][j] + Z * c.xsum[(m0 + m) * c.G + g];
    }
  }
};

#if CSD_X86
// 16 consecutive rows' scales (or zeros) of one group, at p: one load where such rows are adjacent in
// memory (column-major scale / zero: sn == 1), else a gather (idx = 0, sn, 2 sn, ...), which costs far
// more on some CPUs (AMD Zen 4: 1.6x the whole M = 1 group loop, in cache).
CSD_TARGET_AVX512 inline __m512 rows16(const float* p, int64_t sn, __m512i idx) {
  return sn == 1 ? _mm512_loadu_ps(p) : _mm512_i32gather_ps(idx, p, 4);
}

// Group g's scales (zeros: `zero`) of the 16 rows of a block at position at = c.at(n, g), as floats.
CSD_TARGET_AVX512 inline __m512 pair16(const Ctx& c, int64_t at, bool zero, __m512i idx) {
  if (c.sz16 != nullptr) {
    if (zero && c.sym) return _mm512_setzero_ps();
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c.sz16 + at + (zero ? kBlock : 0))));
  }
  return rows16((zero ? c.zero : c.scale) + at, c.sn, idx);
}

// AVX-512: 16 bytes of one k (rows r..r+15 in the low nibbles, r+32..r+47 in the high ones) as two
// float vectors of codes.
template <int BITS>
CSD_TARGET_AVX512 inline void decode16(const uint8_t* h, const uint8_t* l, __m512 lut, __m512& lo, __m512& hi) {
  const __m512i dh = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h)));
  if constexpr (BITS == 8) {
    const __m512i dl = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(l)));
    const __m512i f0 = _mm512_set1_epi32(0xF0);
    // 0xE4: bits of the first operand where the mask (third) is set, of the second elsewhere
    lo = _mm512_cvtepi32_ps(_mm512_ternarylogic_epi32(_mm512_slli_epi32(dh, 4), dl, f0, 0xE4));
    hi = _mm512_cvtepi32_ps(_mm512_ternarylogic_epi32(dh, _mm512_srli_epi32(dl, 4), f0, 0xE4));
  } else {
    lo = _mm512_permutexvar_ps(dh, lut);  // lut[byte & 15]: the low nibble's code, no mask needed
    hi = _mm512_permutexvar_ps(_mm512_srli_epi32(dh, 4), lut);
  }
}

// The register plan of the AVX-512 paths: 32 zmm registers, so up to 4 activation rows take the
// whole 64-row block per pass (16 accumulators), 5 to 8 rows half of it (16-row chunks), and a verify
// pass of up to 8 rows decodes the codes once.
struct Avx512Passes {
  static constexpr int kRows = 8;
  static constexpr bool kPrefetchCodes = true;
  template <int MR>
  static constexpr int kChunks = MR <= 4 ? 2 : 1;
};

// Group g's scale and zero applied to the 16 rows at row0 of the block at n0, for the MR activation
// rows of a pass from m0: res[m][row0 + j] += mult s_j acc[m][j] + (zero_j + half s_j) xsum[m][g],
// with acc[m] at acc[m * stride].
template <int MR>
CSD_TARGET_AVX512 __attribute__((always_inline)) inline void apply_group16(const Ctx& c, int64_t n0, int64_t g,
                                                                          int64_t m0, int row0, float mult, float half,
                                                                          __m512i idx, const __m512* acc, int stride,
                                                                          float* res) {
  const int64_t at = c.at(n0 + row0, g);
  const __m512 s = pair16(c, at, false, idx);
  const __m512 S = _mm512_mul_ps(s, _mm512_set1_ps(mult));
  const __m512 Z = _mm512_fmadd_ps(s, _mm512_set1_ps(half), pair16(c, at, true, idx));
  for (int m = 0; m < MR; ++m) {
    float* r = res + (m0 + m) * kBlock + row0;
    const __m512 zx = _mm512_fmadd_ps(Z, _mm512_set1_ps(c.xsum[(m0 + m) * c.G + g]), _mm512_loadu_ps(r));
    _mm512_storeu_ps(r, _mm512_fmadd_ps(S, acc[m * stride], zx));
  }
}

struct Avx512 : Avx512Passes {

  template <int BITS, int MR>
  CSD_TARGET_AVX512 static void group(const Ctx& c, const uint8_t* hb, const uint8_t* lb, int64_t n0, int64_t g,
                                      int64_t m0, float* res) {
    constexpr int W = kChunks<MR>;
    // lut[i] = code of nibble i at this width: i >> (4 - b)
    const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512 lut = _mm512_cvtepi32_ps(_mm512_srli_epi32(iota, BITS == 8 ? 0 : 4 - BITS));
    const __m512i idx = _mm512_mullo_epi32(iota, _mm512_set1_epi32(static_cast<int>(c.sn)));
    const float* x = c.x + m0 * c.K;
    const int64_t k0 = g * c.gs, k1 = k0 + c.gs, K = c.K;  // locals: GCC reloads members after stores
    for (int c0 = 0; c0 < 2; c0 += W) {  // chunk c: rows 16c..16c+15 and 32+16c..32+16c+15
      __m512 acc[MR][W][2];
      for (int m = 0; m < MR; ++m)
        for (int i = 0; i < W; ++i) acc[m][i][0] = acc[m][i][1] = _mm512_setzero_ps();
      for (int64_t k = k0; k < k1; ++k) {
        for (int i = 0; i < W; ++i) {
          __m512 lo, hi;
          decode16<BITS>(hb + k * 32 + (c0 + i) * 16, lb + k * 32 + (c0 + i) * 16, lut, lo, hi);
          for (int m = 0; m < MR; ++m) {
            const __m512 xv = _mm512_set1_ps(x[m * K + k]);
            acc[m][i][0] = _mm512_fmadd_ps(xv, lo, acc[m][i][0]);
            acc[m][i][1] = _mm512_fmadd_ps(xv, hi, acc[m][i][1]);
          }
        }
      }
      for (int i = 0; i < W; ++i)
        for (int half = 0; half < 2; ++half)
          apply_group16<MR>(c, n0, g, m0, (c0 + i) * 16 + half * 32, c.mult, c.half, idx, &acc[0][i][half], W * 2, res);
    }
  }
};

// AVX-512 BF16 (with VBMI; e.g. AMD Zen 4, Intel Sapphire Rapids), for bf16 activations only (they
// are then exact in bf16): vdpbf16ps multiplies pairs of bf16 values and adds both products to an
// fp32 lane, 32 products per instruction. A lane holds one row's codes at two consecutive k, and a
// code becomes a bf16 value without a conversion: with its bits in the low mantissa bits of a bf16
// whose exponent is 2^7 (2^11 for the high nibble of an 8-bit code), the value is 128 + c (2048 +
// 16 c), exactly, so one ternary-logic op (mask, or) decodes two codes. The constant part, A times
// the group's sum of x, is taken out with the zero point (below). One 64-byte line holds a block's
// 64 rows at k and k + 1; vpermb (zero-masked) spreads its bytes into the lanes, half a block at a
// time. Per 128 weights at 4 bits: 2 permutes, 2 shifts, 4 ternary-logic ops and 4 dot products,
// against 4 widenings, 4 shifts, 8 table lookups and 8 FMAs on the float path. Same register
// budget as Avx512: 4 accumulators per activation row for the whole block, 8 rows in half blocks.
//
// The sums: with c' the code as the lane holds it (c << (4 - b) for b <= 4, the masked top bits of
// the nibble; c itself at 8 bits, from both planes), acc = A * sum x + U * sum x c, where (A, U) is
// (128, 2^(4-b)) for b <= 4 and (2048 + 128, 1) at 8 bits; so sum w x = S sum c x + Z sum x =
// (S / U) acc + (Z - A S / U) sum x.
#if CSD_BF16
template <int BITS>
struct Bf16Consts {
  static constexpr float U = BITS == 8 ? 1.f : static_cast<float>(1 << (4 - BITS));
  static constexpr float A = BITS == 8 ? 2176.f : 128.f;
  static constexpr int32_t kMask = BITS == 8 ? 0x000F000F : ((0xF << (4 - BITS)) & 0xF) * 0x00010001;
};

struct Bf16Avx512 : Avx512Passes {
  // Its loop reads a code line in fewer instructions than the float paths, and the hand prefetches
  // (prefetch_group) only got in the way: on AMD Zen 4, the embedded model's 121 products of a token
  // with cold weights took 1.18-1.27x (4 bits) and 1.30x (8 bits) the time with them, the decode
  // step 1.10x and 1.29x; the float paths there 1.04x (so they keep them: a CPU of an earlier session
  // ran cold products at half the warm speed without them). The hardware prefetchers fetch its stream,
  // but at 2-4 bits (one code stream per thread: plane 0 only) not fast enough: there the loop
  // prefetches one line kBf16CodesAhead ahead per line it reads. Zen 4, pools of weights far above
  // the cache, one row, packed fp16 scales: 4 bits 1.05-1.12x at the three large shapes (4 KiB ahead;
  // 1 KiB 1.05-1.06x, 8 KiB 1.02-1.09x), the decode step 1.02-1.04x; at 8 bits (two planes, two
  // streams) it cost 0.82-0.94x, so 8-bit codes are left to the hardware.
  static constexpr bool kPrefetchCodes = false;
  static constexpr int64_t kBf16CodesAhead = 4096;
  template <int BITS, int MR>
  CSD_TARGET_AVX512BF16 static void group(const Ctx& c, const uint8_t* hb, const uint8_t* lb, int64_t n0, int64_t g,
                                          int64_t m0, float* res) {
    constexpr int W = kChunks<MR>;
    using K8 = Bf16Consts<BITS>;
    // byte 4r of lane r <- byte 16q + r of k's 32 bytes, byte 4r + 2 <- the same of k + 1's (the
    // line's second half); bytes 4r + 1 and 4r + 3 zeroed
    const __mmask64 even = 0x5555555555555555ull;
    const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i spread = _mm512_or_si512(lanes, _mm512_slli_epi32(_mm512_add_epi32(lanes, _mm512_set1_epi32(32)), 16));
    const __m512i mask = _mm512_set1_epi32(K8::kMask);
    const __m512i low_exp = _mm512_set1_epi32(0x43004300);   // 2^7: 128 + c
    const __m512i high_exp = _mm512_set1_epi32(0x45004500);  // 2^11: 2048 + 16 c (8-bit codes' high nibble)
    const __m512i idx = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(static_cast<int>(c.sn)));
    const uint16_t* x = c.xb + m0 * c.K;
    const int64_t k0 = g * c.gs, k1 = k0 + c.gs, K = c.K;
    for (int c0 = 0; c0 < 2; c0 += W) {  // chunk c: rows 16c..16c+15 and 32+16c..32+16c+15
      __m512 acc[MR][W][2];
      for (int m = 0; m < MR; ++m)
        for (int i = 0; i < W; ++i) acc[m][i][0] = acc[m][i][1] = _mm512_setzero_ps();
      __m512i perm[W];
      for (int i = 0; i < W; ++i) perm[i] = _mm512_add_epi32(spread, _mm512_set1_epi32((c0 + i) * 16 * 0x00010001));
      for (int64_t k = k0; k < k1; k += 2) {
        if (BITS < 8 && c0 == 0) __builtin_prefetch(hb + k * 32 + kBf16CodesAhead);  // never faults
        __m512i xv[MR];
        for (int m = 0; m < MR; ++m) {
          uint32_t pair;
          std::memcpy(&pair, x + m * K + k, 4);
          xv[m] = _mm512_set1_epi32(static_cast<int>(pair));
        }
        const __m512i line_h = _mm512_loadu_si512(hb + k * 32);
        __m512i line_l;
        if constexpr (BITS == 8) line_l = _mm512_loadu_si512(lb + k * 32);
        for (int i = 0; i < W; ++i) {
          const __m512i h = _mm512_maskz_permutexvar_epi8(even, perm[i], line_h);
          __m512i codes[2][2];  // [half][plane]
          codes[0][0] = _mm512_ternarylogic_epi32(h, mask, BITS == 8 ? high_exp : low_exp, 0xEA);
          codes[1][0] = _mm512_ternarylogic_epi32(_mm512_srli_epi32(h, 4), mask, BITS == 8 ? high_exp : low_exp, 0xEA);
          if constexpr (BITS == 8) {
            const __m512i l = _mm512_maskz_permutexvar_epi8(even, perm[i], line_l);
            codes[0][1] = _mm512_ternarylogic_epi32(l, mask, low_exp, 0xEA);
            codes[1][1] = _mm512_ternarylogic_epi32(_mm512_srli_epi32(l, 4), mask, low_exp, 0xEA);
          }
          for (int m = 0; m < MR; ++m)
            for (int half = 0; half < 2; ++half) {
              acc[m][i][half] = _mm512_dpbf16_ps(acc[m][i][half], (__m512bh)codes[half][0], (__m512bh)xv[m]);
              if constexpr (BITS == 8)
                acc[m][i][half] = _mm512_dpbf16_ps(acc[m][i][half], (__m512bh)codes[half][1], (__m512bh)xv[m]);
            }
        }
      }
      // S / U and Z - A S / U (header comment): the offset's share of the sums goes with the zero point
      const float su = c.mult / K8::U, zu = c.half - K8::A * c.mult / K8::U;
      for (int i = 0; i < W; ++i)
        for (int half = 0; half < 2; ++half)
          apply_group16<MR>(c, n0, g, m0, (c0 + i) * 16 + half * 32, su, zu, idx, &acc[0][i][half], W * 2, res);
    }
  }
};
#endif  // CSD_BF16

// rows16's 8-row form.
CSD_TARGET_AVX2 inline __m256 rows8(const float* p, int64_t sn, __m256i idx) {
  return sn == 1 ? _mm256_loadu_ps(p) : _mm256_i32gather_ps(p, idx, 4);
}

// pair16's 8-row form.
CSD_TARGET_AVX2 inline __m256 pair8(const Ctx& c, int64_t at, bool zero, __m256i idx) {
  if (c.sz16 != nullptr) {
    if (zero && c.sym) return _mm256_setzero_ps();
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c.sz16 + at + (zero ? kBlock : 0))));
  }
  return rows8((zero ? c.zero : c.scale) + at, c.sn, idx);
}

// AVX2: 8 bytes of one k (rows r..r+7 and r+32..r+39) as two float vectors of codes.
template <int BITS>
CSD_TARGET_AVX2 inline void decode8(const uint8_t* h, const uint8_t* l, __m256& lo, __m256& hi) {
  const __m256i dh = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(h)));
  if constexpr (BITS == 8) {
    const __m256i dl = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(l)));
    const __m256i f0 = _mm256_set1_epi32(0xF0), f = _mm256_set1_epi32(15);
    lo = _mm256_cvtepi32_ps(_mm256_or_si256(_mm256_and_si256(_mm256_slli_epi32(dh, 4), f0), _mm256_and_si256(dl, f)));
    hi = _mm256_cvtepi32_ps(_mm256_or_si256(_mm256_and_si256(dh, f0), _mm256_srli_epi32(dl, 4)));
  } else {
    constexpr int shift = 4 - BITS;
    lo = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(dh, shift), _mm256_set1_epi32(15 >> shift)));
    hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(dh, 4 + shift));  // a byte >> 4: no mask needed
  }
}

struct Avx2 {
  // 16 ymm registers: 8-byte chunks (16 rows) per pass such that accumulators stay at <= 8.
  static constexpr int kRows = 4;
  static constexpr bool kPrefetchCodes = true;
  template <int MR>
  static constexpr int kChunks = MR == 1 ? 4 : MR == 2 ? 2 : 1;

  template <int BITS, int MR>
  CSD_TARGET_AVX2 static void group(const Ctx& c, const uint8_t* hb, const uint8_t* lb, int64_t n0, int64_t g,
                                    int64_t m0, float* res) {
    constexpr int W = kChunks<MR>;
    const float* x = c.x + m0 * c.K;
    const __m256i idx = _mm256_mullo_epi32(_mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm256_set1_epi32(static_cast<int>(c.sn)));
    const int64_t k0 = g * c.gs, k1 = k0 + c.gs, K = c.K;  // locals: GCC reloads members after stores
    for (int c0 = 0; c0 < 4; c0 += W) {  // chunk c: rows 8c..8c+7 and 32+8c..32+8c+7
      __m256 acc[MR][W][2];
      for (int m = 0; m < MR; ++m)
        for (int i = 0; i < W; ++i) acc[m][i][0] = acc[m][i][1] = _mm256_setzero_ps();
      for (int64_t k = k0; k < k1; ++k) {
        __m256 xv[MR];
        for (int m = 0; m < MR; ++m) xv[m] = _mm256_broadcast_ss(x + m * K + k);
        for (int i = 0; i < W; ++i) {
          __m256 lo, hi;
          decode8<BITS>(hb + k * 32 + (c0 + i) * 8, lb + k * 32 + (c0 + i) * 8, lo, hi);
          for (int m = 0; m < MR; ++m) {
            acc[m][i][0] = _mm256_fmadd_ps(xv[m], lo, acc[m][i][0]);
            acc[m][i][1] = _mm256_fmadd_ps(xv[m], hi, acc[m][i][1]);
          }
        }
      }
      for (int i = 0; i < W; ++i)
        for (int half = 0; half < 2; ++half) {
          const int row0 = (c0 + i) * 8 + half * 32;
          const int64_t at = c.at(n0 + row0, g);
          const __m256 s = pair8(c, at, false, idx);
          const __m256 S = _mm256_mul_ps(s, _mm256_set1_ps(c.mult));
          const __m256 Z = _mm256_fmadd_ps(s, _mm256_set1_ps(c.half), pair8(c, at, true, idx));
          for (int m = 0; m < MR; ++m) {
            float* r = res + (m0 + m) * kBlock + row0;
            const __m256 zx = _mm256_fmadd_ps(Z, _mm256_set1_ps(c.xsum[(m0 + m) * c.G + g]), _mm256_loadu_ps(r));
            _mm256_storeu_ps(r, _mm256_fmadd_ps(S, acc[m][i][half], zx));
          }
        }
    }
  }
};

#endif  // CSD_X86

// ---------------------------------------------------------------------------------------------
// int8-activation paths (opt-in: csd::qlinear_cpu_set_activations("int8"); up to 16 rows; longer
// passes dequantize and run a float GEMM whatever the mode).
// Every activation row is quantized per block of 32 features, x ~ d * q with q int8 in
// [-127, 127] and d = max|x| / 127 (round to nearest even), so that a block's sum_k x[k] * c[k] is
// d times an exact integer dot product of bytes, which the byte-dot instructions compute 4 (VNNI)
// or 2 (vpmaddubsw) products per instruction and lane instead of one float FMA:
//   avx2        vpmaddubsw (u8 code x s8 activation, pairs summed into 16 bits), added with vpaddw
//               over a whole 32-feature block (per lane at most 16 products of 15 * 127: no
//               overflow), one vpmaddwd at the block's end; 8-bit codes run as their two nibbles
//               (16 * high + low), so no pair sum can saturate.
//   avx512vnni  vpdpbusd on 256-bit registers: 4 products summed into 32 bits, 8-bit codes whole.
//   scalar      integer loops.
// The per-group sums of x stay exact (the zero-point term uses them). The nested layout puts one
// k's 64 rows in 32 consecutive bytes, while the byte-dot instructions want one row's 4
// consecutive k in a 32-bit lane, so each 4-k quad (128 bytes) is transposed in registers (8
// unpacks) and its nibbles split into 8 vectors: vector 2i + h, lane 4L + e, holds row
// 32h + 16L + 4i + e. With several activation rows a 32-feature block of codes is decoded once into
// a small buffer (2 or 4 KiB) and multiplied by every row; with one (decode) the codes go from
// registers straight into the products (8-bit codes on vpmaddubsw excepted: 16 vectors).

// Codes are unsigned (0 .. 2^b - 1); the products are taken against c - 2^(b-1), centred, so that
// the activations' rounding error is not multiplied by the codes' large mean: sum_k q[k] * c[k] -
// 2^(b-1) * sum_k q[k] (exact, in integers), and 2^(b-1) * S moves into the zero-point term.
template <int BITS>
constexpr int32_t kCentre = 1 << (BITS - 1);

// Row of lane p of vector v in the transposed order above.
constexpr int i8_row(int v, int p) { return 32 * (v & 1) + 16 * (p >> 2) + 4 * (v >> 1) + (p & 3); }

#if CSD_X86
struct I8Avx2 {
  // 8 code vectors per quad; 8-bit codes on vpmaddubsw take 16 (the high plane's nibbles, then the
  // low plane's), on vpdpbusd 8 (whole bytes)
  template <int BITS, bool VNNI>
  static constexpr int kVecs = BITS == 8 && !VNNI ? 16 : 8;

  CSD_TARGET_AVX2 static inline __attribute__((always_inline)) void transpose(const uint8_t* p, __m256i t[4]) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64));
    const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 96));
    const __m256i ab0 = _mm256_unpacklo_epi8(a, b), ab1 = _mm256_unpackhi_epi8(a, b);
    const __m256i cd0 = _mm256_unpacklo_epi8(c, d), cd1 = _mm256_unpackhi_epi8(c, d);
    t[0] = _mm256_unpacklo_epi16(ab0, cd0);
    t[1] = _mm256_unpackhi_epi16(ab0, cd0);
    t[2] = _mm256_unpacklo_epi16(ab1, cd1);
    t[3] = _mm256_unpackhi_epi16(ab1, cd1);
  }

  // The quad of codes at feature k into out[0 .. kVecs).
  template <int BITS, bool VNNI>
  CSD_TARGET_AVX2 static inline __attribute__((always_inline)) void decode_quad(const uint8_t* hb, const uint8_t* lb,
                                                                                int64_t k, __m256i* out) {
    const __m256i m15 = _mm256_set1_epi8(15);
    __m256i t[4];
    transpose(hb + k * 32, t);
    if constexpr (BITS == 8) {
      __m256i u[4];
      transpose(lb + k * 32, u);
      for (int i = 0; i < 4; ++i) {
        const __m256i th = _mm256_and_si256(t[i], m15), tl = _mm256_and_si256(_mm256_srli_epi16(t[i], 4), m15);
        const __m256i uh = _mm256_and_si256(u[i], m15), ul = _mm256_and_si256(_mm256_srli_epi16(u[i], 4), m15);
        if constexpr (VNNI) {  // whole 8-bit codes: 16 * (high plane nibble) + low plane nibble
          out[2 * i] = _mm256_or_si256(_mm256_slli_epi16(th, 4), uh);
          out[2 * i + 1] = _mm256_or_si256(_mm256_slli_epi16(tl, 4), ul);
        } else {
          out[2 * i] = th;
          out[2 * i + 1] = tl;
          out[8 + 2 * i] = uh;
          out[8 + 2 * i + 1] = ul;
        }
      }
    } else {
      const __m256i mb = _mm256_set1_epi8(static_cast<char>((1 << BITS) - 1));
      for (int i = 0; i < 4; ++i) {
        out[2 * i] = _mm256_and_si256(_mm256_srli_epi16(t[i], 4 - BITS), mb);
        out[2 * i + 1] = _mm256_and_si256(_mm256_srli_epi16(t[i], 8 - BITS), mb);
      }
    }
  }

  // The 4 activation bytes at x in every 32-bit lane (the byte-dot instructions' second operand).
  CSD_TARGET_AVX2 static inline __attribute__((always_inline)) __m256i broadcast4(const int8_t* x) {
    int32_t x4;
    std::memcpy(&x4, x, 4);
    return _mm256_set1_epi32(x4);
  }

  // 32 features of one activation row (xq) against 8 code vectors per quad: int32 row sums.
  CSD_TARGET_AVX2 static inline __attribute__((always_inline)) void dot_block(const __m256i* buf, int stride,
                                                                              const int8_t* xq, __m256i out[8]) {
    __m256i acc[8];
    for (int v = 0; v < 8; ++v) acc[v] = _mm256_setzero_si256();
    for (int q = 0; q < 8; ++q) {
      const __m256i xv = broadcast4(xq + 4 * q);
      for (int v = 0; v < 8; ++v) acc[v] = _mm256_add_epi16(acc[v], _mm256_maddubs_epi16(buf[q * stride + v], xv));
    }
    const __m256i ones = _mm256_set1_epi16(1);
    for (int v = 0; v < 8; ++v) out[v] = _mm256_madd_epi16(acc[v], ones);
  }

  // One group's scales (or zeros) of rows r0..r0+3 and r1..r1+3 (row_ids): two loads where adjacent
  // rows are adjacent in memory (column-major, sn == 1), else a gather.
  CSD_TARGET_AVX2 static inline __attribute__((always_inline)) __m256 rows(const float* p, int64_t sn, int r0, int r1,
                                                                           __m256i row_ids) {
    if (sn == 1) return _mm256_set_m128(_mm_loadu_ps(p + r1), _mm_loadu_ps(p + r0));
    return _mm256_i32gather_ps(p, _mm256_mullo_epi32(row_ids, _mm256_set1_epi32(static_cast<int>(sn))), 4);
  }

  // The same from the packed pair at position at (fp16 or fp32).
  CSD_TARGET_AVX2 static inline __attribute__((always_inline)) __m256 pair(const Ctx& c, int64_t at, bool zero, int r0,
                                                                           int r1, __m256i row_ids) {
    if (c.sz16 != nullptr) {
      if (zero && c.sym) return _mm256_setzero_ps();
      const uint16_t* p = c.sz16 + at + (zero ? kBlock : 0);
      int64_t a, b;  // 4 halves each
      std::memcpy(&a, p + r0, 8);
      std::memcpy(&b, p + r1, 8);
      return _mm256_cvtph_ps(_mm_set_epi64x(b, a));
    }
    return rows((zero ? c.zero : c.scale) + at, c.sn, r0, r1, row_ids);
  }

  // Per group: res[m][row] += S * sum_blocks d * isum + Z * xsum, rows in the transposed order.
  template <int BITS>
  CSD_TARGET_AVX2 static inline __attribute__((always_inline)) void epilogue(const Ctx& c, int64_t n0, int64_t g,
                                                                             const float* facc, float* res) {
    for (int v = 0; v < 8; ++v) {
      const __m256i row_ids = _mm256_setr_epi32(i8_row(v, 0), i8_row(v, 1), i8_row(v, 2), i8_row(v, 3),
                                                i8_row(v, 4), i8_row(v, 5), i8_row(v, 6), i8_row(v, 7));
      const int r0 = i8_row(v, 0), r1 = i8_row(v, 4);  // lanes 0-3: rows r0..r0+3, lanes 4-7: r1..r1+3
      const int64_t at = c.at(n0, g);
      const __m256 s = pair(c, at, false, r0, r1, row_ids);
      const __m256 S = _mm256_mul_ps(s, _mm256_set1_ps(c.mult));
      const __m256 Z = _mm256_fmadd_ps(S, _mm256_set1_ps(static_cast<float>(kCentre<BITS>)),
                                       _mm256_fmadd_ps(s, _mm256_set1_ps(c.half), pair(c, at, true, r0, r1, row_ids)));
      for (int64_t m = 0; m < c.M; ++m) {
        float* r = res + m * kBlock;
        const __m256 prev = _mm256_set_m128(_mm_loadu_ps(r + r1), _mm_loadu_ps(r + r0));
        const __m256 zx = _mm256_fmadd_ps(Z, _mm256_set1_ps(c.xsum[m * c.G + g]), prev);
        const __m256 y = _mm256_fmadd_ps(S, _mm256_load_ps(facc + (m * 8 + v) * 8), zx);
        _mm_storeu_ps(r + r0, _mm256_castps256_ps128(y));
        _mm_storeu_ps(r + r1, _mm256_extractf128_ps(y, 1));
      }
    }
  }

  // float accumulators: facc[m][v] (+)= d * isum
  CSD_TARGET_AVX2 static inline __attribute__((always_inline)) void scale_add(const __m256i isum[8], int32_t centre,
                                                                              float d, bool first, float* facc) {
    const __m256 dv = _mm256_set1_ps(d);
    const __m256i cv = _mm256_set1_epi32(centre);
    for (int v = 0; v < 8; ++v) {
      const __m256 f = _mm256_cvtepi32_ps(_mm256_sub_epi32(isum[v], cv));
      _mm256_store_ps(facc + v * 8, first ? _mm256_mul_ps(dv, f) : _mm256_fmadd_ps(dv, f, _mm256_load_ps(facc + v * 8)));
    }
  }

  template <int BITS>
  CSD_TARGET_AVX2 static void group(const Ctx& c, const uint8_t* hb, const uint8_t* lb, int64_t n0, int64_t g,
                                    float* res) {
    constexpr int NV = kVecs<BITS, false>;
    alignas(32) __m256i buf[8 * NV];
    alignas(32) float facc[kMaxBlockedRows * 64];
    const int64_t K = c.K, KB = K / 32;
    for (int64_t kb = g * c.gs; kb < (g + 1) * c.gs; kb += 32) {
      if (BITS < 8 && c.M == 1) {  // decode: codes straight from registers into the products
        __m256i acc[8];
        for (int v = 0; v < 8; ++v) acc[v] = _mm256_setzero_si256();
        for (int q = 0; q < 8; ++q) {
          __m256i codes[8];
          decode_quad<BITS, false>(hb, lb, kb + 4 * q, codes);
          const __m256i xv = broadcast4(c.xq + kb + 4 * q);
          for (int v = 0; v < 8; ++v) acc[v] = _mm256_add_epi16(acc[v], _mm256_maddubs_epi16(codes[v], xv));
        }
        const __m256i ones = _mm256_set1_epi16(1);
        for (int v = 0; v < 8; ++v) acc[v] = _mm256_madd_epi16(acc[v], ones);
        scale_add(acc, kCentre<BITS> * c.xqs[kb / 32], c.xd[kb / 32], kb == g * c.gs, facc);
        continue;
      }
      for (int q = 0; q < 8; ++q) decode_quad<BITS, false>(hb, lb, kb + 4 * q, buf + q * NV);
      for (int64_t m = 0; m < c.M; ++m) {
        __m256i isum[8];
        dot_block(buf, NV, c.xq + m * K + kb, isum);
        if constexpr (BITS == 8) {  // 16 * (high nibbles' sum) + low nibbles' sum
          __m256i lsum[8];
          dot_block(buf + 8, NV, c.xq + m * K + kb, lsum);
          for (int v = 0; v < 8; ++v) isum[v] = _mm256_add_epi32(_mm256_slli_epi32(isum[v], 4), lsum[v]);
        }
        const int64_t blk = m * KB + kb / 32;
        scale_add(isum, kCentre<BITS> * c.xqs[blk], c.xd[blk], kb == g * c.gs, facc + m * 64);
      }
    }
    epilogue<BITS>(c, n0, g, facc, res);
  }
};

#define CSD_TARGET_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")))

struct I8Avx512Vnni {
  CSD_TARGET_VNNI static inline __attribute__((always_inline)) void dot_block(const __m256i* buf, const int8_t* xq,
                                                                              __m256i out[8]) {
    __m256i acc[8];
    for (int v = 0; v < 8; ++v) acc[v] = _mm256_setzero_si256();
    for (int q = 0; q < 8; ++q) {
      const __m256i xv = I8Avx2::broadcast4(xq + 4 * q);
      for (int v = 0; v < 8; ++v) acc[v] = _mm256_dpbusd_epi32(acc[v], buf[q * 8 + v], xv);
    }
    for (int v = 0; v < 8; ++v) out[v] = acc[v];
  }

  template <int BITS>
  CSD_TARGET_VNNI static void group(const Ctx& c, const uint8_t* hb, const uint8_t* lb, int64_t n0, int64_t g,
                                    float* res) {
    alignas(32) __m256i buf[8 * 8];
    alignas(32) float facc[kMaxBlockedRows * 64];
    const int64_t K = c.K, KB = K / 32;
    for (int64_t kb = g * c.gs; kb < (g + 1) * c.gs; kb += 32) {
      if (c.M == 1) {  // decode: codes straight from registers into the products
        __m256i acc[8];
        for (int v = 0; v < 8; ++v) acc[v] = _mm256_setzero_si256();
        for (int q = 0; q < 8; ++q) {
          __m256i codes[8];
          I8Avx2::decode_quad<BITS, true>(hb, lb, kb + 4 * q, codes);
          const __m256i xv = I8Avx2::broadcast4(c.xq + kb + 4 * q);
          for (int v = 0; v < 8; ++v) acc[v] = _mm256_dpbusd_epi32(acc[v], codes[v], xv);
        }
        I8Avx2::scale_add(acc, kCentre<BITS> * c.xqs[kb / 32], c.xd[kb / 32], kb == g * c.gs, facc);
        continue;
      }
      for (int q = 0; q < 8; ++q) I8Avx2::decode_quad<BITS, true>(hb, lb, kb + 4 * q, buf + q * 8);
      for (int64_t m = 0; m < c.M; ++m) {
        __m256i isum[8];
        dot_block(buf, c.xq + m * K + kb, isum);
        const int64_t blk = m * KB + kb / 32;
        I8Avx2::scale_add(isum, kCentre<BITS> * c.xqs[blk], c.xd[blk], kb == g * c.gs, facc + m * 64);
      }
    }
    I8Avx2::epilogue<BITS>(c, n0, g, facc, res);
  }
};
#endif  // CSD_X86

// Portable int8-activation path: integer loops (the compiler vectorizes them for the baseline).
struct I8Scalar {
  template <int BITS>
  static void group(const Ctx& c, const uint8_t* hb, const uint8_t* lb, int64_t n0, int64_t g, float* res) {
    int32_t acc[kMaxBlockedRows][kBlock];
    float facc[kMaxBlockedRows][kBlock];
    int32_t w[kBlock];
    const int64_t K = c.K, KB = K / 32;
    for (int64_t kb = g * c.gs; kb < (g + 1) * c.gs; kb += 32) {
      std::memset(acc, 0, sizeof(int32_t) * kBlock * c.M);
      for (int64_t k = kb; k < kb + 32; ++k) {
        const uint8_t* h = hb + k * 32;
        const uint8_t* l = lb + k * 32;
        for (int j = 0; j < 32; ++j) {
          w[j] = rung_code(h[j] & 15, l[j] & 15, BITS);
          w[j + 32] = rung_code(h[j] >> 4, l[j] >> 4, BITS);
        }
        for (int64_t m = 0; m < c.M; ++m) {
          const int32_t xv = c.xq[m * K + k];
          for (int j = 0; j < kBlock; ++j) acc[m][j] += xv * w[j];
        }
      }
      for (int64_t m = 0; m < c.M; ++m) {
        const float d = c.xd[m * KB + kb / 32];
        const int32_t centre = kCentre<BITS> * c.xqs[m * KB + kb / 32];
        for (int j = 0; j < kBlock; ++j) {
          const float f = d * static_cast<float>(acc[m][j] - centre);
          facc[m][j] = kb == g * c.gs ? f : facc[m][j] + f;
        }
      }
    }
    for (int j = 0; j < kBlock; ++j) {
      const float s = c.scale_at(n0 + j, g), z = c.zero_at(n0 + j, g);
      const float S = c.mult * s, Z = z + c.half * s + S * static_cast<float>(kCentre<BITS>);
      for (int64_t m = 0; m < c.M; ++m) res[m * kBlock + j] += S * facc[m][j] + Z * c.xsum[m * c.G + g];
    }
  }
};

// One work unit: row block at n0 (its plane bytes at hb / lb), groups [g0, g1), every activation
// row, Path::kRows per pass; the group's codes stay in L1 between passes.
using UnitFn = void (*)(const Ctx&, const uint8_t*, const uint8_t*, int64_t, int64_t, int64_t, float*);

// One pass of MR activation rows (MR <= Path::kRows; larger ones are never instantiated).
template <class Path, int BITS, int MR>
inline void rows_pass(const Ctx& c, const uint8_t* hb, const uint8_t* lb, int64_t n0, int64_t g, int64_t m0,
                      float* res) {
  if constexpr (MR <= Path::kRows) Path::template group<BITS, MR>(c, hb, lb, n0, g, m0, res);
}

// Prefetches ahead of group g of the row block at n0 (codes at hb / lb; the codes only with CODES).
template <int BITS, bool CODES = true>
__attribute__((always_inline)) inline void prefetch_group(const Ctx& c, const uint8_t* hb, const uint8_t* lb,
                                                          int64_t n0, int64_t g) {
  // The next row block's scales and zeros are one contiguous run of 64 * G floats each (4 G cache
  // lines), but the gathers read them a column at a time: at that block's first group all its lines
  // would miss at once, which the hardware prefetcher does not foresee (a cold M = 1 product ran at
  // half the speed of a warm one). Fetch them ahead instead, 4 lines of each per group.
  // Column-major, the next block's values of group g are 64 consecutive floats: fetch those. Packed,
  // they are part of one sequential stream, which the hardware prefetchers follow on their own.
  if (!c.packed && n0 + 2 * kBlock <= c.N) {
    const int64_t from = c.sn == 1 ? c.at(n0 + kBlock, g) : c.at(n0 + kBlock, 0) + 64 * g;
    for (int i = 0; i < 4; ++i) {  // 4 lines of 16 floats each
      __builtin_prefetch(c.scale + from + 16 * i);
      __builtin_prefetch(c.zero + from + 16 * i);
    }
  }
  // The codes are one stream, but the hardware prefetcher stops at every 4 KiB page and restarts
  // late; keep kCodesAhead bytes in flight by hand (prefetches past the end never fault).
  if (!CODES) return;
  for (int64_t off = g * c.gs * 32 + kCodesAhead; off < (g + 1) * c.gs * 32 + kCodesAhead; off += 64) {
    __builtin_prefetch(hb + off);
    if (BITS == 8) __builtin_prefetch(lb + off);
  }
}

template <class Path, int BITS>
void run_unit(const Ctx& c, const uint8_t* hb, const uint8_t* lb, int64_t n0, int64_t g0, int64_t g1, float* res) {
  for (int64_t g = g0; g < g1; ++g) {
    prefetch_group<BITS, Path::kPrefetchCodes>(c, hb, lb, n0, g);
    for (int64_t m0 = 0; m0 < c.M; m0 += Path::kRows) {
      switch (std::min<int64_t>(Path::kRows, c.M - m0)) {
        case 1: rows_pass<Path, BITS, 1>(c, hb, lb, n0, g, m0, res); break;
        case 2: rows_pass<Path, BITS, 2>(c, hb, lb, n0, g, m0, res); break;
        case 3: rows_pass<Path, BITS, 3>(c, hb, lb, n0, g, m0, res); break;
        case 4: rows_pass<Path, BITS, 4>(c, hb, lb, n0, g, m0, res); break;
        case 5: rows_pass<Path, BITS, 5>(c, hb, lb, n0, g, m0, res); break;
        case 6: rows_pass<Path, BITS, 6>(c, hb, lb, n0, g, m0, res); break;
        case 7: rows_pass<Path, BITS, 7>(c, hb, lb, n0, g, m0, res); break;
        default: rows_pass<Path, BITS, 8>(c, hb, lb, n0, g, m0, res); break;
      }
    }
  }
}

// The same unit on the int8-activation paths: one call per group runs every activation row.
template <class Path, int BITS>
void run_unit_i8(const Ctx& c, const uint8_t* hb, const uint8_t* lb, int64_t n0, int64_t g0, int64_t g1,
                 float* res) {
  for (int64_t g = g0; g < g1; ++g) {
    prefetch_group<BITS>(c, hb, lb, n0, g);
    Path::template group<BITS>(c, hb, lb, n0, g, res);
  }
}

template <class F>
auto with_bits(int64_t b, F&& f) {
  switch (b) {
    case 8: return f(std::integral_constant<int, 8>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 3: return f(std::integral_constant<int, 3>{});
    default: return f(std::integral_constant<int, 2>{});
  }
}

UnitFn unit_for(int isa, int64_t bits, bool int8_act, bool bf16_x) {
  return with_bits(bits, [isa, int8_act, bf16_x](auto B) -> UnitFn {
    if (int8_act) {
#if CSD_X86
      if (isa >= kAvx512Vnni) return &run_unit_i8<I8Avx512Vnni, B.value>;
      if (isa >= kAvx2) return &run_unit_i8<I8Avx2, B.value>;  // AVX-512 without VNNI: vpmaddubsw
#endif
      return &run_unit_i8<I8Scalar, B.value>;
    }
#if CSD_X86
#if CSD_BF16
    if (isa == kAvx512Bf16 && bf16_x) return &run_unit<Bf16Avx512, B.value>;
#endif
    if (isa >= kAvx512) return &run_unit<Avx512, B.value>;
    if (isa == kAvx2) return &run_unit<Avx2, B.value>;
#endif
    return &run_unit<Scalar, B.value>;
  });
}

// ---------------------------------------------------------------------------------------------
// Rows past the last full block, and the many-rows path: plain loops.

// The b-bit code of tail row i (tail layout), feature k.
inline int tail_code(const uint8_t* hi_tail, const uint8_t* lo_tail, int64_t nt, int64_t i, int64_t k, int bits) {
  const int64_t byte = k * (nt / 2) + i / 2;
  const int sh = (i & 1) ? 4 : 0;
  return rung_code((hi_tail[byte] >> sh) & 15, (lo_tail[byte] >> sh) & 15, bits);
}

// The b-bit rung's weight, transposed: wt [K, N] float. Transposed so that for every k a block's 64
// rows are 64 contiguous floats: the loops vectorize (the weight is then multiplied as x @ wt).
template <int BITS>
void dequant_t(const Ctx& c, const uint8_t* hi, const uint8_t* lo, float* wt) {
  const int64_t N = c.N, K = c.K, full = N / kBlock * kBlock;
  at::parallel_for(0, full / kBlock, 1, [&](int64_t b0, int64_t b1) {
    float S[kBlock], Z[kBlock];
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t g = 0; g < c.G; ++g) {
        for (int j = 0; j < kBlock; ++j) {
          const float s = c.scale_at(b * kBlock + j, g);
          S[j] = c.mult * s;
          Z[j] = c.zero_at(b * kBlock + j, g) + c.half * s;
        }
        for (int64_t k = g * c.gs; k < (g + 1) * c.gs; ++k) {
          const uint8_t* h = hi + (b * K + k) * 32;
          const uint8_t* l = lo + (b * K + k) * 32;
          float* row = wt + k * N + b * kBlock;
          for (int j = 0; j < 32; ++j) {
            row[j] = static_cast<float>(rung_code(h[j] & 15, l[j] & 15, BITS)) * S[j] + Z[j];
            row[j + 32] = static_cast<float>(rung_code(h[j] >> 4, l[j] >> 4, BITS)) * S[j + 32] + Z[j + 32];
          }
        }
      }
    }
  });
  const int64_t nt = N - full;
  for (int64_t i = 0; i < nt; ++i)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t n = full + i, g = k / c.gs;
      const float s = c.scale_at(n, g);
      wt[k * N + n] = tail_code(hi + full * K / 2, lo + full * K / 2, nt, i, k, BITS) * (c.mult * s) +
                      (c.zero_at(n, g) + c.half * s);
    }
}

// Tail rows [full, N) into out [M, ldo].
void tail_rows(const Ctx& c, const uint8_t* ht, const uint8_t* lt, int64_t full, int64_t nt, int bits, float* out,
               int64_t ldo) {
  std::vector<float> w(c.K);
  for (int64_t i = 0; i < nt; ++i) {
    const int64_t n = full + i;
    for (int64_t k = 0; k < c.K; ++k) w[k] = static_cast<float>(tail_code(ht, lt, nt, i, k, bits));
    for (int64_t m = 0; m < c.M; ++m) {
      float total = 0.f;
      for (int64_t g = 0; g < c.G; ++g) {
        float acc = 0.f;
        for (int64_t k = g * c.gs; k < (g + 1) * c.gs; ++k) acc += c.x[m * c.K + k] * w[k];
        const float s = c.scale_at(n, g);
        total += c.mult * s * acc + (c.zero_at(n, g) + c.half * s) * c.xsum[m * c.G + g];
      }
      out[m * ldo + n] = total;
    }
  }
}

// The same with int8 activations (per 32-feature block: d * the integer dot product).
void tail_rows_i8(const Ctx& c, const uint8_t* ht, const uint8_t* lt, int64_t full, int64_t nt, int bits,
                  float* out, int64_t ldo) {
  std::vector<int32_t> w(c.K);
  const int64_t KB = c.K / 32;
  const int32_t c0 = 1 << (bits - 1);
  for (int64_t i = 0; i < nt; ++i) {
    const int64_t n = full + i;
    for (int64_t k = 0; k < c.K; ++k) w[k] = tail_code(ht, lt, nt, i, k, bits);
    for (int64_t m = 0; m < c.M; ++m) {
      float total = 0.f;
      for (int64_t g = 0; g < c.G; ++g) {
        float acc = 0.f;
        for (int64_t kb = g * c.gs; kb < (g + 1) * c.gs; kb += 32) {
          int32_t isum = 0;
          for (int64_t k = kb; k < kb + 32; ++k) isum += w[k] * c.xq[m * c.K + k];
          isum -= c0 * c.xqs[m * KB + kb / 32];
          acc += c.xd[m * KB + kb / 32] * static_cast<float>(isum);
        }
        const float s = c.scale_at(n, g);
        const float S = c.mult * s, Z = c.zero_at(n, g) + c.half * s + S * static_cast<float>(c0);
        total += S * acc + Z * c.xsum[m * c.G + g];
      }
      out[m * ldo + n] = total;
    }
  }
}

// x ~ d * q per 32-feature block of each row: d = max|x| / 127, q = round-to-even(x * 127 / max|x|).
void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* q, float* d, int32_t* qsum) {
  for (int64_t b = 0; b < M * K / 32; ++b) {
    const float* xb = x + b * 32;
    float amax = 0.f;
    for (int k = 0; k < 32; ++k) amax = std::max(amax, std::fabs(xb[k]));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    d[b] = amax / 127.f;
    int32_t total = 0;
    for (int k = 0; k < 32; ++k) {
      q[b * 32 + k] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(xb[k] * inv))));
      total += q[b * 32 + k];
    }
    qsum[b] = total;
  }
}

// ---------------------------------------------------------------------------------------------

// The bit-width from its one-element integer tensor; the usual dtypes read in place (item() is a
// dispatched op, a measurable share of a decode-sized call).
int64_t read_bits(const at::Tensor& bits) {
  switch (bits.scalar_type()) {
    case at::kInt: return *bits.const_data_ptr<int32_t>();
    case at::kLong: return *bits.const_data_ptr<int64_t>();
    default: return bits.item<int64_t>();
  }
}

// The checks of one weight against x (its dims, dtypes, group size, bits); returns its bit-width.
int64_t check_weight(const char* who, const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scale,
                     const at::Tensor& zero, const at::Tensor& bits) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && qdata.device().is_cpu() && scale.device().is_cpu() &&
                  zero.device().is_cpu() && bits.device().is_cpu(),
              who, ": every argument must be a CPU tensor");
  TORCH_CHECK_TYPE(x.is_floating_point(), who, ": x must be floating point, got ", x.scalar_type());
  TORCH_CHECK_VALUE(qdata.scalar_type() == at::kByte && qdata.dim() == 3 && qdata.size(0) == 2,
              who, ": qdata must be uint8 [2, N, K/2], got ", qdata.scalar_type(), " ", qdata.sizes());
  const int64_t N = qdata.size(1), K = 2 * qdata.size(2);
  TORCH_CHECK_VALUE(N % 2 == 0, who, ": N must be even, got ", N);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == K, who, ": x has shape ", x.sizes(),
              "; its last dim must be in_features=", K);
  if (scale.dim() == 4) {  // packed (nested.pack_scale_zero): the one tensor passed as scale and as zero
    TORCH_CHECK_VALUE((scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kHalf) &&
                          scale.size(0) == (N + kBlock - 1) / kBlock && scale.size(1) > 0 && K % scale.size(1) == 0 &&
                          (scale.size(2) == 2 || (scale.size(2) == 1 && scale.scalar_type() == at::kHalf)) &&
                          scale.size(3) == kBlock && scale.is_contiguous(),
                      who, ": packed scale/zero must be a contiguous float32 or float16 [ceil(N/64)=",
                      (N + kBlock - 1) / kBlock, ", K/group, 2, 64] tensor (float16 [..., 1, 64]: a symmetric "
                      "grid's steps), got ", scale.scalar_type(), " ", scale.sizes());
    TORCH_CHECK_VALUE(zero.sizes() == scale.sizes() && zero.data_ptr() == scale.data_ptr(), who,
                      ": with packed scales pass the packed tensor as zero too, got zero ", zero.sizes());
  } else {
    TORCH_CHECK_VALUE(scale.scalar_type() == at::kFloat && zero.scalar_type() == at::kFloat && scale.dim() == 2 &&
                          scale.size(0) == N && scale.sizes() == zero.sizes() && scale.size(1) > 0 &&
                          K % scale.size(1) == 0,
                      who, ": scale ", scale.sizes(), " / zero ", zero.sizes(), " must be float32 [N=", N,
                      ", K/group], or both the packed [ceil(N/64), K/group, 2, 64] tensor");
  }
  const int64_t gs = K / scale.size(1);
  TORCH_CHECK_VALUE(gs == 32 || gs == 64 || gs == 128, who, ": group size ", gs, " is not one of 32, 64, 128");
  TORCH_CHECK_VALUE(bits.numel() == 1 && bits.dim() <= 1 && !bits.is_floating_point() && !bits.is_complex(),
              who, ": bits must be a 0-d integer tensor, got ", bits.scalar_type(), " ", bits.sizes());
  const int64_t b = read_bits(bits);
  TORCH_CHECK_VALUE(b == 2 || b == 3 || b == 4 || b == 8, who, ": bits=", b,
              " is not supported; choose one of [2, 3, 4, 8]");
  return b;
}

// One weight of a call: its tensors (qdata contiguous; scale / zero as passed when adjacent rows are
// adjacent in memory, e.g. column-major, else row-major copies), its share of the work and of the
// partial sums.
struct Part {
  at::Tensor q, sc, ze;
  int64_t N = 0, b = 0, nblocks = 0, first_unit = 0, sn = 0, sg = 0, sb = 0;
  bool packed = false;
  Pair pair = Pair::kFloat;  // how the packed tensor holds each group's scale and zero
  const uint8_t* hi = nullptr;
  const uint8_t* lo = nullptr;
  float* op = nullptr;  // [ks][M][N] partial sums (columns past the last full block: part 0 only)
  UnitFn unit = nullptr;
  Ctx ctx{};
  // this weight's kernel context (the activation fields as given)
  Ctx context(const float* x, const uint16_t* xb, const float* xsum, const int8_t* xq, const float* xd,
              const int32_t* xqs, int64_t M, int64_t K, int64_t G) const {
    float mult, half;
    rung_constants(b, pair, mult, half);
    const bool fp16 = pair != Pair::kFloat;
    const float* scales = fp16 ? nullptr : sc.data_ptr<float>();
    const float* zeros = fp16 ? nullptr : packed ? scales + kBlock : ze.data_ptr<float>();
    const uint16_t* halves = fp16 ? reinterpret_cast<const uint16_t*>(sc.const_data_ptr<at::Half>()) : nullptr;
    return Ctx{x, xb, xsum, scales, zeros, xq, xd, xqs, M, N, K, G, K / G, mult, half, sn, sg, sb, packed,
               halves, pair == Pair::kSymFp16};
  }
};

// float -> bf16, round to nearest even (NaN stays a quiet NaN), as c10::BFloat16 does; branch-free so
// that the output loop vectorizes (a scalar conversion per element cost 1 ns: 50 us for an LM head).
inline uint16_t to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
}

// Columns [n0, n1) of M output rows of N (row m's values at src + m * ld) converted to out's dtype.
void write_columns(const float* src, int64_t ld, int64_t M, int64_t N, int64_t n0, int64_t n1, at::Tensor& out) {
  if (out.scalar_type() == at::kBFloat16) {
    uint16_t* dst = reinterpret_cast<uint16_t*>(out.mutable_data_ptr<at::BFloat16>());
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = n0; n < n1; ++n) dst[m * N + n] = to_bf16_bits(src[m * ld + n - n0]);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kHalf, out.scalar_type(), "qlinear_cpu_out", [&] {
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = n0; n < n1; ++n) dst[m * N + n] = static_cast<scalar_t>(src[m * ld + n - n0]);
  });
}

// The output [M, N] of one weight from column `from` on: its ks partial sums added (the full-block
// columns) and converted to x's dtype.
void write_output(const Part& p, int64_t ks, int64_t M, at::Tensor& out, int64_t from) {
  const int64_t N = p.N, full = p.nblocks * kBlock;
  float* op = p.op;
  for (int64_t part = 1; part < ks; ++part)
    for (int64_t m = 0; m < M; ++m) {
      float* row = op + m * N;
      const float* add = op + (part * M + m) * N;
      for (int64_t n = from; n < full; ++n) row[n] += add[n];
    }
  write_columns(op + from, N, M, N, from, N, out);
}

template <class T>
inline void grow(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
}

// y_i = x @ W_i^T for every weight i (same in_features and group size, each at its own bit-width):
// one pass over x, one parallel loop over every weight's work units (a layer's q/k/v projections,
// or gate and up, as one call: one fork/join, one conversion of x, and the units balanced over
// the threads together).
// ``into``: the outputs to write (a replayed CPU graph's buffers, csd_compile/cpu_graph.py), each of
// the shape and dtype the call would allocate; nullptr allocates them.
std::vector<at::Tensor> qlinear_parts(const char* who, const at::Tensor& x, at::TensorList qdata,
                                      at::TensorList scale, at::TensorList zero, at::TensorList bits,
                                      const std::vector<at::Tensor>* into = nullptr) {
  const size_t nparts = qdata.size();
  TORCH_CHECK_VALUE(nparts > 0 && scale.size() == nparts && zero.size() == nparts && bits.size() == nparts, who,
                    ": qdata, scale, zero and bits must be lists of one length >= 1, got ", qdata.size(), ", ",
                    scale.size(), ", ", zero.size(), ", ", bits.size());
  std::vector<Part> parts(nparts);
  int64_t K = 0, G = 0;
  for (size_t i = 0; i < nparts; ++i) {
    Part& p = parts[i];
    p.b = check_weight(who, x, qdata[i], scale[i], zero[i], bits[i]);
    TORCH_CHECK_VALUE(i == 0 || scale[i].size(1) == G, who, ": every weight must have the group size of the first (",
                      K / G, "), weight ", i, " has ", K / std::max<int64_t>(scale[i].size(1), 1));
    K = 2 * qdata[i].size(2);
    G = scale[i].size(1);
    // contiguous() is free on the contiguous tensors a compiled graph passes in
    p.q = qdata[i].contiguous();
    if (scale[i].dim() == 4) {  // packed: per block, per group, 64 scales then 64 zeros
      p.sc = scale[i];
      p.ze = zero[i];
      p.packed = true;
      // float16 [..., 1, 64] (checked): a symmetric grid's steps alone
      p.pair = scale[i].scalar_type() == at::kFloat ? Pair::kFloat
               : scale[i].size(2) == 1              ? Pair::kSymFp16
                                                    : Pair::kFp16;
      p.sn = 1;
      p.sg = scale[i].size(2) * kBlock;
    } else if (scale[i].stride(0) == 1 && zero[i].stride(0) == 1 && scale[i].stride(1) == zero[i].stride(1)) {
      p.sc = scale[i];  // column-major (nested.py's layout): a group's rows are read with vector loads
      p.ze = zero[i];
      p.sn = 1;
      p.sg = scale[i].stride(1);
    } else {
      p.sc = scale[i].contiguous();
      p.ze = zero[i].contiguous();
      p.sn = scale[i].size(1);
      p.sg = 1;
    }
    p.sb = p.packed ? p.sg * G : kBlock * p.sn;
    p.N = p.q.size(1);
    p.nblocks = p.N / kBlock;
    p.hi = p.q.data_ptr<uint8_t>();
    p.lo = p.hi + p.N * K / 2;
  }
  const int64_t gs = K / G;
  // x is read as [M, K] in place (a reshape would make a view, with its autograd metadata, at every call)
  const at::Tensor x2 = x.contiguous();
  const int64_t M = x2.numel() / K;
  const bool int8_act = g_int8_act.load(std::memory_order_relaxed);
  const int isa = active_isa();
  // bf16 activations as they came (exact in bf16): the Bf16Avx512 path's operand
  const uint16_t* xb = CSD_BF16 && x2.scalar_type() == at::kBFloat16 && isa == kAvx512Bf16 && !int8_act
                           ? reinterpret_cast<const uint16_t*>(x2.const_data_ptr<at::BFloat16>())
                           : nullptr;
  auto out_shape = [&](const Part& p) {
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = p.N;
    return shape;
  };
  if (into != nullptr) {
    TORCH_CHECK_VALUE(into->size() == nparts, who, ": ", into->size(), " outputs given for ", nparts, " weights");
    for (size_t i = 0; i < nparts; ++i) {
      const at::Tensor& o = (*into)[i];
      TORCH_CHECK_VALUE(o.sizes() == c10::IntArrayRef(out_shape(parts[i])) && o.scalar_type() == x.scalar_type() &&
                            o.is_contiguous() && o.device().is_cpu(),
                        who, ": output ", i, " must be a contiguous ", x.scalar_type(), " CPU tensor of shape ",
                        c10::IntArrayRef(out_shape(parts[i])), ", got ", o.scalar_type(), " ", o.sizes());
    }
  }
  std::vector<at::Tensor> outs;
  outs.reserve(nparts);
  const int64_t max_rows = xb != nullptr                    ? kMaxBf16Rows
                           : int8_act || isa == kScalar ? kMaxBlockedRows
                                                        : kMaxFloatRows;
  if (M > max_rows) {  // dequantize once (transposed), then a dense GEMM
    for (const Part& p : parts) {
      const Ctx wctx = p.context(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, M, K, G);
      auto wt = at::empty({K, p.N}, x2.options().dtype(at::kFloat));
      with_bits(p.b, [&](auto B) { dequant_t<B.value>(wctx, p.hi, p.lo, wt.data_ptr<float>()); });
      outs.push_back(at::linear(x2, wt.to(x.scalar_type()).t()).reshape(out_shape(p)));
      if (into != nullptr) outs.back() = (*into)[outs.size() - 1].copy_(outs.back());
    }
    return outs;
  }
  if (into != nullptr)
    outs = *into;
  else
    for (const Part& p : parts) outs.push_back(at::empty(out_shape(p), x.options()));
  if (M == 0) return outs;

  // Split K (at group boundaries) into ks parts when there are few row blocks, so that every thread
  // gets the same number of units (N = 192 is 3 blocks); the parts' partial sums are added below.
  int64_t nblocks = 0, total_n = 0;
  for (const Part& p : parts) nblocks += p.nblocks, total_n += p.N;
  const int64_t threads = at::get_num_threads();
  int64_t ks = 1;
  while (nblocks > 0 && threads > 1 && ks < G && (nblocks * ks) % threads != 0 && nblocks * ks < 8 * threads) ++ks;

  // activations in float32 and their per-group sums; raw loops into reused buffers (a handful of
  // ATen calls here would cost as much as the product itself at decode sizes)
  thread_local std::vector<float> xbuf, xsbuf, obuf;
  // every element is written before it is read; grown only (resize zero-fills what it adds: shrinking
  // to a layer's size and growing back to the LM head's 49152 outputs cost ~7 us per token)
  grow(xbuf, M * K);
  grow(xsbuf, M * G);
  grow(obuf, ks * M * total_n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x2.scalar_type(), "qlinear_cpu_in", [&] {
    const scalar_t* src = x2.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < M * K; ++i) xbuf[i] = static_cast<float>(src[i]);
  });
  // each group's sum in order (k = 0, 1, ...), 8 groups at a time: independent additions instead of
  // one chain of K dependent ones (~4 cycles each: about 2 us at K = 1536, before the threads start)
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g0 = 0; g0 < G; g0 += 8) {
      const int64_t ng = std::min<int64_t>(8, G - g0);
      const float* xg = xbuf.data() + m * K + g0 * gs;
      float acc[8] = {};
      for (int64_t k = 0; k < gs; ++k)
        for (int64_t j = 0; j < ng; ++j) acc[j] += xg[j * gs + k];
      for (int64_t j = 0; j < ng; ++j) xsbuf[m * G + g0 + j] = acc[j];
    }
  thread_local std::vector<int8_t> xqbuf;
  thread_local std::vector<float> xdbuf;
  thread_local std::vector<int32_t> xqsbuf;
  if (int8_act) {
    grow(xqbuf, M * K);
    grow(xdbuf, M * K / 32);
    grow(xqsbuf, M * K / 32);
    quantize_rows(xbuf.data(), M, K, xqbuf.data(), xdbuf.data(), xqsbuf.data());
  }
  int64_t units = 0, offset = 0;
  for (Part& p : parts) {
    p.ctx = p.context(xbuf.data(), xb, xsbuf.data(), xqbuf.data(), xdbuf.data(), xqsbuf.data(), M, K, G);
    p.unit = unit_for(isa, p.b, int8_act, xb != nullptr);
    p.op = obuf.data() + offset;
    offset += ks * M * p.N;
    p.first_unit = units;
    units += p.nblocks * ks;
  }

  const int64_t grain = total_n * K * M < kMinParallelWork ? std::max<int64_t>(units, 1) : 1;
  at::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) {
    alignas(64) float res[kMaxBf16Rows * kBlock];
    size_t i = 0;
    for (int64_t u = u0; u < u1; ++u) {
      while (u >= parts[i].first_unit + parts[i].nblocks * ks) ++i;
      const Part& p = parts[i];
      const int64_t local = u - p.first_unit, blk = local / ks, part = local % ks;
      std::memset(res, 0, sizeof(float) * M * kBlock);
      p.unit(p.ctx, p.hi + blk * K * 32, p.lo + blk * K * 32, blk * kBlock, G * part / ks, G * (part + 1) / ks, res);
      if (ks == 1)  // the block's outputs are whole: converted here, on the thread that has them
        write_columns(res, kBlock, M, p.N, blk * kBlock, (blk + 1) * kBlock, outs[i]);
      else
        for (int64_t m = 0; m < M; ++m)
          std::memcpy(p.op + (part * M + m) * p.N + blk * kBlock, res + m * kBlock, sizeof(float) * kBlock);
    }
  });
  for (size_t i = 0; i < nparts; ++i) {
    const Part& p = parts[i];
    const int64_t full = p.nblocks * kBlock;
    if (p.N > full)
      (int8_act ? tail_rows_i8 : tail_rows)(p.ctx, p.hi + full * K / 2, p.lo + full * K / 2, full, p.N - full,
                                            static_cast<int>(p.b), p.op, p.N);
    write_output(p, ks, M, outs[i], ks == 1 ? full : 0);
  }
  return outs;
}

at::Tensor qlinear_cpu(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scale,
                       const at::Tensor& zero, const at::Tensor& bits) {
  return qlinear_parts("csd::qlinear_cpu", x, {qdata}, {scale}, {zero}, {bits})[0];
}

std::vector<at::Tensor> qlinear_cpu_multi(const at::Tensor& x, at::TensorList qdata, at::TensorList scale,
                                          at::TensorList zero, at::TensorList bits) {
  return qlinear_parts("csd::qlinear_cpu_multi", x, qdata, scale, zero, bits);
}

std::string isa_name() { return kIsaNames[active_isa()]; }

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (int i = kScalar; i < kNumIsas; ++i)
    if (cpu_supports(i)) names.emplace_back(kIsaNames[i]);
  return names;
}

// Force a path (a name in kIsaNames) or go back to the best the CPU has ("auto"); returns
// the previous setting, so that a caller can restore it. A path this CPU cannot run is refused (it
// would die on an illegal instruction).
std::string set_isa(const std::string& name) {
  const int before = g_forced_isa.load();
  const std::string previous = before < 0 ? "auto" : kIsaNames[before];
  if (name == "auto") {
    g_forced_isa.store(-1);
    return previous;
  }
  int isa = -1;
  for (int i = kScalar; i < kNumIsas; ++i)
    if (name == kIsaNames[i]) isa = i;
  TORCH_CHECK_VALUE(isa >= 0, "csd::qlinear_cpu_set_isa: unknown instruction set '", name,
                    "'; choose one of 'auto', 'scalar', 'avx2', 'avx512', 'avx512vnni', 'avx512bf16'");
  TORCH_CHECK(cpu_supports(isa), "csd::qlinear_cpu_set_isa: this CPU cannot run the '", name, "' path (",
              isa == kAvx512Bf16   ? "it needs AVX-512F/BW/VL, AVX-512 VNNI, VBMI and BF16, FMA and F16C"
              : isa == kAvx512Vnni ? "it needs AVX-512F/BW/VL, AVX-512 VNNI, FMA and F16C"
              : isa == kAvx512   ? "it needs AVX-512F/BW/VL, FMA and F16C"
                                 : "it needs AVX2, FMA and F16C",
              ")");
  g_forced_isa.store(isa);
  return previous;
}

std::string activations_name() { return g_int8_act.load() ? "int8" : "float"; }

// "int8" (activations quantized per 32 features, byte-dot products) or "float" (exact float
// activations, float FMA); returns the previous setting.
std::string set_activations(const std::string& name) {
  TORCH_CHECK_VALUE(name == "int8" || name == "float", "csd::qlinear_cpu_set_activations: unknown mode '", name,
                    "'; choose 'int8' or 'float'");
  return g_int8_act.exchange(name == "int8") ? "int8" : "float";
}

}  // namespace

// for a replayed CPU graph (cpu_graph.cpp): the outputs written into the graph's own buffers
void qlinear_cpu_multi_into(const at::Tensor& x, at::TensorList qdata, at::TensorList scale, at::TensorList zero,
                            at::TensorList bits, const std::vector<at::Tensor>& outs) {
  qlinear_parts("csd::qlinear_cpu_multi", x, qdata, scale, zero, bits, &outs);
}
}  // namespace csd_cpu

TORCH_LIBRARY_FRAGMENT(csd, m) {
  m.def("qlinear_cpu_native(Tensor x, Tensor qdata, Tensor scale, Tensor zero, Tensor bits) -> Tensor");
  m.def("qlinear_cpu_multi_native(Tensor x, Tensor[] qdata, Tensor[] scale, Tensor[] zero, Tensor[] bits) -> Tensor[]");
  m.def("qlinear_cpu_isa() -> str", &csd_cpu::isa_name);
  m.def("qlinear_cpu_supported_isas() -> str[]", &csd_cpu::supported_isas);
  m.def("qlinear_cpu_set_isa(str isa) -> str", &csd_cpu::set_isa);
  m.def("qlinear_cpu_activations() -> str", &csd_cpu::activations_name);
  m.def("qlinear_cpu_set_activations(str mode) -> str", &csd_cpu::set_activations);
}

TORCH_LIBRARY_IMPL(csd, CPU, m) {
  m.impl("qlinear_cpu_native", &csd_cpu::qlinear_cpu);
  m.impl("qlinear_cpu_multi_native", &csd_cpu::qlinear_cpu_multi);
}

// The same kernel as a plain Python function, for the code Inductor's Python wrapper runs at every
// step (kernels/native.py registers the codegen): calling an op from Python goes through the
// dispatcher's boxed path (schema matching, an IValue stack), about 2-3 us per call, as much as a
// k/v projection's product at M = 1 and 200 calls per SmolLM2 token. Same checks, same kernel; it
// still shows as csd::qlinear_cpu_native in torch.profiler, with its input shapes (csd-compile
// profile finds the LM head by them). The GIL is released while it runs.
namespace csd_cpu {
at::Tensor decode_attention_direct(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                   const c10::optional<at::Tensor>& attn_mask, double scale);  // attention_cpu.cpp
void bind_cpu_graph(pybind11::module& m);                                                        // cpu_graph.cpp
}  // namespace csd_cpu

namespace {
at::Tensor qlinear_direct(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scale,
                          const at::Tensor& zero, const at::Tensor& bits) {
  // the inputs (their shapes) are built only when a profiler records them
  RECORD_FUNCTION("csd::qlinear_cpu_native", std::vector<c10::IValue>({x, qdata, scale, zero, bits}));
  return csd_cpu::qlinear_cpu(x, qdata, scale, zero, bits);
}

std::vector<at::Tensor> qlinear_multi_direct(const at::Tensor& x, const std::vector<at::Tensor>& qdata,
                                             const std::vector<at::Tensor>& scale, const std::vector<at::Tensor>& zero,
                                             const std::vector<at::Tensor>& bits) {
  RECORD_FUNCTION("csd::qlinear_cpu_multi_native", std::vector<c10::IValue>({x, qdata, scale, zero, bits}));
  return csd_cpu::qlinear_cpu_multi(x, qdata, scale, zero, bits);
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qlinear", &qlinear_direct, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "csd::qlinear_cpu_native(x, qdata, scale, zero, bits) without the dispatcher");
  m.def("qlinear_multi", &qlinear_multi_direct, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "csd::qlinear_cpu_multi_native(x, qdata, scale, zero, bits) without the dispatcher");
  m.def("decode_attention", &csd_cpu::decode_attention_direct, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "csd::decode_attention_cpu_native(query, key, value, attn_mask, scale) without the dispatcher");
  csd_cpu::bind_cpu_graph(m);
}
