// Small-M float32 GEMM for decoding: y[M, N] = x[M, K] @ w[N, K]^T (+ bias), AVX2 + FMA.
//
// Built for "few rows of x times large cold weights": the weights stream from memory once, and while a
// block of W rows sits in L1 every row of x (which stays in L2) passes over it. Threads split N.
//
// Exactness invariant: y[m, n] is computed by the same sequence of float operations whatever M is, whatever
// the other rows of x are, whichever register block (m, n) falls into, and however N is split across threads:
//   acc (8 lanes) = 0; for k0 in 0, 8, 16, ...: acc = fma(w[n, k0:k0+8], x[m, k0:k0+8], acc)
//   (the K % 8 tail is one more fma on zero-padded masked loads), then the fixed horizontal sum reduce8(acc),
//   then + bias[n] when there is a bias.
// Every register-block shape below is an instantiation of one template that runs exactly this per
// accumulator, so plain decoding (M = 1) and tree verification (M = 24) give bitwise identical rows.
// Build without -ffast-math; -ffp-contract=off keeps the compiler from fusing the scalar epilogue.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <optional>

namespace {

#ifndef SG_NW
#define SG_NW 3  // W rows per register block (many-row path)
#endif
#ifndef SG_MX
#define SG_MX 4  // x rows per register block (many-row path)
#endif
#ifndef SG_NW1
#define SG_NW1 4  // W rows per register block when M is small
#endif
#ifndef SG_PFD
#define SG_PFD 0  // software prefetch distance in W blocks ahead (0: none)
#endif
#ifndef SG_PFHINT
#define SG_PFHINT _MM_HINT_T0
#endif

// Fixed horizontal sum of 8 lanes: ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)). Used for every accumulator.
inline float reduce8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));  // l_i + l_{i+4}
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));                                            // (0+2), (1+3)
  s = _mm_add_ss(s, _mm_movehdup_ps(s));                                             // (0+2) + (1+3)
  return _mm_cvtss_f32(s);
}

// One register block: NW rows of w against MX rows of x. Writes y[j, i] for i < NW, j < MX.
// pf, when not null, points at W rows to prefetch (same layout as w): one line per row per 16 floats.
template <int NW, int MX, bool PF>
inline void block(const float* __restrict x, int64_t ldx, const float* __restrict w, int64_t K,
                  float* __restrict y, int64_t ldy, const float* __restrict bias, __m256i tail_mask,
                  const float* pf) {
  __m256 acc[NW][MX];
#pragma GCC unroll 8
  for (int i = 0; i < NW; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < MX; ++j) acc[i][j] = _mm256_setzero_ps();

  auto step = [&](int64_t k) __attribute__((always_inline)) {
    __m256 wv[NW];
#pragma GCC unroll 8
    for (int i = 0; i < NW; ++i) wv[i] = _mm256_loadu_ps(w + i * K + k);
#pragma GCC unroll 8
    for (int j = 0; j < MX; ++j) {
      const __m256 xv = _mm256_loadu_ps(x + j * ldx + k);
#pragma GCC unroll 8
      for (int i = 0; i < NW; ++i) acc[i][j] = _mm256_fmadd_ps(wv[i], xv, acc[i][j]);
    }
  };
  const int64_t kfull = K & ~int64_t(7);
  int64_t k = 0;
  for (; k + 16 <= kfull; k += 16) {
    if constexpr (PF) {
#pragma GCC unroll 8
      for (int i = 0; i < NW; ++i) _mm_prefetch(reinterpret_cast<const char*>(pf + i * K + k), SG_PFHINT);
    }
    step(k);
    step(k + 8);
  }
  if (k < kfull) {
    if constexpr (PF) {
#pragma GCC unroll 8
      for (int i = 0; i < NW; ++i) _mm_prefetch(reinterpret_cast<const char*>(pf + i * K + k), SG_PFHINT);
    }
    step(k);
  }
  if (kfull < K) {
    __m256 wv[NW];
#pragma GCC unroll 8
    for (int i = 0; i < NW; ++i) wv[i] = _mm256_maskload_ps(w + i * K + kfull, tail_mask);
#pragma GCC unroll 8
    for (int j = 0; j < MX; ++j) {
      const __m256 xv = _mm256_maskload_ps(x + j * ldx + kfull, tail_mask);
#pragma GCC unroll 8
      for (int i = 0; i < NW; ++i) acc[i][j] = _mm256_fmadd_ps(wv[i], xv, acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < NW; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < MX; ++j) {
      float s = reduce8(acc[i][j]);
      if (bias != nullptr) s = s + bias[i];
      y[j * ldy + i] = s;
    }
}

template <int NW, int MX>
inline void block_any(bool pf_on, const float* x, int64_t ldx, const float* w, int64_t K, float* y,
                      int64_t ldy, const float* bias, __m256i tail_mask, const float* pf) {
  if (pf_on)
    block<NW, MX, true>(x, ldx, w, K, y, ldy, bias, tail_mask, pf);
  else
    block<NW, MX, false>(x, ldx, w, K, y, ldy, bias, tail_mask, pf);
}

// All M rows of x against NW rows of w (one W block); the x rows go in blocks of MX, then a 1..MX-1 tail.
// The first x block prefetches the W rows at pf (if any).
template <int NW, int MX>
inline void w_block(const float* x, int64_t M, const float* w, int64_t K, float* y, int64_t N,
                    const float* bias, __m256i tail_mask, const float* pf) {
  int64_t m = 0;
  for (; m + MX <= M; m += MX) {
    block_any<NW, MX>(pf != nullptr && m == 0, x + m * K, K, w, K, y + m * N, N, bias, tail_mask, pf);
  }
  const int64_t r = M - m;
  const bool pf_on = pf != nullptr && m == 0;
  if constexpr (MX > 1) {
    // Tail rows: same per-accumulator sequence, smaller block.
    switch (r) {
      case 1: block_any<NW, 1>(pf_on, x + m * K, K, w, K, y + m * N, N, bias, tail_mask, pf); break;
      case 2: if constexpr (MX > 2) block_any<NW, 2>(pf_on, x + m * K, K, w, K, y + m * N, N, bias, tail_mask, pf); break;
      case 3: if constexpr (MX > 3) block_any<NW, 3>(pf_on, x + m * K, K, w, K, y + m * N, N, bias, tail_mask, pf); break;
      case 4: if constexpr (MX > 4) block_any<NW, 4>(pf_on, x + m * K, K, w, K, y + m * N, N, bias, tail_mask, pf); break;
      case 5: if constexpr (MX > 5) block_any<NW, 5>(pf_on, x + m * K, K, w, K, y + m * N, N, bias, tail_mask, pf); break;
      default: break;
    }
  }
}

// Rows [n0, n1) of w: W blocks of NW rows, then single rows.
template <int NW, int MX>
void rows(const float* x, int64_t M, const float* w, int64_t K, float* y, int64_t N, const float* bias,
          __m256i tail_mask, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + NW <= n1; n += NW) {
    const float* pf = (SG_PFD > 0 && n + NW + SG_PFD * NW <= N) ? w + (n + SG_PFD * NW) * K : nullptr;
    w_block<NW, MX>(x, M, w + n * K, K, y + n, N, bias ? bias + n : nullptr, tail_mask, pf);
  }
  for (; n < n1; ++n) w_block<1, MX>(x, M, w + n * K, K, y + n, N, bias ? bias + n : nullptr, tail_mask, nullptr);
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "small_gemm.linear: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "small_gemm.linear: float32 only");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "small_gemm.linear: x [M, K] and w [N, K]");
  TORCH_CHECK(x.size(1) == w.size(1), "small_gemm.linear: x is [M, K], w is [N, K], K differs");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "small_gemm.linear: x and w must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                    bias->size(0) == N && bias->is_contiguous(),
                "small_gemm.linear: bias must be a contiguous float32 [N] CPU tensor");
    b = bias->data_ptr<float>();
  }
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) return b ? y.copy_(bias->unsqueeze(0).expand({M, N})) : y.zero_();

  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int tail = static_cast<int>(K & 7);
  const __m256i tail_mask = _mm256_setr_epi32(tail > 0 ? -1 : 0, tail > 1 ? -1 : 0, tail > 2 ? -1 : 0,
                                              tail > 3 ? -1 : 0, tail > 4 ? -1 : 0, tail > 5 ? -1 : 0,
                                              tail > 6 ? -1 : 0, 0);

  // Split N into chunks that are whole W blocks (the split does not change any y[m, n], see the top).
  const int64_t nb = SG_NW * SG_NW1;  // chunk granularity works for both paths
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, K * nb));
  const int64_t nchunks = (N + nb - 1) / nb;
  at::parallel_for(0, nchunks, grain, [&](int64_t c0, int64_t c1) {
    const int64_t n0 = c0 * nb, n1 = std::min(N, c1 * nb);
    if (M < SG_MX)
      rows<SG_NW1, 1>(xp, M, wp, K, yp, N, b, tail_mask, n0, n1);
    else
      rows<SG_NW, SG_MX>(xp, M, wp, K, yp, N, b, tail_mask, n0, n1);
  });
  return y;
}

}  // namespace

#ifndef SG_LIBNAME
#define SG_LIBNAME decodekit_small_gemm
#endif
// One level of indirection so that SG_LIBNAME is expanded before TORCH_LIBRARY pastes it.
#define SG_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define SG_TORCH_LIBRARY_IMPL(ns, k, m) TORCH_LIBRARY_IMPL(ns, k, m)

SG_TORCH_LIBRARY(SG_LIBNAME, m) { m.def("linear(Tensor x, Tensor w, Tensor? bias=None) -> Tensor"); }
SG_TORCH_LIBRARY_IMPL(SG_LIBNAME, CPU, m) { m.impl("linear", &linear); }
