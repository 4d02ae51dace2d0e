// CPU kernel of csd::decode_attention: out = softmax(q k^T * scale + mask) v for the few queries of
// a decode or verify step over a KV cache, reading only the cache slots the mask leaves open.
//
// Shapes: q [B, Hq, T, D]; k, v [B, Hkv, S, D] with Hq a multiple of Hkv (query head h reads cache
// head h / (Hq / Hkv): grouped-query attention without a repeated copy of the cache); the mask absent,
// bool (true: attend) or floating (added to the scores), broadcastable to [B, Hq, T, S]. Out
// [B, Hq, T, D] in q's dtype. Scores, softmax and sums in fp32, as the reference
// (csd_compile/kernels/attention.py: attention_ref).
//
// Why a kernel: a static KV cache (HF's StaticCache, the speculative engine's RowCache) is allocated
// for the longest sequence a call may reach, and a decode step attends over all of it with a mask
// that closes the slots not written yet. Written as tensor ops (what Inductor compiles), the step
// reads and multiplies every slot, so its cost grows with the cache's capacity rather than with the
// tokens so far. Here a slot the mask closes (false, or -inf) for every query row of a head is never
// read: the same result, since its probability is exactly zero. (A cache slot holding inf or NaN
// behind a closed mask therefore does not poison the output, where the tensor-op form gives NaN.)
//
// Work: one task per (batch row, key/value head), whose rows are the T queries of each query head
// that reads that cache head: each cache row is read and converted to fp32 once for all of them. Per
// task: the query rows in fp32, one pass over K computing the scores of the open slots, a softmax
// per row, one pass over V.
// A row whose every slot is closed gives NaN, as softmax over nothing does in the reference.
// The loops are plain C++ on GCC/Clang vector types of each path's width (16, 8 or 4 floats),
// compiled three times (AVX-512, AVX2+FMA, baseline) with target attributes and chosen at run time
// like the quantized kernel's (cpu_isa.h); exp is a polynomial the compiler vectorizes (below), not
// libm's scalar call.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"

namespace csd_cpu {
namespace {

#define CSD_INLINE inline __attribute__((always_inline))

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int kLanes = 16;  // chunk width of max_of's loop (the compiler vectorizes it)
// below this many multiply-adds (all heads, all open slots counted as open) one thread does the call
constexpr int64_t kMinParallelWork = 1 << 16;
// true: the general loops for every head size (csd::decode_attention_cpu_set_loops("general"), for
// A/B measurements and tests); false (the default): the register path for head sizes 64 and 128
std::atomic<bool> g_general_loops{false};

using u32_alias = uint32_t __attribute__((__may_alias__));

struct Problem {
  const void* q;
  const void* k;
  const void* v;
  const void* mask;  // bool (uint8) or float32, or null
  void* out;         // [B, Hq, T, D], contiguous
  int64_t B, Hq, Hkv, T, S, D;
  int64_t qs[3];  // strides of q's first three dims (its last is contiguous)
  int64_t ks[3];
  int64_t vs[3];
  int64_t ms[4];  // strides of the mask expanded to [B, Hq, T, S]
  float scale;
};

// One row of n values as fp32: a pointer to the row itself for fp32 input, else `buf` filled.
template <typename scalar_t>
CSD_INLINE const float* as_float(const scalar_t* src, float* buf, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return src;
  } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    const uint16_t* u = reinterpret_cast<const uint16_t*>(src);
    u32_alias* w = reinterpret_cast<u32_alias*>(buf);
    for (int64_t i = 0; i < n; ++i) w[i] = static_cast<uint32_t>(u[i]) << 16;  // bf16 is fp32's top half
    return buf;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);
    return buf;
  }
}

// fp32 lanes as GCC/Clang vectors: 16 for AVX-512 (one register), 8 for AVX2, 4 for the baseline
// (SSE2 on x86-64, NEON elsewhere). Each path runs the loops below on its own width.
typedef float v16f __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

template <typename V>
CSD_INLINE V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

// Sum of the lanes as a tree (halves added until one lane is left), in registers where the compiler
// has __builtin_shufflevector (Clang, GCC 12+), else through memory in the same order (same result).
#if !defined(CSD_NO_SHUFFLEVECTOR) && (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12))
CSD_INLINE float hsum(v4f v) {
  const v4f c = v + __builtin_shufflevector(v, v, 2, 3, 0, 1);
  return c[0] + c[1];
}
CSD_INLINE float hsum(v8f v) {
  return hsum(__builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7));
}
CSD_INLINE float hsum(v16f v) {
  return hsum(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
              __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
}
#else
template <typename V>
CSD_INLINE float hsum(V v) {
  constexpr int W = sizeof(V) / sizeof(float);
  float l[W];
  std::memcpy(l, &v, sizeof(V));
  for (int w = W / 2; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) l[j] += l[j + w];
  return l[0];
}
#endif

template <typename V>
CSD_INLINE float dot(const float* a, const float* b, int64_t n) {
  constexpr int W = sizeof(V) / sizeof(float);
  V acc = {};
  int64_t i = 0;
  for (; i + W <= n; i += W) acc += load<V>(a + i) * load<V>(b + i);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];  // n % W leftovers
  return s;
}

template <typename V>
CSD_INLINE float sum_of(const float* a, int64_t n) {
  constexpr int W = sizeof(V) / sizeof(float);
  V acc = {};
  int64_t i = 0;
  for (; i + W <= n; i += W) acc += load<V>(a + i);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i];
  return s;
}

CSD_INLINE float max_of(const float* a, int64_t n) {
  float lanes[kLanes];
  for (int j = 0; j < kLanes; ++j) lanes[j] = kNegInf;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lanes[j] = a[i + j] > lanes[j] ? a[i + j] : lanes[j];
  for (int j = 0; i < n; ++i, ++j) lanes[j] = a[i] > lanes[j] ? a[i] : lanes[j];
  float mx = lanes[0];
  for (int j = 1; j < kLanes; ++j) mx = lanes[j] > mx ? lanes[j] : mx;
  return mx;
}

CSD_INLINE void axpy(float* y, float a, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// exp(x) for x <= 0 (scores minus their maximum), to about 1 ulp: x = n ln2 + r with |r| <= ln2/2,
// exp(r) by its Taylor polynomial to degree 7 (remainder < 6e-9), 2^n built in the exponent bits.
// Branch-free, so the loops calling it vectorize; x < -87 (and -inf) gives 0.
CSD_INLINE float exp_nonpositive(float x) {
  const float xc = x < -87.0f ? -87.0f : x;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (xc * 1.44269504088896341f + shifter) - shifter;
  const float r = (xc - n * 0.693145751953125f) - n * 1.428606765330187e-06f;  // ln2 split hi + lo
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t e = static_cast<int32_t>(n) + 127;
  uint32_t bits = static_cast<uint32_t>(e) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  return x < -87.0f ? 0.f : p * two_n;
}

// The mask's values for one query row (its elements at `base + s * stride`, s < S) as additive
// fp32 terms in `dst`: 0 or -inf for a bool mask, 0 everywhere without one.
template <typename mask_t>
CSD_INLINE void mask_row(const Problem& pr, int64_t base, float* dst) {
  const int64_t S = pr.S, stride = pr.ms[3];
  if constexpr (std::is_same_v<mask_t, void>) {
    std::memset(dst, 0, S * sizeof(float));
  } else {
    const mask_t* m = static_cast<const mask_t*>(pr.mask) + base;
    if constexpr (std::is_same_v<mask_t, bool>) {
      const uint8_t* u = reinterpret_cast<const uint8_t*>(m);
      if (stride == 1)
        for (int64_t s = 0; s < S; ++s) dst[s] = u[s] ? 0.f : kNegInf;
      else
        for (int64_t s = 0; s < S; ++s) dst[s] = u[s * stride] ? 0.f : kNegInf;
    } else {
      if (stride == 1)
        std::memcpy(dst, m, S * sizeof(float));
      else
        for (int64_t s = 0; s < S; ++s) dst[s] = m[s * stride];
    }
  }
}

// One cache row of NV vectors (D = NV x the vector width) as fp32, in registers.
template <typename scalar_t, typename V, int NV>
CSD_INLINE void load_row(const scalar_t* src, V (&out)[NV]) {
  constexpr int W = sizeof(V) / sizeof(float);
  for (int j = 0; j < NV; ++j) {
    float f[W];
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      const uint16_t* u = reinterpret_cast<const uint16_t*>(src) + j * W;
      u32_alias* w = reinterpret_cast<u32_alias*>(f);
      for (int i = 0; i < W; ++i) w[i] = static_cast<uint32_t>(u[i]) << 16;
    } else {
      for (int i = 0; i < W; ++i) f[i] = static_cast<float>(src[j * W + i]);
    }
    std::memcpy(&out[j], f, sizeof(V));
  }
}

// The K and V passes of query rows [r0, r0 + RB) with the head size a whole number NV of vectors:
// those rows' query vectors (K pass) and output sums (V pass) stay in registers while each open
// cache row is read once, converted in registers. (The general loops below convert every cache row
// through memory, reduce each score separately and add into the sums in memory: on AMD Zen 4 a
// SmolLM2 decode call, 3 x 3 query rows of 64 over 100-1500 open slots, took 2.1-2.4x the time.)
template <typename scalar_t, typename V, int NV, int RB>
CSD_INLINE void k_rows(const float* qf, float* sc, const uint8_t* open, const scalar_t* Kh, int64_t kstride,
                       int64_t S, int64_t r0, float scale) {
  constexpr int W = sizeof(V) / sizeof(float);
  V q[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < NV; ++j) q[r][j] = load<V>(qf + (r0 + r) * NV * W + j * W);
  for (int64_t s = 0; s < S; ++s) {
    if (!open[s]) continue;
    V k[NV];
    load_row<scalar_t, V, NV>(Kh + s * kstride, k);
    for (int r = 0; r < RB; ++r) {
      V a = q[r][0] * k[0];
      for (int j = 1; j < NV; ++j) a += q[r][j] * k[j];
      float& x = sc[(r0 + r) * S + s];
      if (x != kNegInf) x += hsum(a) * scale;
    }
  }
}

template <typename scalar_t, typename V, int NV, int RB>
CSD_INLINE void v_rows(const float* sc, const float* inv, const uint8_t* open, const scalar_t* Vh, int64_t vstride,
                       int64_t S, int64_t r0, float* acc) {
  constexpr int W = sizeof(V) / sizeof(float);
  V o[RB][NV] = {};
  for (int64_t s = 0; s < S; ++s) {
    if (!open[s]) continue;
    V v[NV];
    load_row<scalar_t, V, NV>(Vh + s * vstride, v);
    for (int r = 0; r < RB; ++r) {
      const float e = sc[(r0 + r) * S + s];
      if (e != 0.f)
        for (int j = 0; j < NV; ++j) o[r][j] += e * v[j];
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < NV; ++j) {
      const V scaled = o[r][j] * inv[r0 + r];
      std::memcpy(acc + (r0 + r) * NV * W + j * W, &scaled, sizeof(V));
    }
}

// Query rows by blocks of RB (registers: RB x NV query or sum vectors), the rest as one block.
template <int N, typename F>
CSD_INLINE void last_block(int64_t left, int64_t r0, F& f) {
  if (left == N)
    f(std::integral_constant<int, N>{}, r0);
  else if constexpr (N > 1)
    last_block<N - 1>(left, r0, f);
}

template <int RB, typename F>
CSD_INLINE void row_blocks(int64_t R, F&& f) {
  int64_t r0 = 0;
  for (; r0 + RB <= R; r0 += RB) f(std::integral_constant<int, RB>{}, r0);
  if constexpr (RB > 1)
    if (R > r0) last_block<RB - 1>(R - r0, r0, f);
}

// query rows per block: rb at up to 4 vectors per row, fewer for wider rows (registers hold ~4 rb)
constexpr int rows_per_block(int rb, int nv) { return 4 * rb / nv < 1 ? 1 : 4 * rb / nv > rb ? rb : 4 * rb / nv; }

// Tasks [task0, task1): task = b * Hkv + key/value head; its rows are the T queries of each of the
// Hq / Hkv query heads that read this cache head (row r = g * T + t, query head hk * group + g).
template <typename scalar_t, typename mask_t, typename Vec>
CSD_INLINE void attend(const Problem& pr, int64_t task0, int64_t task1, float* buf, uint8_t* open) {
  constexpr int W = sizeof(Vec) / sizeof(float);
  // registers: RB query (K pass) or sum (V pass) rows of NV vectors each, NV = D / W
  constexpr int RB = W == 16 ? 4 : 2;
  const int64_t T = pr.T, S = pr.S, D = pr.D, group = pr.Hq / pr.Hkv, R = group * T;
  float* qf = buf;           // [R, D]  the query rows in fp32
  float* sc = qf + R * D;    // [R, S]  scores, then exp(score - max)
  float* row = sc + R * S;   // [D]     one cache row in fp32
  float* acc = row + D;      // [R, D]  sum of exp * v, then times inv
  float* inv = acc + R * D;  // [R]     1 / sum of exp (NaN for a row with no open slot)
  const scalar_t* Q = static_cast<const scalar_t*>(pr.q);
  const scalar_t* K = static_cast<const scalar_t*>(pr.k);
  const scalar_t* V = static_cast<const scalar_t*>(pr.v);
  scalar_t* O = static_cast<scalar_t*>(pr.out);
  // the register path for the common head sizes 64 and 128; other sizes run the general loops
  const int nv = (D == 64 || D == 128) && !g_general_loops.load(std::memory_order_relaxed) ? static_cast<int>(D / W) : 0;
  auto with_nv = [&](auto&& f) {
    if (D == 64)
      f(std::integral_constant<int, 64 / W>{});
    else
      f(std::integral_constant<int, 128 / W>{});
  };
  for (int64_t task = task0; task < task1; ++task) {
    const int64_t b = task / pr.Hkv, hk = task % pr.Hkv, h0 = hk * group;
    for (int64_t r = 0; r < R; ++r) {
      const scalar_t* src = Q + b * pr.qs[0] + (h0 + r / T) * pr.qs[1] + (r % T) * pr.qs[2];
      const float* f = as_float(src, qf + r * D, D);
      if (f != qf + r * D) std::memcpy(qf + r * D, f, D * sizeof(float));
    }
    // the mask's terms, and the slots open for some row; a slot closed for every row is not read
    std::memset(open, 0, S);
    for (int64_t r = 0; r < R; ++r) {
      float* x = sc + r * S;
      mask_row<mask_t>(pr, b * pr.ms[0] + (h0 + r / T) * pr.ms[1] + (r % T) * pr.ms[2], x);
      for (int64_t s = 0; s < S; ++s) open[s] |= x[s] != kNegInf;
    }
    const scalar_t* Kh = K + b * pr.ks[0] + hk * pr.ks[1];
    const scalar_t* Vh = V + b * pr.vs[0] + hk * pr.vs[1];
    if (nv != 0) {
      with_nv([&](auto NV) {
        row_blocks<rows_per_block(RB, NV.value)>(
            R, [&](auto rb, int64_t r0) {
              k_rows<scalar_t, Vec, NV.value, rb.value>(qf, sc, open, Kh, pr.ks[2], S, r0, pr.scale);
            });
      });
    } else {
      for (int64_t s = 0; s < S; ++s) {
        if (!open[s]) continue;
        const float* kr = as_float(Kh + s * pr.ks[2], row, D);
        for (int64_t r = 0; r < R; ++r)
          if (sc[r * S + s] != kNegInf) sc[r * S + s] += dot<Vec>(qf + r * D, kr, D) * pr.scale;
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      float* x = sc + r * S;
      const float mx = max_of(x, S);
      if (mx == kNegInf) {  // nothing open: softmax over nothing
        inv[r] = std::numeric_limits<float>::quiet_NaN();
        std::memset(x, 0, S * sizeof(float));
        continue;
      }
      for (int64_t s = 0; s < S; ++s) x[s] = exp_nonpositive(x[s] - mx);  // closed: exp(-inf) = 0
      inv[r] = 1.f / sum_of<Vec>(x, S);
    }
    if (nv != 0) {
      with_nv([&](auto NV) {
        row_blocks<rows_per_block(RB, NV.value)>(
            R, [&](auto rb, int64_t r0) {
              v_rows<scalar_t, Vec, NV.value, rb.value>(sc, inv, open, Vh, pr.vs[2], S, r0, acc);
            });
      });
    } else {
      std::memset(acc, 0, R * D * sizeof(float));
      for (int64_t s = 0; s < S; ++s) {
        if (!open[s]) continue;
        const float* vr = as_float(Vh + s * pr.vs[2], row, D);
        for (int64_t r = 0; r < R; ++r) {
          const float e = sc[r * S + s];
          if (e != 0.f) axpy(acc + r * D, e, vr, D);
        }
      }
      for (int64_t r = 0; r < R; ++r)
        for (int64_t d = 0; d < D; ++d) acc[r * D + d] *= inv[r];
    }
    for (int64_t r = 0; r < R; ++r) {  // out [B, Hq, T, D]: rows of one head are consecutive
      scalar_t* dst = O + ((b * pr.Hq + h0 + r / T) * T + r % T) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(acc[r * D + d]);
    }
  }
}

// The three paths, one struct each (the build test finds the wide-register functions by these names).
struct Scalar {
  template <typename scalar_t, typename mask_t>
  static void attend_tasks(const Problem& pr, int64_t t0, int64_t t1, float* buf, uint8_t* open) {
    attend<scalar_t, mask_t, v4f>(pr, t0, t1, buf, open);
  }
};

#if CSD_X86
struct Avx2 {
  template <typename scalar_t, typename mask_t>
  CSD_TARGET_AVX2 static void attend_tasks(const Problem& pr, int64_t t0, int64_t t1, float* buf, uint8_t* open) {
    attend<scalar_t, mask_t, v8f>(pr, t0, t1, buf, open);
  }
};

struct Avx512 {
  template <typename scalar_t, typename mask_t>
  CSD_TARGET_AVX512 static void attend_tasks(const Problem& pr, int64_t t0, int64_t t1, float* buf, uint8_t* open) {
    attend<scalar_t, mask_t, v16f>(pr, t0, t1, buf, open);
  }
};
#endif

template <typename scalar_t, typename mask_t>
void run(const Problem& pr) {
  using Fn = void (*)(const Problem&, int64_t, int64_t, float*, uint8_t*);
  Fn fn = &Scalar::attend_tasks<scalar_t, mask_t>;
#if CSD_X86
  const int isa = active_isa();
  if (isa >= kAvx512)
    fn = &Avx512::attend_tasks<scalar_t, mask_t>;
  else if (isa == kAvx2)
    fn = &Avx2::attend_tasks<scalar_t, mask_t>;
#endif
  const int64_t tasks = pr.B * pr.Hkv, rows = pr.Hq / pr.Hkv * pr.T;
  const int64_t per_task = std::max<int64_t>(1, 2 * rows * pr.S * pr.D);
  const int64_t grain = std::max<int64_t>(1, kMinParallelWork / per_task);
  const int64_t floats = 2 * rows * pr.D + rows * pr.S + pr.D + rows;
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf(floats);
    std::vector<uint8_t> open(pr.S);
    fn(pr, t0, t1, buf.data(), open.data());
  });
}

template <typename scalar_t>
void run_masked(const Problem& pr, const c10::optional<at::Tensor>& mask) {
  if (!mask.has_value())
    run<scalar_t, void>(pr);
  else if (mask->scalar_type() == at::kBool)
    run<scalar_t, bool>(pr);
  else
    run<scalar_t, float>(pr);
}

// ``into``: the output to write (a replayed CPU graph's buffer, csd_compile/cpu_graph.py); nullptr
// allocates it.
at::Tensor decode_attention_impl(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                 const c10::optional<at::Tensor>& attn_mask, double scale, const at::Tensor* into) {
  TORCH_CHECK_VALUE(query.dim() == 4 && key.dim() == 4 && value.dim() == 4,
                    "csd::decode_attention: query, key and value must be 4-d [B, H, T|S, D], got ",
                    query.sizes(), ", ", key.sizes(), ", ", value.sizes());
  TORCH_CHECK_VALUE(query.device().is_cpu() && key.device().is_cpu() && value.device().is_cpu(),
                    "csd::decode_attention_cpu_native: CPU tensors only");
  const auto dtype = query.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                    "csd::decode_attention: query must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK_VALUE(key.scalar_type() == dtype && value.scalar_type() == dtype,
                    "csd::decode_attention: key and value must have query's dtype ", dtype, ", got ",
                    key.scalar_type(), " and ", value.scalar_type());
  const int64_t B = query.size(0), Hq = query.size(1), T = query.size(2), D = query.size(3);
  const int64_t Hkv = key.size(1), S = key.size(2);
  TORCH_CHECK_VALUE(key.size(0) == B && key.size(3) == D && value.sizes() == key.sizes(),
                    "csd::decode_attention: key and value must be [B, Hkv, S, D] = [", B, ", Hkv, S, ", D,
                    "], got ", key.sizes(), " and ", value.sizes());
  TORCH_CHECK_VALUE(Hkv >= 1 && Hq % Hkv == 0, "csd::decode_attention: query heads (", Hq,
                    ") must be a multiple of key/value heads (", Hkv, ")");
  TORCH_CHECK_VALUE(S >= 1, "csd::decode_attention: the cache must have at least one slot, got S = 0");
  const at::Tensor q = query.stride(3) == 1 ? query : query.contiguous();
  const at::Tensor k = key.stride(3) == 1 ? key : key.contiguous();
  const at::Tensor v = value.stride(3) == 1 ? value : value.contiguous();
  at::Tensor m;
  if (attn_mask.has_value()) {
    const auto mt = attn_mask->scalar_type();
    TORCH_CHECK_VALUE(mt == at::kBool || at::isFloatingType(mt),
                      "csd::decode_attention: attn_mask must be bool or floating point, got ", mt);
    TORCH_CHECK_VALUE(attn_mask->dim() <= 4, "csd::decode_attention: attn_mask must broadcast to [B, Hq, T, S] = [",
                      B, ", ", Hq, ", ", T, ", ", S, "], got ", attn_mask->sizes());
    m = (mt == at::kBool || mt == at::kFloat) ? *attn_mask : attn_mask->to(at::kFloat);
    m = m.expand({B, Hq, T, S});  // raises for a mask that does not broadcast
  }
  at::Tensor out;
  if (into != nullptr) {
    TORCH_CHECK_VALUE(into->sizes() == c10::IntArrayRef({B, Hq, T, D}) && into->scalar_type() == dtype &&
                          into->is_contiguous() && into->device().is_cpu(),
                      "csd::decode_attention: the output must be a contiguous ", dtype, " CPU tensor [", B, ", ", Hq,
                      ", ", T, ", ", D, "], got ", into->scalar_type(), " ", into->sizes());
    out = *into;
  } else {
    out = at::empty({B, Hq, T, D}, q.options());
  }
  if (out.numel() == 0) return out;
  Problem pr{};
  pr.q = q.const_data_ptr();
  pr.k = k.const_data_ptr();
  pr.v = v.const_data_ptr();
  pr.mask = m.defined() ? m.const_data_ptr() : nullptr;
  pr.out = out.mutable_data_ptr();
  pr.B = B, pr.Hq = Hq, pr.Hkv = Hkv, pr.T = T, pr.S = S, pr.D = D;
  for (int i = 0; i < 3; ++i) pr.qs[i] = q.stride(i), pr.ks[i] = k.stride(i), pr.vs[i] = v.stride(i);
  if (m.defined())
    for (int i = 0; i < 4; ++i) pr.ms[i] = m.stride(i);
  pr.scale = static_cast<float>(scale);
  const c10::optional<at::Tensor> mask_opt = m.defined() ? c10::optional<at::Tensor>(m) : c10::nullopt;
  if (dtype == at::kFloat)
    run_masked<float>(pr, mask_opt);
  else if (dtype == at::kBFloat16)
    run_masked<at::BFloat16>(pr, mask_opt);
  else
    run_masked<at::Half>(pr, mask_opt);
  return out;
}

at::Tensor decode_attention_cpu(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                const c10::optional<at::Tensor>& attn_mask, double scale) {
  return decode_attention_impl(query, key, value, attn_mask, scale, nullptr);
}

std::string loops_name() { return g_general_loops.load() ? "general" : "registers"; }

std::string set_loops(const std::string& name) {
  TORCH_CHECK_VALUE(name == "registers" || name == "general", "csd::decode_attention_cpu_set_loops: unknown loops '",
                    name, "', expected 'registers' or 'general'");
  return g_general_loops.exchange(name == "general") ? "general" : "registers";
}

}  // namespace

// for the direct (dispatcher-free) entry of the extension module (qlinear_cpu.cpp)
at::Tensor decode_attention_direct(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                   const c10::optional<at::Tensor>& attn_mask, double scale) {
  RECORD_FUNCTION("csd::decode_attention_cpu_native",
                  std::vector<c10::IValue>({query, key, value, attn_mask, scale}));
  return decode_attention_cpu(query, key, value, attn_mask, scale);
}

// for a replayed CPU graph (cpu_graph.cpp): the output written into the graph's own buffer
void decode_attention_into(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                           const c10::optional<at::Tensor>& attn_mask, double scale, const at::Tensor& out) {
  decode_attention_impl(query, key, value, attn_mask, scale, &out);
}

}  // namespace csd_cpu

TORCH_LIBRARY_FRAGMENT(csd, m) {
  m.def("decode_attention_cpu_native(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, float scale) -> Tensor");
  m.def("decode_attention_cpu_loops() -> str", &csd_cpu::loops_name);
  m.def("decode_attention_cpu_set_loops(str loops) -> str", &csd_cpu::set_loops);
}

TORCH_LIBRARY_IMPL(csd, CPU, m) { m.impl("decode_attention_cpu_native", &csd_cpu::decode_attention_cpu); }
