// Small-M GEMM on GGUF-quantized weights: y[M, N] = x[M, K] @ w[N, K]^T (+ bias), x and y float32.
//
// The weights stay in their GGUF blocks (32 consecutive k of one output row, an fp16 scale d, for Q4_1 also an
// fp16 min m; Q4_0: w = d (q - 8), Q4_1: w = d q + m, Q8_0: w = d q) rearranged for the vector units:
//   * qs [P, K / 32, B]: panel p holds the outputs 16 p .. 16 p + 15 (zero past N); block b of the panel is the
//     8 groups of 4 consecutive k of block b, group g as 64 bytes: output i's 4 values at bytes 4 i .. 4 i + 3.
//     4-bit kinds (B = 256): the 64 bytes c (c = 0..3) hold group 2 c in their low nibbles and group 2 c + 1 in
//     their high nibbles, q in 0..15. Q8_0 (B = 512): group g is bytes 64 g .. 64 g + 63, as q + 128 (0..255).
//   * scales, mins [P, K / 32, 16] fp16: d (and m) of output i's block b.
// So a panel's block is read as 4 (or 8) vector loads, unpacked once, and used for every row of x.
//
// x is quantized per row like llama.cpp's Q8 activations: each block of 32 k gets d_x = max|x| / 127 and
// q_x = round(x / d_x) in -127..127. The dot product of a block is then an exact integer
//     s = sum_k q_w[k] q_x[k]         (Q4_0: with q_w - 8, Q8_0: with the signed q; Q4_1: with q_w)
// computed with vpdpbusd (AVX-512 VNNI) or vpmaddubsw + vpmaddwd (AVX2): integer sums, so the order in which the
// vector units add them does not matter. Each y[m, n] is then this fixed sequence of float operations:
//     acc = 0;  for b = 0 .. K/32 - 1:  acc = fma(d_w[n, b] * d_x[m, b], float(s), acc)
//                                       (Q4_1:) acc = fma(m_w[n, b], d_x[m, b] * float(sum_k q_x[m, k]), acc)
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
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>
#include <vector>

namespace {

constexpr int QK = 32;   // k per block
constexpr int NR = 16;   // outputs per panel
constexpr int GROUPS = QK / 4;

enum Kind : int64_t { Q4_0 = 0, Q4_1 = 1, Q8_0 = 2 };

int64_t block_bytes(int64_t kind) { return kind == Q8_0 ? NR * QK : NR * QK / 2; }

// x quantized per row and block (scalar code, the same for every path).
struct QuantizedX {
  std::vector<int8_t> q;       // [M, K]
  std::vector<float> d;        // [M, K / 32]
  std::vector<float> dsum;     // [M, K / 32]: d * float(sum of the block's q)
  std::vector<int32_t> corr;   // [M, K / 32]: what to subtract from the raw integer dot (Q4_0: 8 sum q, Q8_0: 128 sum q)
};

// One row's blocks, 8 floats at a time: max, the divide, the products and round-half-even are exact per element,
// so this is bitwise the scalar definition (d = max|x| / 127, q = nearbyint(x * (1 / d)) clamped to +-127).
void quantize_row(const float* x, int64_t nb, int32_t offset, int8_t* q, float* d, float* dsum, int32_t* corr) {
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
    __m256i sum = _mm256_setzero_si256();
    for (int j = 0; j < 4; ++j) {
      __m256 r = _mm256_round_ps(_mm256_mul_ps(v[j], id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      r = _mm256_min_ps(lim, _mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), lim), r));
      const __m256i i32 = _mm256_cvtps_epi32(r);
      sum = _mm256_add_epi32(sum, i32);
      const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(q + b * QK + 8 * j), _mm_packs_epi16(i16, i16));
    }
    alignas(32) int32_t parts[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(parts), sum);
    int32_t total = 0;
    for (int32_t part : parts) total += part;
    d[b] = db;
    dsum[b] = db * static_cast<float>(total);
    corr[b] = offset * total;
  }
}

QuantizedX quantize_x(const float* x, int64_t M, int64_t K, int64_t kind) {
  const int64_t nb = K / QK;
  QuantizedX out{std::vector<int8_t>(M * K), std::vector<float>(M * nb), std::vector<float>(M * nb),
                 std::vector<int32_t>(M * nb)};
  const int32_t offset = kind == Q4_0 ? 8 : kind == Q8_0 ? 128 : 0;
  at::parallel_for(0, M, std::max<int64_t>(1, 4096 / K), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      quantize_row(x + m * K, nb, offset, out.q.data() + m * K, out.d.data() + m * nb, out.dsum.data() + m * nb,
                   out.corr.data() + m * nb);
  });
  return out;
}

int32_t group_of(const int8_t* xq, int g) {
  int32_t v;
  std::memcpy(&v, xq + 4 * g, sizeof v);
  return v;
}

// ---- AVX2: 8 outputs per ymm, the panel's unpacked block staged in L1 ----------------------------------------

// Panels [p0, p1): y[m, 16 p + i] for every m.
template <int64_t KIND>
void panels_avx2(const QuantizedX& xq, int64_t M, int64_t K, const uint8_t* qs, const uint16_t* scales,
                 const uint16_t* mins, int64_t N, const float* bias, float* y, int64_t p0, int64_t p1) {
  const int64_t nb = K / QK;
  constexpr int64_t B = KIND == Q8_0 ? NR * QK : NR * QK / 2;
  alignas(32) uint8_t w[GROUPS][64];
  std::vector<float> acc(M * NR);
  const __m256i low = _mm256_set1_epi8(0x0F), flip = _mm256_set1_epi8(static_cast<char>(0x80));
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t p = p0; p < p1; ++p) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = qs + (p * nb + b) * B;
      for (int h = 0; h < 2; ++h) {
        if constexpr (KIND == Q8_0) {  // back to the signed q: the sign trick below needs it
          for (int g = 0; g < GROUPS; ++g) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 64 * g + 32 * h));
            _mm256_store_si256(reinterpret_cast<__m256i*>(w[g] + 32 * h), _mm256_xor_si256(v, flip));
          }
        } else {
          for (int c = 0; c < GROUPS / 2; ++c) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 64 * c + 32 * h));
            _mm256_store_si256(reinterpret_cast<__m256i*>(w[2 * c] + 32 * h), _mm256_and_si256(v, low));
            _mm256_store_si256(reinterpret_cast<__m256i*>(w[2 * c + 1] + 32 * h),
                               _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
          }
        }
      }
      const int64_t sb = (p * nb + b) * NR;
      for (int h = 0; h < 2; ++h) {
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + sb + 8 * h)));
        const __m256 mw = KIND == Q4_1 ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mins + sb + 8 * h)))
                                       : _mm256_setzero_ps();
        for (int64_t m = 0; m < M; ++m) {
          const int8_t* xr = xq.q.data() + m * K + b * QK;
          __m256i s;
          if constexpr (KIND == Q8_0) {  // |q_w| * (q_x * sign q_w): pairs stay within int16, no saturation
            s = _mm256_setzero_si256();
            for (int g = 0; g < GROUPS; ++g) {
              const __m256i wv = _mm256_load_si256(reinterpret_cast<const __m256i*>(w[g] + 32 * h));
              const __m256i xv = _mm256_set1_epi32(group_of(xr, g));
              const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv));
              s = _mm256_add_epi32(s, _mm256_madd_epi16(pairs, ones));
            }
          } else {  // 8 groups of int16 pair sums, each at most 2 * 15 * 127: their sum fits int16
            __m256i s16 = _mm256_setzero_si256();
            for (int g = 0; g < GROUPS; ++g) {
              const __m256i wv = _mm256_load_si256(reinterpret_cast<const __m256i*>(w[g] + 32 * h));
              s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(wv, _mm256_set1_epi32(group_of(xr, g))));
            }
            s = _mm256_madd_epi16(s16, ones);
            if constexpr (KIND == Q4_0) s = _mm256_sub_epi32(s, _mm256_set1_epi32(xq.corr[m * nb + b]));
          }
          float* a = acc.data() + m * NR + 8 * h;
          __m256 av = _mm256_loadu_ps(a);
          av = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(xq.d[m * nb + b])), _mm256_cvtepi32_ps(s), av);
          if constexpr (KIND == Q4_1) av = _mm256_fmadd_ps(mw, _mm256_set1_ps(xq.dsum[m * nb + b]), av);
          _mm256_storeu_ps(a, av);
        }
      }
    }
    const int64_t n = p * NR;
    const int nvalid = static_cast<int>(std::min<int64_t>(NR, N - n));
    for (int64_t m = 0; m < M; ++m)
      for (int i = 0; i < nvalid; ++i) y[m * N + n + i] = bias != nullptr ? acc[m * NR + i] + bias[n + i] : acc[m * NR + i];
  }
}

// ---- AVX-512 VNNI: 16 outputs per zmm, the unpacked block kept in registers ----------------------------------

#define QG_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma,f16c")))

bool has_avx512_vnni() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vnni");
}

template <int64_t KIND>
QG_VNNI void panels_vnni(const QuantizedX& xq, int64_t M, int64_t K, const uint8_t* qs, const uint16_t* scales,
                         const uint16_t* mins, int64_t N, const float* bias, float* y, int64_t p0, int64_t p1) {
  const int64_t nb = K / QK;
  constexpr int64_t B = KIND == Q8_0 ? NR * QK : NR * QK / 2;
  std::vector<float> acc(M * NR);
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t p = p0; p < p1; ++p) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = qs + (p * nb + b) * B;
      if (p + 1 < p1) {  // the next panel's block b, one panel ahead
        for (int l = 0; l < B; l += 64) _mm_prefetch(reinterpret_cast<const char*>(blk + nb * B + l), _MM_HINT_T0);
        if (b % 2 == 0) {
          _mm_prefetch(reinterpret_cast<const char*>(scales + (p * nb + b + nb) * NR), _MM_HINT_T0);
          if (mins != nullptr) _mm_prefetch(reinterpret_cast<const char*>(mins + (p * nb + b + nb) * NR), _MM_HINT_T0);
        }
      }
      __m512i w[GROUPS];
      if constexpr (KIND == Q8_0) {  // q + 128, unsigned: vpdpbusd's first operand
        for (int g = 0; g < GROUPS; ++g) w[g] = _mm512_loadu_si512(blk + 64 * g);
      } else {
        for (int c = 0; c < GROUPS / 2; ++c) {
          const __m512i v = _mm512_loadu_si512(blk + 64 * c);
          w[2 * c] = _mm512_and_si512(v, low);
          w[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        }
      }
      const int64_t sb = (p * nb + b) * NR;
      const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + sb)));
      const __m512 mw = KIND == Q4_1 ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mins + sb)))
                                     : _mm512_setzero_ps();
      for (int64_t m = 0; m < M; ++m) {
        const int8_t* xr = xq.q.data() + m * K + b * QK;
        __m512i s = _mm512_setzero_si512();
        for (int g = 0; g < GROUPS; ++g) s = _mm512_dpbusd_epi32(s, w[g], _mm512_set1_epi32(group_of(xr, g)));
        if constexpr (KIND != Q4_1) s = _mm512_sub_epi32(s, _mm512_set1_epi32(xq.corr[m * nb + b]));
        float* a = acc.data() + m * NR;
        __m512 av = _mm512_loadu_ps(a);
        av = _mm512_fmadd_ps(_mm512_mul_ps(dw, _mm512_set1_ps(xq.d[m * nb + b])), _mm512_cvtepi32_ps(s), av);
        if constexpr (KIND == Q4_1) av = _mm512_fmadd_ps(mw, _mm512_set1_ps(xq.dsum[m * nb + b]), av);
        _mm512_storeu_ps(a, av);
      }
    }
    const int64_t n = p * NR;
    const int nvalid = static_cast<int>(std::min<int64_t>(NR, N - n));
    for (int64_t m = 0; m < M; ++m)
      for (int i = 0; i < nvalid; ++i) y[m * N + n + i] = bias != nullptr ? acc[m * NR + i] + bias[n + i] : acc[m * NR + i];
  }
}

using Panels = void (*)(const QuantizedX&, int64_t, int64_t, const uint8_t*, const uint16_t*, const uint16_t*,
                        int64_t, const float*, float*, int64_t, int64_t);

Panels pick(int64_t kind, bool vnni) {
  switch (kind) {
    case Q4_0: return vnni ? &panels_vnni<Q4_0> : &panels_avx2<Q4_0>;
    case Q4_1: return vnni ? &panels_vnni<Q4_1> : &panels_avx2<Q4_1>;
    default: return vnni ? &panels_vnni<Q8_0> : &panels_avx2<Q8_0>;
  }
}

// x [..., K] float32 @ w.T (+ bias) -> [..., n], for w [n, K] packed as described at the top (kind 0: Q4_0, 1: Q4_1, 2: Q8_0;
// mins only for Q4_1). isa: "auto" (AVX-512 VNNI where the CPU has it, else AVX2), "avx2" or "avx512_vnni":
// every path gives the same bits.
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales,
                        const std::optional<at::Tensor>& mins, int64_t kind, int64_t n,
                        const std::optional<at::Tensor>& bias, std::string_view isa) {
  TORCH_CHECK(kind == Q4_0 || kind == Q4_1 || kind == Q8_0, "quant_gemm.linear: kind must be 0 (Q4_0), 1 (Q4_1) or 2 (Q8_0)");
  TORCH_CHECK(isa == "auto" || isa == "avx2" || isa == "avx512_vnni",
              "quant_gemm.linear: isa must be auto, avx2 or avx512_vnni");
  TORCH_CHECK(isa != "avx512_vnni" || has_avx512_vnni(), "quant_gemm.linear: this CPU has no AVX-512 VNNI");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() >= 1 && x.is_contiguous(),
              "quant_gemm.linear: x must be a contiguous float32 [..., K] CPU tensor");
  const int64_t K = x.size(-1), M = K == 0 ? 0 : x.numel() / K, N = n, nb = K / QK, P = (N + NR - 1) / NR;
  TORCH_CHECK(K % QK == 0 && N >= 0, "quant_gemm.linear: K must be a multiple of 32");
  TORCH_CHECK(qs.scalar_type() == at::kByte && qs.is_contiguous() && qs.dim() == 3 && qs.size(0) == P &&
                  qs.size(1) == nb && qs.size(2) == block_bytes(kind),
              "quant_gemm.linear: qs must be a packed [ceil(n / 16), K / 32, B] uint8 tensor of this kind");
  auto check_half = [&](const at::Tensor& t, const char* what) {
    TORCH_CHECK(t.scalar_type() == at::kHalf && t.is_contiguous() && t.dim() == 3 && t.size(0) == P &&
                    t.size(1) == nb && t.size(2) == NR,
                "quant_gemm.linear: ", what, " must be a packed [ceil(n / 16), K / 32, 16] float16 tensor");
  };
  check_half(scales, "scales");
  const bool has_mins = mins.has_value() && mins->defined();
  TORCH_CHECK(has_mins == (kind == Q4_1), "quant_gemm.linear: mins go with Q4_1, and only with it");
  if (has_mins) check_half(*mins, "mins");
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
  const QuantizedX xq = quantize_x(x.data_ptr<float>(), M, K, kind);
  const Panels run = pick(kind, isa == "avx512_vnni" || (isa == "auto" && has_avx512_vnni()));
  const uint8_t* q = qs.data_ptr<uint8_t>();
  const uint16_t* d = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  const uint16_t* mn = has_mins ? reinterpret_cast<const uint16_t*>(mins->data_ptr<at::Half>()) : nullptr;
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  // Threads take whole panels (which thread computes a panel changes no y[m, n]); a share is at least ~64 KB of
  // weights so that small matrices do not pay for waking the other threads.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, nb * block_bytes(kind)));
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
