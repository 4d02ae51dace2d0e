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
// and the inner loop multiplies activations by raw integer codes: for every k it expands the 64
// codes of a row block into floats once and feeds every activation row (up to four rows per pass,
// held in registers). A verify pass (M = K + 1 rows) thus reads the weight from memory once and
// decodes each 64-row tile once per four rows: the "dequantize a tile, then a small GEMM" shape.
// Many rows (prefill) dequantize the whole weight once and call a dense GEMM.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kBlock = 64;
constexpr int64_t kRowsPerPass = 4;
// past this many activation rows, dequantizing once and calling a dense GEMM is faster
constexpr int64_t kMaxBlockedRows = 16;

// The b-bit code from the high nibble h and low nibble l of an 8-bit code (scalar paths).
inline int rung_code(int h, int l, int bits) { return bits == 8 ? (h << 4) | l : h >> (4 - bits); }

// Per (row, group): the rung decodes code c to c * S + Z (see the top of the file).
struct RungAffine {
  float S, Z;
};
inline RungAffine rung_affine(float scale, float zero, float mult) {
  return {mult * scale, zero + 0.5f * (mult - 1.0f) * scale};
}

// GCC/Clang vector extensions: 16 lanes, lowered to AVX-512, AVX2 pairs or whatever the target has.
typedef float vf16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));
typedef uint8_t vb16 __attribute__((vector_size(16)));

inline vb16 load16(const uint8_t* p) {
  vb16 v;
  std::memcpy(&v, p, 16);
  return v;
}

inline vf16 to_float(vb16 b) { return __builtin_convertvector(__builtin_convertvector(b, vi16), vf16); }

// The 64 codes of one k in a full row block as four 16-lane float vectors (rows 0-15, 16-31, 32-47, 48-63).
template <int BITS>
inline void expand_codes(const uint8_t* hb, const uint8_t* lb, vf16* c) {
  const vb16 h0 = load16(hb), h1 = load16(hb + 16);
  if constexpr (BITS == 8) {
    const vb16 l0 = load16(lb), l1 = load16(lb + 16);
    c[0] = to_float(((h0 & 15) << 4) | (l0 & 15));
    c[1] = to_float(((h1 & 15) << 4) | (l1 & 15));
    c[2] = to_float((h0 & 0xF0) | (l0 >> 4));
    c[3] = to_float((h1 & 0xF0) | (l1 >> 4));
  } else {
    constexpr int shift = 4 - BITS;
    c[0] = to_float((h0 & 15) >> shift);
    c[1] = to_float((h1 & 15) >> shift);
    c[2] = to_float(h0 >> (4 + shift));
    c[3] = to_float(h1 >> (4 + shift));
  }
}

// One full row block (64 rows starting at n0) against MR activation rows.
template <int BITS, int MR>
void block_rows(const float* xf, const float* xsum, int64_t K, int64_t G, int64_t gs, const uint8_t* hi,
                const uint8_t* lo, const float* scale, const float* zero, int64_t n0, float* out, int64_t ldo) {
  constexpr float mult = static_cast<float>(1 << (8 - BITS));
  alignas(64) float res[MR][kBlock];
  std::memset(res, 0, sizeof(res));
  alignas(64) float S[kBlock], Z[kBlock];
  for (int64_t g = 0; g < G; ++g) {
    vf16 acc[MR][4];
    for (int m = 0; m < MR; ++m)
      for (int i = 0; i < 4; ++i) acc[m][i] = vf16{};
    for (int64_t k = g * gs; k < (g + 1) * gs; ++k) {
      vf16 c[4];
      expand_codes<BITS>(hi + k * 32, BITS == 8 ? lo + k * 32 : nullptr, c);
      for (int m = 0; m < MR; ++m) {
        const float xv = xf[m * K + k];
        for (int i = 0; i < 4; ++i) acc[m][i] += xv * c[i];
      }
    }
    for (int j = 0; j < kBlock; ++j) {
      const RungAffine a = rung_affine(scale[(n0 + j) * G + g], zero[(n0 + j) * G + g], mult);
      S[j] = a.S;
      Z[j] = a.Z;
    }
    for (int m = 0; m < MR; ++m) {
      alignas(64) float a[kBlock];
      std::memcpy(a, acc[m], sizeof(a));
      const float xs = xsum[m * G + g];
      for (int j = 0; j < kBlock; ++j) res[m][j] += S[j] * a[j] + Z[j] * xs;
    }
  }
  for (int m = 0; m < MR; ++m) std::memcpy(out + m * ldo + n0, res[m], sizeof(float) * kBlock);
}

template <int BITS>
void full_block(const float* xf, const float* xsum, int64_t M, int64_t K, int64_t G, int64_t gs,
                const uint8_t* hi, const uint8_t* lo, const float* scale, const float* zero, int64_t n0,
                float* out, int64_t ldo) {
  for (int64_t m0 = 0; m0 < M; m0 += kRowsPerPass) {
    const float* x = xf + m0 * K;
    const float* xs = xsum + m0 * G;
    float* o = out + m0 * ldo;
    switch (std::min<int64_t>(kRowsPerPass, M - m0)) {
      case 1: block_rows<BITS, 1>(x, xs, K, G, gs, hi, lo, scale, zero, n0, o, ldo); break;
      case 2: block_rows<BITS, 2>(x, xs, K, G, gs, hi, lo, scale, zero, n0, o, ldo); break;
      case 3: block_rows<BITS, 3>(x, xs, K, G, gs, hi, lo, scale, zero, n0, o, ldo); break;
      default: block_rows<BITS, 4>(x, xs, K, G, gs, hi, lo, scale, zero, n0, o, ldo); break;
    }
  }
}

// The b-bit code of row n (tail layout), feature k.
inline int tail_code(const uint8_t* hi_tail, const uint8_t* lo_tail, int64_t nt, int64_t i, int64_t k, int bits) {
  const int64_t byte = k * (nt / 2) + i / 2;
  const int sh = (i & 1) ? 4 : 0;
  return rung_code((hi_tail[byte] >> sh) & 15, (lo_tail[byte] >> sh) & 15, bits);
}

// Weight [N, K] in float of the b-bit rung.
void dequant_rows(const uint8_t* q, int64_t N, int64_t K, int64_t G, int64_t gs, const float* scale,
                  const float* zero, int bits, float* w) {
  const uint8_t* hi = q;
  const uint8_t* lo = q + N * K / 2;
  const int64_t full = N / kBlock * kBlock;
  const float mult = static_cast<float>(1 << (8 - bits));
  auto decode = [&](int64_t n, int64_t k, int code) {
    const RungAffine a = rung_affine(scale[n * G + k / gs], zero[n * G + k / gs], mult);
    w[n * K + k] = code * a.S + a.Z;
  };
  at::parallel_for(0, full / kBlock, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t k = 0; k < K; ++k) {
        const uint8_t* hb = hi + (b * K + k) * 32;
        const uint8_t* lb = lo + (b * K + k) * 32;
        for (int j = 0; j < 32; ++j) {
          decode(b * kBlock + j, k, rung_code(hb[j] & 15, lb[j] & 15, bits));
          decode(b * kBlock + j + 32, k, rung_code(hb[j] >> 4, lb[j] >> 4, bits));
        }
      }
    }
  });
  const int64_t nt = N - full;
  for (int64_t i = 0; i < nt; ++i)
    for (int64_t k = 0; k < K; ++k)
      decode(full + i, k, tail_code(hi + full * K / 2, lo + full * K / 2, nt, i, k, bits));
}

at::Tensor qlinear_cpu(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scale,
                       const at::Tensor& zero, const at::Tensor& bits) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && qdata.device().is_cpu() && scale.device().is_cpu() &&
                  zero.device().is_cpu() && bits.device().is_cpu(),
              "csd::qlinear_cpu: every argument must be a CPU tensor");
  TORCH_CHECK_TYPE(x.is_floating_point(), "csd::qlinear_cpu: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK_VALUE(qdata.scalar_type() == at::kByte && qdata.dim() == 3 && qdata.size(0) == 2,
              "csd::qlinear_cpu: qdata must be uint8 [2, N, K/2], got ", qdata.scalar_type(), " ", qdata.sizes());
  const int64_t N = qdata.size(1), K = 2 * qdata.size(2);
  TORCH_CHECK_VALUE(N % 2 == 0, "csd::qlinear_cpu: N must be even, got ", N);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == K, "csd::qlinear_cpu: x has shape ", x.sizes(),
              "; its last dim must be in_features=", K);
  TORCH_CHECK_VALUE(scale.scalar_type() == at::kFloat && zero.scalar_type() == at::kFloat && scale.dim() == 2 &&
                  scale.size(0) == N && scale.sizes() == zero.sizes() && scale.size(1) > 0 && K % scale.size(1) == 0,
              "csd::qlinear_cpu: scale ", scale.sizes(), " / zero ", zero.sizes(), " must be float32 [N=", N,
              ", K/group]");
  const int64_t G = scale.size(1), gs = K / G;
  TORCH_CHECK_VALUE(gs == 32 || gs == 64 || gs == 128, "csd::qlinear_cpu: group size ", gs, " is not one of 32, 64, 128");
  TORCH_CHECK_VALUE(bits.numel() == 1 && bits.dim() <= 1 && !bits.is_floating_point() && !bits.is_complex(),
              "csd::qlinear_cpu: bits must be a 0-d integer tensor, got ", bits.scalar_type(), " ", bits.sizes());
  const int64_t b = bits.reshape({}).item<int64_t>();  // a CPU tensor: no device sync
  TORCH_CHECK_VALUE(b == 2 || b == 3 || b == 4 || b == 8, "csd::qlinear_cpu: bits=", b,
              " is not supported; choose one of [2, 3, 4, 8]");

  // contiguous() and reshape() are free on the contiguous tensors a compiled graph passes in
  auto q = qdata.contiguous();
  auto sc = scale.contiguous();
  auto ze = zero.contiguous();
  auto x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  if (M == 0) return at::empty(out_shape, x.options());

  if (M > kMaxBlockedRows) {
    auto w = at::empty({N, K}, scale.options());
    dequant_rows(q.data_ptr<uint8_t>(), N, K, G, gs, sc.data_ptr<float>(), ze.data_ptr<float>(), b,
                 w.data_ptr<float>());
    return at::linear(x2, w.to(x.scalar_type())).reshape(out_shape);
  }

  // activations in float32 and their per-group sums; raw loops into reused buffers (a handful of
  // ATen calls here would cost as much as the product itself at decode sizes)
  thread_local std::vector<float> xbuf, xsbuf, obuf;
  xbuf.resize(M * K);
  xsbuf.resize(M * G);
  obuf.resize(M * N);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x2.scalar_type(), "qlinear_cpu_in", [&] {
    const scalar_t* src = x2.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < M * K; ++i) xbuf[i] = static_cast<float>(src[i]);
  });
  for (int64_t i = 0; i < M * G; ++i) {
    float acc = 0.f;
    for (int64_t k = 0; k < gs; ++k) acc += xbuf[i * gs + k];
    xsbuf[i] = acc;
  }
  const float* xp = xbuf.data();
  const float* xsp = xsbuf.data();
  const uint8_t* hi = q.data_ptr<uint8_t>();
  const uint8_t* lo = hi + N * K / 2;
  const float* sp = sc.data_ptr<float>();
  const float* zp = ze.data_ptr<float>();
  float* op = obuf.data();
  const int64_t nblocks = N / kBlock;

  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const uint8_t* hb = hi + blk * K * 32;
      const uint8_t* lb = lo + blk * K * 32;
      const int64_t n0 = blk * kBlock;
      switch (b) {
        case 8: full_block<8>(xp, xsp, M, K, G, gs, hb, lb, sp, zp, n0, op, N); break;
        case 4: full_block<4>(xp, xsp, M, K, G, gs, hb, lb, sp, zp, n0, op, N); break;
        case 3: full_block<3>(xp, xsp, M, K, G, gs, hb, lb, sp, zp, n0, op, N); break;
        default: full_block<2>(xp, xsp, M, K, G, gs, hb, lb, sp, zp, n0, op, N); break;
      }
    }
  });

  // rows past the last full block (N % 64 of them): plain loops
  const int64_t full = nblocks * kBlock, nt = N - full;
  if (nt) {
    const uint8_t* ht = hi + full * K / 2;
    const uint8_t* lt = lo + full * K / 2;
    const float mult = static_cast<float>(1 << (8 - b));
    for (int64_t i = 0; i < nt; ++i) {
      const int64_t n = full + i;
      for (int64_t m = 0; m < M; ++m) {
        float total = 0.f;
        for (int64_t g = 0; g < G; ++g) {
          float acc = 0.f;
          for (int64_t k = g * gs; k < (g + 1) * gs; ++k)
            acc += xp[m * K + k] * tail_code(ht, lt, nt, i, k, static_cast<int>(b));
          const RungAffine a = rung_affine(sp[n * G + g], zp[n * G + g], mult);
          total += a.S * acc + a.Z * xsp[m * G + g];
        }
        op[m * N + n] = total;
      }
    }
  }
  auto out = at::empty(out_shape, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "qlinear_cpu_out", [&] {
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < M * N; ++i) dst[i] = static_cast<scalar_t>(op[i]);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(csd, m) {
  m.def("qlinear_cpu_native(Tensor x, Tensor qdata, Tensor scale, Tensor zero, Tensor bits) -> Tensor");
}

TORCH_LIBRARY_IMPL(csd, CPU, m) { m.impl("qlinear_cpu_native", &qlinear_cpu); }
