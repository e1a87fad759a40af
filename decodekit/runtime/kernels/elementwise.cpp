// The elementwise steps of a decoder block, fused: RMS norm (Llama's, or Gemma's x * (1 + weight); also in place
// on some heads of a q|k|v row, for Gemma's per-head q and k norms), rotary embedding (in place) and gated
// products (SiLU, or GELU with the tanh approximation for Gemma's GeGLU), on float32 or bfloat16 CPU tensors
// (float32 arithmetic, each result rounded to the tensor's dtype once, except where the reference rounds twice,
// as noted).
//
// A decode step runs a few rows through ~30 blocks; torch spends ~8 small ops on an RMS norm, ~6 on a rotary
// embedding and 3 on the gated product, and at a few rows each op costs its dispatch, not its arithmetic. These
// are one op each. Every row is computed on its own with a fixed order of operations (a row's sum of squares:
// 8 lanes over k = 0, 8, 16, .., then hsum8, then the tail in order), so a row's result never depends on the
// other rows or on how many there are: a token normed alone and the same token in a draft tree agree bitwise.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "registration.h"
#include "simd_math.h"
#include "widen.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using bf16 = c10::BFloat16;

// Rows per thread task: at least ~16K elements, so a decode step's few rows stay on the calling thread.
int64_t grain(int64_t row_elements) { return std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, row_elements)); }

bool is_float_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16; }

// One row of an RMS norm, y = x / sqrt(mean(x^2) + eps) scaled by the weight, statistics in float32 (y may be x).
// Llama's reference (UnitOffset false): the normalized row rounded to the dtype, then multiplied by the weight (a
// second rounding in bfloat16). Gemma's (UnitOffset true): (x * inv) * (1 + weight) all in float32, rounded once.
template <bool UnitOffset, typename T>
inline void rms_norm_row(const T* xr, const T* weight, T* yr, int64_t D, float eps) {
  __m256 lanes = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= D; i += 8) {
    const __m256 v = load8(xr + i);
    lanes = _mm256_fmadd_ps(v, v, lanes);
  }
  float squares = hsum8(lanes);
  for (; i < D; ++i) squares = std::fma(static_cast<float>(xr[i]), static_cast<float>(xr[i]), squares);
  const float inv = 1.0f / std::sqrt(squares / static_cast<float>(D) + eps);
  for (int64_t j = 0; j < D; ++j) {
    if constexpr (UnitOffset) {
      yr[j] = T(static_cast<float>(xr[j]) * inv * (1.0f + static_cast<float>(weight[j])));
    } else {
      const T normed = T(static_cast<float>(xr[j]) * inv);
      yr[j] = T(static_cast<float>(weight[j]) * static_cast<float>(normed));
    }
  }
}

template <bool UnitOffset, typename T>
void rms_norm_rows(const T* x, const T* weight, T* y, int64_t rows, int64_t D, float eps) {
  at::parallel_for(0, rows, grain(D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) rms_norm_row<UnitOffset>(x + r * D, weight, y + r * D, D, eps);
  });
}

void check_norm_weight(const at::Tensor& x, const at::Tensor& weight, int64_t D) {
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.is_contiguous() && weight.dim() == 1 &&
                  weight.size(0) == D,
              "elementwise.rms_norm: weight must be a contiguous [D] tensor of x's dtype");
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, bool unit_offset) {
  TORCH_CHECK(x.device().is_cpu() && is_float_dtype(x.scalar_type()) && x.is_contiguous() && x.dim() >= 1,
              "elementwise.rms_norm: x must be a contiguous float32 or bfloat16 CPU tensor");
  const int64_t D = x.size(-1);
  check_norm_weight(x, weight, D);
  at::Tensor y = at::empty_like(x);
  const int64_t rows = D == 0 ? 0 : x.numel() / D;
  const float e = static_cast<float>(eps);
  if (x.scalar_type() == at::kBFloat16) {
    const bf16 *xp = x.data_ptr<bf16>(), *wp = weight.data_ptr<bf16>();
    unit_offset ? rms_norm_rows<true>(xp, wp, y.data_ptr<bf16>(), rows, D, e)
                : rms_norm_rows<false>(xp, wp, y.data_ptr<bf16>(), rows, D, e);
  } else {
    const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>();
    unit_offset ? rms_norm_rows<true>(xp, wp, y.data_ptr<float>(), rows, D, e)
                : rms_norm_rows<false>(xp, wp, y.data_ptr<float>(), rows, D, e);
  }
  return y;
}

// In place on heads [first, first + heads) of x [.., all heads, d]: each head's d values normed as a row of its
// own (rms_norm_row), with one weight [d] for them all.
template <bool UnitOffset, typename T>
void rms_norm_heads_rows(T* x, const T* weight, int64_t tokens, int64_t all_heads, int64_t first, int64_t heads,
                         int64_t d, float eps) {
  at::parallel_for(0, tokens, grain(heads * d), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t h = first; h < first + heads; ++h) {
        T* row = x + (t * all_heads + h) * d;
        rms_norm_row<UnitOffset>(row, weight, row, d, eps);
      }
  });
}

void rms_norm_heads_(const at::Tensor& x, const at::Tensor& weight, double eps, int64_t first, int64_t heads,
                     bool unit_offset) {
  TORCH_CHECK(x.device().is_cpu() && is_float_dtype(x.scalar_type()) && x.is_contiguous() && x.dim() >= 2 &&
                  first >= 0 && heads >= 0 && first + heads <= x.size(-2),
              "elementwise.rms_norm_heads_: x must be a contiguous float32 or bfloat16 [.., heads, d] CPU tensor "
              "with heads [first, first + heads)");
  const int64_t d = x.size(-1), all_heads = x.size(-2);
  check_norm_weight(x, weight, d);
  const int64_t tokens = d * all_heads == 0 ? 0 : x.numel() / (d * all_heads);
  const float e = static_cast<float>(eps);
  if (x.scalar_type() == at::kBFloat16) {
    bf16 *xp = x.data_ptr<bf16>();
    const bf16* wp = weight.data_ptr<bf16>();
    unit_offset ? rms_norm_heads_rows<true>(xp, wp, tokens, all_heads, first, heads, d, e)
                : rms_norm_heads_rows<false>(xp, wp, tokens, all_heads, first, heads, d, e);
  } else {
    float* xp = x.data_ptr<float>();
    const float* wp = weight.data_ptr<float>();
    unit_offset ? rms_norm_heads_rows<true>(xp, wp, tokens, all_heads, first, heads, d, e)
                : rms_norm_heads_rows<false>(xp, wp, tokens, all_heads, first, heads, d, e);
  }
}

// In place on the first `heads` heads of x [B, n, all heads, d]: the rotary embedding, half-split convention,
// x' = x * cos + rotate_half(x) * sin with cos, sin [B, n, d]: for i < d/2,
//   x'[i] = x[i] cos[i] - x[i + d/2] sin[i],   x'[i + d/2] = x[i + d/2] cos[i + d/2] + x[i] sin[i + d/2]
// (each product rounded to float32, then the sum: in float32 bitwise torch's mul, mul, add).
template <typename T>
void rope_rows(T* x, const T* cos, const T* sin, int64_t tokens, int64_t all_heads, int64_t heads, int64_t d) {
  const int64_t half = d / 2;
  at::parallel_for(0, tokens, grain(heads * d), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const T* c = cos + t * d;
      const T* s = sin + t * d;
      for (int64_t h = 0; h < heads; ++h) {
        T* v = x + (t * all_heads + h) * d;
        for (int64_t i = 0; i < half; ++i) {
          const float lo = static_cast<float>(v[i]), hi = static_cast<float>(v[i + half]);
          const float lo_cos = lo * static_cast<float>(c[i]), hi_sin = hi * static_cast<float>(s[i]);
          const float hi_cos = hi * static_cast<float>(c[i + half]), lo_sin = lo * static_cast<float>(s[i + half]);
          v[i] = T(lo_cos - hi_sin);
          v[i + half] = T(hi_cos + lo_sin);
        }
      }
    }
  });
}

void rope_(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t heads) {
  TORCH_CHECK(x.device().is_cpu() && is_float_dtype(x.scalar_type()) && x.is_contiguous() && x.dim() == 4 &&
                  x.size(3) % 2 == 0 && heads >= 0 && heads <= x.size(2),
              "elementwise.rope_: x must be a contiguous float32 or bfloat16 [B, n, heads, d] CPU tensor, d even");
  const int64_t B = x.size(0), n = x.size(1), d = x.size(3);
  for (const at::Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->is_contiguous() && t->numel() == B * n * d,
                "elementwise.rope_: cos and sin must be contiguous [B, n, d] tensors of x's dtype");
  if (x.scalar_type() == at::kBFloat16)
    rope_rows(x.data_ptr<bf16>(), cos.data_ptr<bf16>(), sin.data_ptr<bf16>(), B * n, x.size(2), heads, d);
  else
    rope_rows(x.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), B * n, x.size(2), heads, d);
}

// The gate activations, lane-wise with exp8, as g / (1 + exp(-z)): silu(g) = g sigmoid(g), and GELU's tanh
// approximation 0.5 g (1 + tanh(u)) = g sigmoid(2u), u = sqrt(2 / pi) (g + 0.044715 g^3).
enum class Act { silu, gelu_tanh };

template <Act A>
inline __m256 activate8(__m256 g) {
  __m256 minus_z;
  if constexpr (A == Act::silu) {
    minus_z = _mm256_sub_ps(_mm256_setzero_ps(), g);
  } else {
    const __m256 cube = _mm256_mul_ps(_mm256_mul_ps(g, g), g);
    const __m256 inner = _mm256_add_ps(g, _mm256_mul_ps(_mm256_set1_ps(0.044715f), cube));
    minus_z = _mm256_mul_ps(_mm256_set1_ps(-1.5957691216057308f), inner);  // -2 sqrt(2 / pi)
  }
  return _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(minus_z)));
}

// y [.., I] = act(gate) * up for gate_up [.., 2I] = (gate | up): the activation, then the product (in bfloat16,
// act(g) is rounded first, as torch's two ops do).
template <Act A, typename T>
void act_mul_rows(const T* gate_up, T* y, int64_t rows, int64_t I) {
  at::parallel_for(0, rows, grain(2 * I), [&](int64_t r0, int64_t r1) {
    alignas(32) float g[8], act[8];
    for (int64_t r = r0; r < r1; ++r) {
      const T* gr = gate_up + r * 2 * I;
      const T* ur = gr + I;
      T* yr = y + r * I;
      for (int64_t i = 0; i < I; i += 8) {
        const int64_t w = std::min<int64_t>(8, I - i);
        for (int64_t l = 0; l < 8; ++l) g[l] = l < w ? static_cast<float>(gr[i + l]) : 0.0f;
        _mm256_store_ps(act, activate8<A>(_mm256_load_ps(g)));
        for (int64_t l = 0; l < w; ++l) yr[i + l] = T(static_cast<float>(T(act[l])) * static_cast<float>(ur[i + l]));
      }
    }
  });
}

template <Act A>
at::Tensor act_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.device().is_cpu() && is_float_dtype(gate_up.scalar_type()) && gate_up.is_contiguous() &&
                  gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0,
              "elementwise.silu_mul/gelu_tanh_mul: gate_up must be a contiguous float32 or bfloat16 [.., 2I] CPU "
              "tensor");
  std::vector<int64_t> shape(gate_up.sizes().begin(), gate_up.sizes().end());
  const int64_t I = shape.back() / 2;
  shape.back() = I;
  at::Tensor y = at::empty(shape, gate_up.options());
  const int64_t rows = I == 0 ? 0 : gate_up.numel() / (2 * I);
  if (gate_up.scalar_type() == at::kBFloat16)
    act_mul_rows<A>(gate_up.data_ptr<bf16>(), y.data_ptr<bf16>(), rows, I);
  else
    act_mul_rows<A>(gate_up.data_ptr<float>(), y.data_ptr<float>(), rows, I);
  return y;
}

}  // namespace

SG_TORCH_LIBRARY_FRAGMENT(SG_LIBNAME, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, bool unit_offset=False) -> Tensor");
  m.def("rms_norm_heads_(Tensor(a!) x, Tensor weight, float eps, int first, int heads, bool unit_offset) -> ()");
  m.def("rope_(Tensor(a!) x, Tensor cos, Tensor sin, int heads) -> ()");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("gelu_tanh_mul(Tensor gate_up) -> Tensor");
}
SG_TORCH_LIBRARY_IMPL(SG_LIBNAME, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rms_norm_heads_", &rms_norm_heads_);
  m.impl("rope_", &rope_);
  m.impl("silu_mul", &act_mul<Act::silu>);
  m.impl("gelu_tanh_mul", &act_mul<Act::gelu_tanh>);
}
