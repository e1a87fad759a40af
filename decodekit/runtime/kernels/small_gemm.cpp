// Small-M GEMM for decoding on x86-64 CPUs, float32 arithmetic: y[M, N] = x[M, K] @ w[N, K]^T (+ bias).
//
// Decoding multiplies a few rows of x (1 for plain decoding, 8-81 for a draft tree) by weights that are cold
// in memory. This kernel streams the weights once, as one sequential stream per thread, and does all M rows
// of x against each piece while it is in cache:
//   * pack(w) rearranges w [N, K] into panels of 16 rows, k-major: wp [ceil(N / 16), K, 16] (rows past N
//     are zero). Panel p, element (k, i) is w[16 p + i, k].
//   * linear(x, wp, n, bias) walks the panels (threads split them); for each panel, x goes by in blocks of
//     rows, each block an outer-product register tile: per k, the panel's 16 floats are loaded and each x[m, k]
//     is broadcast and fma'd into them. Two implementations, chosen at run time:
//       - AVX2 + FMA: one panel at a time, blocks of up to 6 rows (6 x 16 floats in 12 ymm accumulators); the
//         panel (64 bytes per k in float32) stays in L1/L2 across the blocks while the next one is prefetched.
//       - AVX-512 (where the CPU has it): two panels at a time, blocks of up to 12 rows (12 x 32 floats in 24
//         of the 32 zmm registers). Up to 12 rows, each weight byte is read once and used for every row, so
//         a tree of 2-12 nodes costs little more than one token while memory is the bound (on a Zen 4,
//         AVX2: 8 rows +55% over 1 row; AVX-512: +10%).
//
// Exactness invariant: every y[m, n] is the same sequence of float operations whatever M is, whatever the
// other rows of x are, whichever x block, thread or implementation computes it:
//     acc = 0;  for k = 0 .. K-1: acc = fma(x[m, k], w[n, k], acc);  y = acc (+ bias[n])
// (one lane of one accumulator, k in order, one rounding per fma, then one float add for the bias). So plain
// decoding (M = 1) and tree verification (M = 24) give bitwise identical rows, on AVX2 and AVX-512 alike.
// Build without -ffast-math.
//
// Weights may also be bfloat16 (half the bytes to stream): pack(w) keeps w's dtype, and each panel load widens
// its 16 weights to float32 exactly (a bf16 is the top half of a float32), so the fma sequence above, and the
// invariant, hold unchanged. bfloat16 x is widened to float32 before the tiles; y is rounded to x's dtype once,
// after the bias.
//
// With bfloat16 x and weights on a CPU with AVX-512 BF16 (Zen 4, Sapphire Rapids), "auto" takes a third path
// that multiplies bf16 pairs directly (vdpbf16ps: 32 products per instruction, twice the fma path's rate, which
// is what bounds a tree of more than a few rows). Each y[m, n] is then
//     acc = 0;  for k = 0, 2, 4, ..: acc = dpbf16(acc, (x[m, k], x[m, k+1]), (w[n, k], w[n, k+1]));
//     y = bf16(acc (+ bias))
// (an odd K pairs its last k with zeros): another sum than the fma paths', so other bits, but again the same
// sequence whatever M, the other rows or the thread, which is what lossless tree verification needs.
//
// Where the CPU also has AMX (Sapphire Rapids and later), bf16 weights are packed for the tile unit instead
// (pack(w, pairs), isa "amx"; the layout picks the path): pair products again, 16 rows x 16 columns x 32 k per
// instruction, so a tree's extra rows cost next to nothing where the vector paths are bound by arithmetic past a
// few rows (on a 2-vCPU Xeon guest a 12-node forward took 2.3x one token's through vdpbf16ps, 1.1-1.3x here).
// The weights are laid out once as the tile unit reads them (pairs of k, 32-column panel pairs, K padded to
// 32-wide chunks with zeros); x is staged per call into 16-row tiles padded with zero rows. Every y[m, n] is the
// tile unit's fixed sequence of pair products over the chunks in order, from row m of x alone: a third set of
// bits, and again the same whatever M, the other rows or the thread.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "registration.h"
#include "widen.h"

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

constexpr int NR = 16;  // W rows per panel (two ymm of output columns)
constexpr int MR = 6;   // most x rows per register tile: 2 * MR = 12 ymm accumulators (+ 2 panel + 1 broadcast)

// Software prefetch of the next panel, spread over the work on the current one: `rate` 64-byte lines
// every 4 k, from cur up to end.
struct Prefetch {
  const char* cur;
  const char* end;
  int rate;
  inline void step() {
    for (int q = 0; q < rate; ++q) {
      if (cur < end) _mm_prefetch(cur, _MM_HINT_T0);
      cur += 64;
    }
  }
};

// MB rows of x (row stride K) against one panel: y[j, i] for j < MB, i < nvalid (row stride ldy).
template <int MB, typename W>
inline void tile(const float* __restrict x, int64_t K, const W* __restrict panel, float* __restrict y,
                 int64_t ldy, const float* __restrict bias, int nvalid, Prefetch& pf) {
  __m256 a0[MB], a1[MB];
#pragma GCC unroll 8
  for (int j = 0; j < MB; ++j) a0[j] = a1[j] = _mm256_setzero_ps();
  auto step = [&](int64_t k) __attribute__((always_inline)) {
    const __m256 w0 = load8(panel + k * NR), w1 = load8(panel + k * NR + 8);
#pragma GCC unroll 8
    for (int j = 0; j < MB; ++j) {
      const __m256 xb = _mm256_broadcast_ss(x + j * K + k);
      a0[j] = _mm256_fmadd_ps(xb, w0, a0[j]);
      a1[j] = _mm256_fmadd_ps(xb, w1, a1[j]);
    }
  };
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    pf.step();
    step(k);
    step(k + 1);
    step(k + 2);
    step(k + 3);
  }
  for (; k < K; ++k) step(k);

  const __m256 b0 = bias != nullptr && nvalid == NR ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
  const __m256 b1 = bias != nullptr && nvalid == NR ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
#pragma GCC unroll 8
  for (int j = 0; j < MB; ++j) {
    if (nvalid == NR) {
      __m256 v0 = a0[j], v1 = a1[j];
      if (bias != nullptr) {  // lane-wise float add: the same rounding as the scalar add below
        v0 = _mm256_add_ps(v0, b0);
        v1 = _mm256_add_ps(v1, b1);
      }
      _mm256_storeu_ps(y + j * ldy, v0);
      _mm256_storeu_ps(y + j * ldy + 8, v1);
    } else {  // last panel of a matrix whose N is not a multiple of 16
      alignas(32) float t[NR];
      _mm256_store_ps(t, a0[j]);
      _mm256_store_ps(t + 8, a1[j]);
      for (int i = 0; i < nvalid; ++i) y[j * ldy + i] = bias != nullptr ? t[i] + bias[i] : t[i];
    }
  }
}

// mb in 1 .. MR
template <typename W>
inline void tile_any(int mb, const float* x, int64_t K, const W* panel, float* y, int64_t ldy,
                     const float* bias, int nvalid, Prefetch& pf) {
  static_assert(MR == 6, "tile_any instantiates tiles of 1 .. 6 rows");
  switch (mb) {
    case 1: tile<1>(x, K, panel, y, ldy, bias, nvalid, pf); break;
    case 2: tile<2>(x, K, panel, y, ldy, bias, nvalid, pf); break;
    case 3: tile<3>(x, K, panel, y, ldy, bias, nvalid, pf); break;
    case 4: tile<4>(x, K, panel, y, ldy, bias, nvalid, pf); break;
    case 5: tile<5>(x, K, panel, y, ldy, bias, nvalid, pf); break;
    default: tile<6>(x, K, panel, y, ldy, bias, nvalid, pf); break;
  }
}

// Panels [p0, p1) against all of x, AVX2.
template <typename W>
void panels_avx2(const float* x, int64_t M, int64_t K, const W* wp, int64_t N, const float* bias, float* y,
                 int64_t p0, int64_t p1) {
  const int64_t npanels = (N + NR - 1) / NR;
  const char* wend = reinterpret_cast<const char*>(wp + npanels * K * NR);
  const int64_t tiles = (M + MR - 1) / MR;
  // Fetch the next panel (K lines) during this one, ceil(4 / tiles) lines per 4 k. With M = 1 the panel is
  // read once, as a plain sequential stream, which the hardware prefetcher handles best on its own.
  const int rate = M >= 2 ? static_cast<int>((4 + tiles - 1) / tiles) : 0;
  for (int64_t p = p0; p < p1; ++p) {
    const W* panel = wp + p * K * NR;
    const char* next = reinterpret_cast<const char*>(panel + K * NR);
    Prefetch pf{next, std::min(next + K * NR * sizeof(W), wend), rate};
    const int64_t n = p * NR;
    const int nvalid = static_cast<int>(std::min<int64_t>(NR, N - n));
    const float* b = bias != nullptr ? bias + n : nullptr;
    for (int64_t m = 0; m < M; m += MR) {
      const int mb = static_cast<int>(std::min<int64_t>(MR, M - m));
      tile_any(mb, x + m * K, K, panel, y + m * N + n, N, b, nvalid, pf);
    }
  }
}


// ---- AVX-512: two panels (32 output columns) per register tile ----------------------------------------------

#define SG_AVX512 __attribute__((target("avx512f,avx2,fma")))
constexpr int MR512 = 12;  // most x rows per tile: 2 * MR512 = 24 zmm accumulators (+ 2 panel + broadcasts)

// MB rows of x against P (1 or 2) adjacent panels: y[j, i] for j < MB, i < nvalid (P * 16 at most).
template <int MB, int P, typename W>
SG_AVX512 void tile512(const float* __restrict x, int64_t K, const W* __restrict panel, float* __restrict y,
                       int64_t ldy, const float* __restrict bias, int nvalid) {
  __m512 acc[P][MB];
#pragma GCC unroll 2
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 12
    for (int j = 0; j < MB; ++j) acc[p][j] = _mm512_setzero_ps();
#pragma GCC unroll 4
  for (int64_t k = 0; k < K; ++k) {
    __m512 w[P];
#pragma GCC unroll 2
    for (int p = 0; p < P; ++p) w[p] = load16(panel + p * K * NR + k * NR);
#pragma GCC unroll 12
    for (int j = 0; j < MB; ++j) {
      const __m512 xb = _mm512_set1_ps(x[j * K + k]);
#pragma GCC unroll 2
      for (int p = 0; p < P; ++p) acc[p][j] = _mm512_fmadd_ps(xb, w[p], acc[p][j]);
    }
  }
  for (int p = 0; p < P; ++p) {
    const int nv = std::min(NR, nvalid - p * NR);
    for (int j = 0; j < MB; ++j) {
      alignas(64) float t[NR];
      _mm512_store_ps(t, acc[p][j]);
      float* row = y + j * ldy + p * NR;
      for (int i = 0; i < nv; ++i) row[i] = bias != nullptr ? t[i] + bias[p * NR + i] : t[i];
    }
  }
}

template <typename W>
using Tile512 = void (*)(const float*, int64_t, const W*, float*, int64_t, const float*, int);
template <int P, typename W, size_t... I>
constexpr std::array<Tile512<W>, sizeof...(I)> tiles512(std::index_sequence<I...>) {
  return {&tile512<static_cast<int>(I) + 1, P, W>...};
}
// [P - 1][MB - 1]
template <typename W>
const std::array<Tile512<W>, MR512> kTile512[2] = {tiles512<1, W>(std::make_index_sequence<MR512>()),
                                                   tiles512<2, W>(std::make_index_sequence<MR512>())};

// Panels [p0, p1) against all of x, with tiles of up to MR512 rows and two panels from `tiles` ([P - 1][MB - 1]):
// the AVX-512 paths. The rows go in balanced blocks (M = 16: two of 8, not 12 + 4). No software prefetch: two
// sequential streams per thread are what the hardware prefetcher does best.
template <typename X, typename W, typename Y, typename Tile>
void panel_pairs(const std::array<Tile, MR512> (&tiles)[2], const X* x, int64_t M, int64_t K, const W* wp, int64_t N,
                 const float* bias, Y* y, int64_t p0, int64_t p1) {
  const int64_t blocks = (M + MR512 - 1) / MR512;
  const int64_t mr = (M + blocks - 1) / blocks;
  for (int64_t p = p0; p < p1; p += 2) {
    const int np = static_cast<int>(std::min<int64_t>(2, p1 - p));
    const int64_t n = p * NR;
    const int nvalid = static_cast<int>(std::min<int64_t>(np * NR, N - n));
    for (int64_t m = 0; m < M; m += mr) {
      const int64_t mb = std::min(mr, M - m);
      tiles[np - 1][mb - 1](x + m * K, K, wp + p * K * NR, y + m * N + n, N, bias != nullptr ? bias + n : nullptr,
                            nvalid);
    }
  }
}

bool has_avx512() { return __builtin_cpu_supports("avx512f"); }
bool has_avx512_bf16() {
  return has_avx512() && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512bf16");
}

// ---- AVX-512 BF16: bf16 x and weights, products of bf16 pairs (vdpbf16ps) -----------------------------------

#define SG_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512bf16,avx2,fma")))
using bf16 = c10::BFloat16;

// The panel's rows k and k + 1 (16 weights each, adjacent in memory) as the 16 pairs (w[i, k], w[i, k + 1]).
SG_AVX512_BF16 inline __m512i weight_pairs(const bf16* rows, __m512i interleave) {
  return _mm512_permutexvar_epi16(interleave, _mm512_loadu_si512(rows));
}

// MB rows of x against P (1 or 2) adjacent panels, as tile512, with the pairwise bf16 products.
template <int MB, int P>
SG_AVX512_BF16 void tile512_dot(const bf16* __restrict x, int64_t K, const bf16* __restrict panel,
                                bf16* __restrict y, int64_t ldy, const float* __restrict bias, int nvalid) {
  alignas(64) static constexpr int16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,
                                                           21, 6, 22, 7, 23, 8,  24, 9,  25, 10, 26,
                                                           11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i interleave = _mm512_load_si512(kInterleave);
  __m512 acc[P][MB];
#pragma GCC unroll 2
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 12
    for (int j = 0; j < MB; ++j) acc[p][j] = _mm512_setzero_ps();
  __m512i w[P];
  int64_t k = 0;
#pragma GCC unroll 2
  for (; k + 2 <= K; k += 2) {
#pragma GCC unroll 2
    for (int p = 0; p < P; ++p) w[p] = weight_pairs(panel + p * K * NR + k * NR, interleave);
#pragma GCC unroll 12
    for (int j = 0; j < MB; ++j) {
      int32_t pair;
      std::memcpy(&pair, x + j * K + k, sizeof pair);
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 2
      for (int p = 0; p < P; ++p) acc[p][j] = _mm512_dpbf16_ps(acc[p][j], xb, (__m512bh)w[p]);
    }
  }
  if (k < K) {  // odd K: the last weights and x paired with zeros
    for (int p = 0; p < P; ++p)
      w[p] = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + p * K * NR + k * NR)));
    for (int j = 0; j < MB; ++j) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(x[j * K + k].x);
      for (int p = 0; p < P; ++p) acc[p][j] = _mm512_dpbf16_ps(acc[p][j], xb, (__m512bh)w[p]);
    }
  }
  for (int p = 0; p < P; ++p) {
    const int nv = std::min(NR, nvalid - p * NR);
    for (int j = 0; j < MB; ++j) {
      alignas(64) float t[NR];
      _mm512_store_ps(t, acc[p][j]);
      bf16* row = y + j * ldy + p * NR;
      for (int i = 0; i < nv; ++i) row[i] = bf16(bias != nullptr ? t[i] + bias[p * NR + i] : t[i]);
    }
  }
}

using TileDot = void (*)(const bf16*, int64_t, const bf16*, bf16*, int64_t, const float*, int);
template <int P, size_t... I>
constexpr std::array<TileDot, sizeof...(I)> tiles_dot(std::index_sequence<I...>) {
  return {&tile512_dot<static_cast<int>(I) + 1, P>...};
}
const std::array<TileDot, MR512> kTileDot[2] = {tiles_dot<1>(std::make_index_sequence<MR512>()),
                                                tiles_dot<2>(std::make_index_sequence<MR512>())};

// ---- AMX: bf16 x and weights through the tile unit (tdpbf16ps) --------------------------------------------

constexpr int AMX_ROWS = 16;   // x rows per A tile
constexpr int AMX_CHUNK = 32;  // k per A tile row (64 bytes)

// CPUID leaf 7: AMX-TILE (EDX bit 24) and AMX-BF16 (EDX bit 22); then the kernel's permission to use the tile
// data (Linux asks each process to request it once, or the first tile instruction faults).
bool has_amx() {
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!has_avx512_bf16() || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!((d >> 24) & 1) || !((d >> 22) & 1)) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

#define SG_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512bf16,avx2,fma")))

// Tiles: 0 and 1 accumulate two panels' outputs (16 rows x 16 floats), 2 holds x (16 rows x 32 bf16), 3 and 4
// the two panels' weights (16 pair rows x 16 pairs).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64};
  uint8_t rows[16] = {AMX_ROWS, AMX_ROWS, AMX_ROWS, AMX_CHUNK / 2, AMX_CHUNK / 2};
};

// Panel pairs [q0, q1) of a pair-packed weight (see pack): y[m, 32 q .. 32 q + 31] for every m. xs: x staged as
// [Mp, Kp] bf16 (Mp, Kp multiples of 16 and 32, zero padded).
SG_AMX void amx_panels(const bf16* xs, int64_t M, int64_t Mp, int64_t Kp, const bf16* wp, int64_t N,
                       const float* bias, bf16* y, int64_t q0, int64_t q1) {
  const TileConfig config;
  _tile_loadconfig(&config);
  alignas(64) float out[AMX_ROWS][2 * NR];
  for (int64_t q = q0; q < q1; ++q) {
    const bf16* panels = wp + 2 * q * Kp * NR;
    const int64_t n = 2 * q * NR;
    const int nvalid = static_cast<int>(std::min<int64_t>(2 * NR, N - n));
    for (int64_t m = 0; m < Mp; m += AMX_ROWS) {
      _tile_zero(0);
      _tile_zero(1);
      for (int64_t k = 0; k < Kp; k += AMX_CHUNK) {
        _tile_loadd(2, xs + m * Kp + k, Kp * sizeof(bf16));
        _tile_loadd(3, panels + k * NR, 2 * NR * sizeof(bf16));
        _tile_loadd(4, panels + (Kp + k) * NR, 2 * NR * sizeof(bf16));
        _tile_dpbf16ps(0, 2, 3);
        _tile_dpbf16ps(1, 2, 4);
      }
      _tile_stored(0, &out[0][0], 2 * NR * sizeof(float));
      _tile_stored(1, &out[0][NR], 2 * NR * sizeof(float));
      for (int64_t j = 0; j < std::min<int64_t>(AMX_ROWS, M - m); ++j) {
        bf16* row = y + (m + j) * N + n;
        for (int i = 0; i < nvalid; ++i) row[i] = bf16(bias != nullptr ? out[j][i] + bias[n + i] : out[j][i]);
      }
    }
  }
  _tile_release();
}

int64_t amx_depth(int64_t K) { return (K + AMX_CHUNK - 1) / AMX_CHUNK * AMX_CHUNK; }
// Panels of the pair layout for N outputs: whole pairs of 16-row panels.
int64_t amx_panels_for(int64_t N) { return (N + 2 * NR - 1) / (2 * NR) * 2; }

// The pair layout of w [N, K] bf16: [Q, Kp / 2, 16, 2] with Q = ceil(N / 32) * 2 panels and Kp = K rounded up
// to 32; element (p, r, i, j) is w[16 p + i, 2 r + j] (zero past N or K). Each 32 x 16 block (r in a chunk of
// 16) is a tile of weights as the tile unit reads them.
void pack_pairs(const bf16* src, bf16* dst, int64_t N, int64_t K) {
  const int64_t Kp = amx_depth(K), panels = amx_panels_for(N);
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t i = 0; i < NR && p * NR + i < N; ++i)
        for (int64_t k = 0; k < K; ++k) dst[(p * Kp / 2 + k / 2) * 2 * NR + 2 * i + k % 2] = src[(p * NR + i) * K + k];
  });
}

// y = x @ w.T (+ bias) through the tile unit; x [M, K] and y [M, N] bf16, wp pair-packed.
void amx_linear(const bf16* x, int64_t M, int64_t K, const bf16* wp, int64_t N, const float* bias, bf16* y,
                int64_t grain) {
  const int64_t Mp = (M + AMX_ROWS - 1) / AMX_ROWS * AMX_ROWS, Kp = amx_depth(K);
  std::vector<bf16> xs(Mp * Kp, bf16(0.0f));
  for (int64_t m = 0; m < M; ++m) std::memcpy(xs.data() + m * Kp, x + m * K, K * sizeof(bf16));
  at::parallel_for(0, amx_panels_for(N) / 2, std::max<int64_t>(1, grain / 2), [&](int64_t q0, int64_t q1) {
    amx_panels(xs.data(), M, Mp, Kp, wp, N, bias, y, q0, q1);
  });
}

bool is_weight_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16; }

template <typename T>
void pack_panels(const T* src, T* dst, int64_t N, int64_t K) {
  at::parallel_for(0, (N + NR - 1) / NR, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t i = 0; i < NR && p * NR + i < N; ++i) {
        const T* row = src + (p * NR + i) * K;
        T* col = dst + p * K * NR + i;
        for (int64_t k = 0; k < K; ++k) col[k * NR] = row[k];
      }
  });
}

// w [N, K] -> wp [ceil(N / 16), K, 16] of w's dtype (float32 or bfloat16), rows past N zero; or with `pairs`
// (bfloat16 only) the tile unit's layout [ceil(N / 32) * 2, Kp / 2, 16, 2] (see pack_pairs), which only the
// AMX path reads.
at::Tensor pack(const at::Tensor& w, bool pairs) {
  TORCH_CHECK(w.device().is_cpu() && is_weight_dtype(w.scalar_type()) && w.dim() == 2,
              "small_gemm.pack: w must be a float32 or bfloat16 [N, K] CPU tensor");
  TORCH_CHECK(!pairs || w.scalar_type() == at::kBFloat16, "small_gemm.pack: the pair layout is for bfloat16");
  const at::Tensor wc = w.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  if (pairs) {
    at::Tensor out = at::zeros({amx_panels_for(N), amx_depth(K) / 2, NR, 2}, w.options());
    pack_pairs(wc.data_ptr<bf16>(), out.data_ptr<bf16>(), N, K);
    return out;
  }
  at::Tensor out = at::zeros({(N + NR - 1) / NR, K, NR}, w.options());
  if (w.scalar_type() == at::kBFloat16)
    pack_panels(wc.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), N, K);
  else
    pack_panels(wc.data_ptr<float>(), out.data_ptr<float>(), N, K);
  return out;
}

// x [M, K] @ w.T (+ bias) with wp = pack(w, pairs) and n = w.size(0). A pair-packed wp takes the AMX path
// (isa "auto" or "amx"; bfloat16 x). Otherwise isa: "auto" (the bf16 pair products for bfloat16 x and weights
// where the CPU has AVX-512 BF16, else AVX-512 where it has that), "avx2", "avx512" (these two give bitwise the
// same y) or "avx512_bf16" (bfloat16 x and weights). x and y are float32 with float32 weights; with bfloat16
// weights, float32 or bfloat16 (y has x's dtype); bias float32 or bfloat16.
at::Tensor linear(const at::Tensor& x, const at::Tensor& wp, int64_t n, const std::optional<at::Tensor>& bias,
                  std::string_view isa) {
  TORCH_CHECK(isa == "auto" || isa == "avx2" || isa == "avx512" || isa == "avx512_bf16" || isa == "amx",
              "small_gemm.linear: isa must be auto, avx2, avx512, avx512_bf16 or amx");
  const bool tiles = wp.dim() == 4;
  TORCH_CHECK(!tiles || isa == "auto" || isa == "amx", "small_gemm.linear: a pair-packed weight takes the amx path");
  TORCH_CHECK(tiles || isa != "amx", "small_gemm.linear: the amx path needs a pair-packed weight");
  TORCH_CHECK(!tiles || has_amx(), "small_gemm.linear: this CPU has no AMX (or the OS does not allow it)");
  TORCH_CHECK(isa != "avx512" || has_avx512(), "small_gemm.linear: this CPU has no AVX-512");
  TORCH_CHECK(isa != "avx512_bf16" || has_avx512_bf16(), "small_gemm.linear: this CPU has no AVX-512 BF16");
  const bool wide = isa == "avx512" || (isa == "auto" && has_avx512());
  const bool bf16_w = wp.scalar_type() == at::kBFloat16;
  const bool bf16_x = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK((isa != "avx512_bf16" && !tiles) || (bf16_w && bf16_x),
              "small_gemm.linear: the avx512_bf16 and amx paths need bfloat16 x and weights");
  const bool dot = bf16_w && bf16_x && !tiles && (isa == "avx512_bf16" || (isa == "auto" && has_avx512_bf16()));
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous() &&
                  (x.scalar_type() == at::kFloat || (bf16_w && bf16_x)),
              "small_gemm.linear: x must be a contiguous [M, K] CPU tensor, float32 (or bfloat16 with bfloat16 "
              "weights)");
  const int64_t M = x.size(0), K = x.size(1), N = n;
  const bool plain_shape = wp.dim() == 3 && wp.size(0) == (N + NR - 1) / NR && wp.size(1) == K && wp.size(2) == NR;
  const bool pair_shape = tiles && wp.size(0) == amx_panels_for(N) && wp.size(1) == amx_depth(K) / 2 &&
                          wp.size(2) == NR && wp.size(3) == 2;
  TORCH_CHECK(N >= 0 && wp.device().is_cpu() && is_weight_dtype(wp.scalar_type()) && wp.is_contiguous() &&
                  (plain_shape || pair_shape),
              "small_gemm.linear: wp must be pack(w) of a [n, K] weight (x is [M, K])");
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->device().is_cpu() && is_weight_dtype(bias->scalar_type()) && bias->dim() == 1 &&
                    bias->size(0) == N,
                "small_gemm: bias must be a float32 or bfloat16 [N] CPU tensor");
    b = bias->to(at::kFloat).contiguous();
  }
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  // Threads take whole panels (which thread computes a panel does not change any y[m, n]); a thread's share
  // is at least ~256 KB of float32 weights so that small matrices do not pay for waking the other threads.
  const int64_t npanels = (N + NR - 1) / NR;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, K * NR));
  if (tiles || dot) {
    at::Tensor y = at::empty({M, N}, x.options());
    if (M == 0 || N == 0) return y;
    const bf16* xp = x.data_ptr<bf16>();
    const bf16* w = wp.data_ptr<bf16>();
    bf16* yp = y.data_ptr<bf16>();
    if (tiles) {
      amx_linear(xp, M, K, w, N, bp, yp, grain);
      return y;
    }
    at::parallel_for(0, npanels, grain, [&](int64_t p0, int64_t p1) {
      panel_pairs(kTileDot, xp, M, K, w, N, bp, yp, p0, p1);
    });
    return y;
  }
  const at::Tensor xf = x.to(at::kFloat);  // exact for bfloat16; x itself for float32
  at::Tensor y = at::empty({M, N}, xf.options());
  if (M == 0 || N == 0) return y.to(x.scalar_type());
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  auto run = [&](const auto* w) {
    at::parallel_for(0, npanels, grain, [&](int64_t p0, int64_t p1) {
      if (wide)
        panel_pairs(kTile512<std::remove_cv_t<std::remove_pointer_t<decltype(w)>>>, xp, M, K, w, N, bp, yp, p0, p1);
      else
        panels_avx2(xp, M, K, w, N, bp, yp, p0, p1);
    });
  };
  if (bf16_w)
    run(wp.data_ptr<bf16>());
  else
    run(wp.data_ptr<float>());
  return y.to(x.scalar_type());  // round to nearest even, once per output, for bfloat16 x
}

}  // namespace

SG_TORCH_LIBRARY_FRAGMENT(SG_LIBNAME, m) {
  m.def("pack(Tensor w, bool pairs=False) -> Tensor");
  m.def("linear(Tensor x, Tensor wp, int n, Tensor? bias=None, str isa='auto') -> Tensor");
  m.def("has_avx512() -> bool", &has_avx512);
  m.def("has_avx512_bf16() -> bool", &has_avx512_bf16);
  m.def("has_amx() -> bool", &has_amx);
}
SG_TORCH_LIBRARY_IMPL(SG_LIBNAME, CPU, m) {
  m.impl("pack", &pack);
  m.impl("linear", &linear);
}
