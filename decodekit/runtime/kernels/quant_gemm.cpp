// Small-M GEMM on GGUF-quantized weights: y[M, N] = x[M, K] @ w[N, K]^T (+ bias), x and y float32.
//
// The weights stay quantized, in blocks of 32 consecutive k of one output row with a scale d (and for some kinds
// a min m; Q6_K has one scale per half block), rearranged for the vector units. Six kernel forms, by the kind
// number the caller passes (decodekit/runtime/cpu.py maps the GGUF types onto them; Q5_0 is stored as Q8_0):
//     kind  form  integers q                          scales, mins (per block)   w =
//     0     Q4_0  4 bits, 0..15                       fp16 d                     d (q - 8)
//     1     Q4_1  4 bits, 0..15                       fp16 d, m                  d q + m
//     2     Q8_0  8 bits, signed                      fp16 d                     d q
//     3     Q4_K  4 bits, 0..15                       float d, m                 d q + m
//     4     Q5_K  8 bits, 0..31                       float d, m                 d q + m
//     5     Q6_K  8 bits, -32..31                     float d per 16 k           d q
// (a K-quant's super-block scale times its 6-bit sub-block scale, and min, is exact in float: one rounding less
// than none at all.) Layout:
//   * qs [P, K / 32, B] uint8: panel p holds the outputs 16 p .. 16 p + 15 (zero past N); block b of the panel is
//     the 8 groups of 4 consecutive k of block b, group g as 64 bytes: output i's 4 values at bytes 4 i .. 4 i + 3.
//     4-bit forms (B = 256): the 64 bytes c (c = 0..3) hold group 2 c in their low nibbles and group 2 c + 1 in
//     their high nibbles. 8-bit forms (B = 512): group g is bytes 64 g .. 64 g + 63, as q + 128.
//   * scales [P, K / 32, H, 16] (H = 2 for Q6_K, else 1), mins [P, K / 32, 16]: output i's block b.
// So a panel's block is read as 4 (or 8) vector loads, unpacked once, and used for every row of x.
//
// x is quantized per row like llama.cpp's Q8 activations: each block of 32 k gets d_x = max|x| / 127 and
// q_x = round(x / d_x) in -127..127. The dot product of a block (or half block) is then an exact integer
//     s = sum_k q[k] q_x[k]
// computed with vpdpbusd (AVX-512 VNNI) or vpmaddubsw + vpmaddwd (AVX2), less the offset times sum q_x where the
// unit needs an unsigned weight: integer sums, so the order in which the vector units add them does not matter.
// Each y[m, n] is then this fixed sequence of float operations:
//     acc = 0;  for b = 0 .. K/32 - 1:  for each half h (Q6_K) or the whole block:
//                                           acc = fma(d_w[n, b, h] * d_x[m, b], float(s), acc)
//                                       (with mins:) acc = fma(m_w[n, b], d_x[m, b] * float(sum_k q_x[m, k]), acc)
//     y = acc (+ bias[n])
// which depends on row m of x alone: a row's result is bitwise the same whatever M is, whatever the other rows,
// the thread or the ISA path (the AVX2 and AVX-512 paths give the same bits). Build without -ffast-math.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "registration.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>
#include <type_traits>
#include <vector>

namespace {

constexpr int QK = 32;  // k per block
constexpr int NR = 16;  // outputs per panel
constexpr int GROUPS = QK / 4;

enum Kind : int64_t { Q4_0 = 0, Q4_1 = 1, Q8_0 = 2, Q4_K = 3, Q5_K = 4, Q6_K = 5, KINDS = 6 };

template <int64_t KIND>
struct Form {
  static constexpr bool wide = KIND == Q8_0 || KIND == Q5_K || KIND == Q6_K;  // 8-bit integers (else 4-bit)
  static constexpr bool f32 = KIND == Q4_K || KIND == Q5_K || KIND == Q6_K;   // float scales (else fp16)
  static constexpr bool mins = KIND == Q4_1 || KIND == Q4_K || KIND == Q5_K;
  static constexpr int halves = KIND == Q6_K ? 2 : 1;  // scales per block
  static constexpr int64_t bytes = wide ? NR * QK : NR * QK / 2;  // of qs per panel block
  // subtracted, times sum q_x, from the unit's integer sum: Q4_0's 8; the 128 of the 8-bit forms' storage on the
  // VNNI path (vpdpbusd takes them unsigned; the AVX2 path flips them back to signed bytes instead)
  static constexpr int32_t offset(bool vnni) { return KIND == Q4_0 ? 8 : wide && vnni ? 128 : 0; }
};

// Form<KIND>'s facts, for a kind known at run time.
struct FormInfo {
  int64_t bytes, halves;
  bool f32, mins;
};
template <int64_t KIND>
constexpr FormInfo info() {
  return {Form<KIND>::bytes, Form<KIND>::halves, Form<KIND>::f32, Form<KIND>::mins};
}
constexpr FormInfo kForms[KINDS] = {info<Q4_0>(), info<Q4_1>(), info<Q8_0>(), info<Q4_K>(), info<Q5_K>(), info<Q6_K>()};

// x quantized per row and block (AVX2 code, the same for every path).
struct QuantizedX {
  std::vector<int8_t> q;     // [M, K]
  std::vector<float> d;      // [M, K / 32]
  std::vector<float> dsum;   // [M, K / 32]: d * float(sum of the block's q)
  std::vector<int32_t> sum;  // [M, K / 32, 2]: sum of q over each half block
};

// One row's blocks, 8 floats at a time: max, the divide, the products and round-half-even are exact per element,
// so this is bitwise the scalar definition (d = max|x| / 127, q = nearbyint(x * (1 / d)) clamped to +-127).
void quantize_row(const float* x, int64_t nb, int8_t* q, float* d, float* dsum, int32_t* sum) {
  const __m256 sign = _mm256_set1_ps(-0.0f), lim = _mm256_set1_ps(127.0f);
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * QK;
    __m256 v[4], amax = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) {
      v[j] = _mm256_loadu_ps(xb + 8 * j);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, amax);
    float m = 0.0f;
    for (float lane : lanes) m = std::max(m, lane);
    const float db = m / 127.0f;
    const __m256 id = _mm256_set1_ps(db != 0.0f ? 1.0f / db : 0.0f);
    int32_t half[2] = {0, 0};
    for (int j = 0; j < 4; ++j) {
      __m256 r = _mm256_round_ps(_mm256_mul_ps(v[j], id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      r = _mm256_min_ps(lim, _mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), lim), r));
      const __m256i i32 = _mm256_cvtps_epi32(r);
      alignas(32) int32_t parts[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(parts), i32);
      for (int32_t part : parts) half[j / 2] += part;
      const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(q + b * QK + 8 * j), _mm_packs_epi16(i16, i16));
    }
    d[b] = db;
    dsum[b] = db * static_cast<float>(half[0] + half[1]);
    sum[2 * b] = half[0];
    sum[2 * b + 1] = half[1];
  }
}

QuantizedX quantize_x(const float* x, int64_t M, int64_t K) {
  const int64_t nb = K / QK;
  QuantizedX out{std::vector<int8_t>(M * K), std::vector<float>(M * nb), std::vector<float>(M * nb),
                 std::vector<int32_t>(M * nb * 2)};
  at::parallel_for(0, M, std::max<int64_t>(1, 4096 / K), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      quantize_row(x + m * K, nb, out.q.data() + m * K, out.d.data() + m * nb, out.dsum.data() + m * nb,
                   out.sum.data() + m * nb * 2);
  });
  return out;
}

// The 4 quantized x of group g as one int32.
inline int32_t group_of(const int8_t* xq, int g) {
  int32_t v;
  std::memcpy(&v, xq + 4 * g, sizeof v);
  return v;
}

// The integer to subtract from half h's (or, h < 0, the whole block's) raw sum: offset times its sum of q_x.
inline int32_t correction(const QuantizedX& xq, int64_t mb, int h, int32_t offset) {
  const int32_t* s = xq.sum.data() + 2 * mb;
  return offset * (h < 0 ? s[0] + s[1] : s[h]);
}

template <typename S>
inline __m256 load8_scales(const S* p) {
  if constexpr (sizeof(S) == 2)
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  else
    return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
}

// Panel p's results acc [M, 16] into y [M, N] (the outputs that exist), plus the bias.
void store_panel(const float* acc, int64_t M, int64_t N, const float* bias, float* y, int64_t p) {
  const int64_t n = p * NR;
  const int nvalid = static_cast<int>(std::min<int64_t>(NR, N - n));
  for (int64_t m = 0; m < M; ++m)
    for (int i = 0; i < nvalid; ++i) y[m * N + n + i] = bias != nullptr ? acc[m * NR + i] + bias[n + i] : acc[m * NR + i];
}

// ---- AVX2: 8 outputs per ymm, each half of the panel's unpacked block kept in registers -----------------------

// Rows m .. m + R - 1 of x against block b's unpacked half w (outputs 8 h .. 8 h + 7: dw, mw their scales and
// mins), added into their accumulators acc_h + r * NR. The R rows run side by side (independent chains, the
// block's |q| shared), each with exactly the integer sums and float operations it has alone.
template <int64_t KIND, int R>
inline void rows_avx2(const QuantizedX& xq, int64_t m, int64_t b, int64_t nb, int64_t K, const __m256i* w,
                      const __m256* dw, __m256 mw, float* acc_h) {
  using F = Form<KIND>;
  constexpr int32_t offset = F::offset(false);
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* xr[R];
  for (int r = 0; r < R; ++r) xr[r] = xq.q.data() + (m + r) * K + b * QK;
  __m256i s[R][F::halves];
  if constexpr (F::wide) {  // |q| * (q_x * sign q): pairs stay within int16, no saturation
    for (int half = 0; half < F::halves; ++half) {
#pragma GCC unroll 2
      for (int r = 0; r < R; ++r) s[r][half] = _mm256_setzero_si256();
      for (int g = half * GROUPS / F::halves; g < (half + 1) * GROUPS / F::halves; ++g) {
        const __m256i magnitude = _mm256_abs_epi8(w[g]);
#pragma GCC unroll 2
        for (int r = 0; r < R; ++r) {
          const __m256i xv = _mm256_set1_epi32(group_of(xr[r], g));
          const __m256i pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(xv, w[g]));
          s[r][half] = _mm256_add_epi32(s[r][half], _mm256_madd_epi16(pairs, ones));
        }
      }
    }
  } else {  // 8 groups of int16 pair sums, each at most 2 * 15 * 127: their sum fits int16
    __m256i s16[R];
#pragma GCC unroll 2
    for (int r = 0; r < R; ++r) s16[r] = _mm256_setzero_si256();
    for (int g = 0; g < GROUPS; ++g)
#pragma GCC unroll 2
      for (int r = 0; r < R; ++r)
        s16[r] = _mm256_add_epi16(s16[r], _mm256_maddubs_epi16(w[g], _mm256_set1_epi32(group_of(xr[r], g))));
#pragma GCC unroll 2
    for (int r = 0; r < R; ++r) {
      s[r][0] = _mm256_madd_epi16(s16[r], ones);
      if constexpr (offset != 0)
        s[r][0] = _mm256_sub_epi32(s[r][0], _mm256_set1_epi32(correction(xq, (m + r) * nb + b, -1, offset)));
    }
  }
#pragma GCC unroll 2
  for (int r = 0; r < R; ++r) {
    float* a = acc_h + r * NR;
    __m256 av = _mm256_loadu_ps(a);
    const __m256 dx = _mm256_set1_ps(xq.d[(m + r) * nb + b]);
    for (int half = 0; half < F::halves; ++half)
      av = _mm256_fmadd_ps(_mm256_mul_ps(dw[half], dx), _mm256_cvtepi32_ps(s[r][half]), av);
    if constexpr (F::mins) av = _mm256_fmadd_ps(mw, _mm256_set1_ps(xq.dsum[(m + r) * nb + b]), av);
    _mm256_storeu_ps(a, av);
  }
}

// Panels [p0, p1): y[m, 16 p + i] for every m. S: the scales' storage (uint16_t for fp16, float).
template <int64_t KIND, typename S>
void panels_avx2(const QuantizedX& xq, int64_t M, int64_t K, const uint8_t* qs, const S* scales, const S* mins,
                 int64_t N, const float* bias, float* y, int64_t p0, int64_t p1) {
  using F = Form<KIND>;
  const int64_t nb = K / QK;
  std::vector<float> acc(M * NR);
  const __m256i low = _mm256_set1_epi8(0x0F), flip = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int64_t p = p0; p < p1; ++p) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = qs + (p * nb + b) * F::bytes;
      if (p + 1 < p1)  // the next panel's block b, one panel ahead
        for (int l = 0; l < F::bytes; l += 64) _mm_prefetch(reinterpret_cast<const char*>(blk + nb * F::bytes + l), _MM_HINT_T0);
      const int64_t mb0 = (p * nb + b) * F::halves * NR;
      for (int h = 0; h < 2; ++h) {  // outputs 8 h .. 8 h + 7
        __m256i w[GROUPS];
        if constexpr (F::wide) {  // back to the signed q: the sign trick needs it
          for (int g = 0; g < GROUPS; ++g)
            w[g] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 64 * g + 32 * h)), flip);
        } else {
          for (int c = 0; c < GROUPS / 2; ++c) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 64 * c + 32 * h));
            w[2 * c] = _mm256_and_si256(v, low);
            w[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
          }
        }
        __m256 dw[F::halves];
        for (int s = 0; s < F::halves; ++s) dw[s] = load8_scales(scales + mb0 + s * NR + 8 * h);
        const __m256 mw = F::mins ? load8_scales(mins + (p * nb + b) * NR + 8 * h) : _mm256_setzero_ps();
        int64_t m = 0;
        for (; m + 1 < M; m += 2) rows_avx2<KIND, 2>(xq, m, b, nb, K, w, dw, mw, acc.data() + m * NR + 8 * h);
        if (m < M) rows_avx2<KIND, 1>(xq, m, b, nb, K, w, dw, mw, acc.data() + m * NR + 8 * h);
      }
    }
    store_panel(acc.data(), M, N, bias, y, p);
  }
}

// ---- AVX-512 VNNI: 16 outputs per zmm, the unpacked block kept in registers ----------------------------------

#define QG_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma,f16c")))

bool has_avx512_vnni() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vnni");
}

template <typename S>
QG_VNNI inline __m512 load16_scales(const S* p) {
  if constexpr (sizeof(S) == 2)
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  else
    return _mm512_loadu_ps(reinterpret_cast<const float*>(p));
}

template <int64_t KIND, typename S>
QG_VNNI void panels_vnni(const QuantizedX& xq, int64_t M, int64_t K, const uint8_t* qs, const S* scales,
                         const S* mins, int64_t N, const float* bias, float* y, int64_t p0, int64_t p1) {
  using F = Form<KIND>;
  const int64_t nb = K / QK;
  constexpr int32_t offset = F::offset(true);
  std::vector<float> acc(M * NR);
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t p = p0; p < p1; ++p) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = qs + (p * nb + b) * F::bytes;
      const int64_t sb = (p * nb + b) * F::halves * NR, mb = (p * nb + b) * NR;
      if (p + 1 < p1) {  // the next panel's block b, one panel ahead
        for (int l = 0; l < F::bytes; l += 64) _mm_prefetch(reinterpret_cast<const char*>(blk + nb * F::bytes + l), _MM_HINT_T0);
        if (b % 2 == 0) {
          _mm_prefetch(reinterpret_cast<const char*>(scales + sb + nb * F::halves * NR), _MM_HINT_T0);
          if (F::mins) _mm_prefetch(reinterpret_cast<const char*>(mins + mb + nb * NR), _MM_HINT_T0);
        }
      }
      __m512i w[GROUPS];
      if constexpr (F::wide) {  // q + 128, unsigned: vpdpbusd's first operand
        for (int g = 0; g < GROUPS; ++g) w[g] = _mm512_loadu_si512(blk + 64 * g);
      } else {
        for (int c = 0; c < GROUPS / 2; ++c) {
          const __m512i v = _mm512_loadu_si512(blk + 64 * c);
          w[2 * c] = _mm512_and_si512(v, low);
          w[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        }
      }
      __m512 dw[F::halves];
      for (int h = 0; h < F::halves; ++h) dw[h] = load16_scales(scales + sb + h * NR);
      const __m512 mw = F::mins ? load16_scales(mins + mb) : _mm512_setzero_ps();
      for (int64_t m = 0; m < M; ++m) {
        const int8_t* xr = xq.q.data() + m * K + b * QK;
        float* a = acc.data() + m * NR;
        __m512 av = _mm512_loadu_ps(a);
        const __m512 dx = _mm512_set1_ps(xq.d[m * nb + b]);
        for (int h = 0; h < F::halves; ++h) {
          __m512i s = _mm512_setzero_si512();
          for (int g = h * GROUPS / F::halves; g < (h + 1) * GROUPS / F::halves; ++g)
            s = _mm512_dpbusd_epi32(s, w[g], _mm512_set1_epi32(group_of(xr, g)));
          if constexpr (offset != 0)
            s = _mm512_sub_epi32(s, _mm512_set1_epi32(correction(xq, m * nb + b, F::halves == 1 ? -1 : h, offset)));
          av = _mm512_fmadd_ps(_mm512_mul_ps(dw[h], dx), _mm512_cvtepi32_ps(s), av);
        }
        if constexpr (F::mins) av = _mm512_fmadd_ps(mw, _mm512_set1_ps(xq.dsum[m * nb + b]), av);
        _mm512_storeu_ps(a, av);
      }
    }
    store_panel(acc.data(), M, N, bias, y, p);
  }
}

// One entry point per kind and path, the scales' storage erased.
using Panels = void (*)(const QuantizedX&, int64_t, int64_t, const uint8_t*, const void*, const void*, int64_t,
                        const float*, float*, int64_t, int64_t);

template <int64_t KIND, bool VNNI>
void run_panels(const QuantizedX& xq, int64_t M, int64_t K, const uint8_t* qs, const void* scales, const void* mins,
                int64_t N, const float* bias, float* y, int64_t p0, int64_t p1) {
  using S = std::conditional_t<Form<KIND>::f32, float, uint16_t>;
  const S* d = static_cast<const S*>(scales);
  const S* m = static_cast<const S*>(mins);
  if constexpr (VNNI)
    panels_vnni<KIND, S>(xq, M, K, qs, d, m, N, bias, y, p0, p1);
  else
    panels_avx2<KIND, S>(xq, M, K, qs, d, m, N, bias, y, p0, p1);
}

constexpr Panels kPanels[2][KINDS] = {
    {&run_panels<Q4_0, false>, &run_panels<Q4_1, false>, &run_panels<Q8_0, false>, &run_panels<Q4_K, false>,
     &run_panels<Q5_K, false>, &run_panels<Q6_K, false>},
    {&run_panels<Q4_0, true>, &run_panels<Q4_1, true>, &run_panels<Q8_0, true>, &run_panels<Q4_K, true>,
     &run_panels<Q5_K, true>, &run_panels<Q6_K, true>}};

// x [..., K] float32 @ w.T (+ bias) -> [..., n], for w [n, K] packed as described at the top (mins only for the
// kinds that have them). isa: "auto" (AVX-512 VNNI where the CPU has it, else AVX2), "avx2" or "avx512_vnni":
// every path gives the same bits.
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales,
                        const std::optional<at::Tensor>& mins, int64_t kind, int64_t n,
                        const std::optional<at::Tensor>& bias, std::string_view isa) {
  TORCH_CHECK(kind >= 0 && kind < KINDS, "quant_gemm.linear: kind must be 0..5 (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K)");
  const FormInfo form = kForms[kind];
  TORCH_CHECK(isa == "auto" || isa == "avx2" || isa == "avx512_vnni",
              "quant_gemm.linear: isa must be auto, avx2 or avx512_vnni");
  TORCH_CHECK(isa != "avx512_vnni" || has_avx512_vnni(), "quant_gemm.linear: this CPU has no AVX-512 VNNI");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() >= 1 && x.is_contiguous(),
              "quant_gemm.linear: x must be a contiguous float32 [..., K] CPU tensor");
  const int64_t K = x.size(-1), M = K == 0 ? 0 : x.numel() / K, N = n, nb = K / QK, P = (N + NR - 1) / NR;
  TORCH_CHECK(K % QK == 0 && N >= 0, "quant_gemm.linear: K must be a multiple of 32");
  TORCH_CHECK(qs.scalar_type() == at::kByte && qs.is_contiguous() && qs.dim() == 3 && qs.size(0) == P &&
                  qs.size(1) == nb && qs.size(2) == form.bytes,
              "quant_gemm.linear: qs must be a packed [ceil(n / 16), K / 32, B] uint8 tensor of this kind");
  const at::ScalarType scale_type = form.f32 ? at::kFloat : at::kHalf;
  TORCH_CHECK(scales.scalar_type() == scale_type && scales.is_contiguous() && scales.dim() == 4 &&
                  scales.size(0) == P && scales.size(1) == nb && scales.size(2) == form.halves &&
                  scales.size(3) == NR,
              "quant_gemm.linear: scales must be a packed [ceil(n / 16), K / 32, H, 16] tensor of this kind's type");
  const bool with_mins = mins.has_value() && mins->defined();
  TORCH_CHECK(with_mins == form.mins, "quant_gemm.linear: mins go with Q4_1, Q4_K and Q5_K, and only with them");
  if (with_mins)
    TORCH_CHECK(mins->scalar_type() == scale_type && mins->is_contiguous() && mins->dim() == 3 && mins->size(0) == P &&
                    mins->size(1) == nb && mins->size(2) == NR,
                "quant_gemm.linear: mins must be a packed [ceil(n / 16), K / 32, 16] tensor of the scales' type");
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == N,
                "quant_gemm.linear: bias must be a [n] CPU tensor");
    b = bias->to(at::kFloat).contiguous();
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options());  // [..., N]
  if (M == 0 || N == 0) return y;
  const QuantizedX xq = quantize_x(x.data_ptr<float>(), M, K);
  const Panels run = kPanels[isa == "avx512_vnni" || (isa == "auto" && has_avx512_vnni())][kind];
  const uint8_t* q = qs.data_ptr<uint8_t>();
  const void* d = scales.data_ptr();
  const void* mn = with_mins ? mins->data_ptr() : nullptr;
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  // Threads take whole panels (which thread computes a panel changes no y[m, n]); a share is at least ~64 KB of
  // weights so that small matrices do not pay for waking the other threads.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, nb * form.bytes));
  at::parallel_for(0, P, grain, [&](int64_t p0, int64_t p1) { run(xq, M, K, q, d, mn, N, bp, yp, p0, p1); });
  return y;
}

}  // namespace

SG_TORCH_LIBRARY_FRAGMENT(SG_LIBNAME, m) {
  m.def("quant_linear(Tensor x, Tensor qs, Tensor scales, Tensor? mins, int kind, int n, Tensor? bias=None, "
        "str isa='auto') -> Tensor");
  m.def("has_avx512_vnni() -> bool", &has_avx512_vnni);
}
SG_TORCH_LIBRARY_IMPL(SG_LIBNAME, CPU, m) { m.impl("quant_linear", &quant_linear); }
