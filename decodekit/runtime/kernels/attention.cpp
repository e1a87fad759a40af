// Attention of a few queries (a decode step, a draft tree) over a float32 or bfloat16 KV cache, on AVX2 + FMA
// CPUs. bfloat16 keys and values are widened to float32 as they are loaded (exact), bfloat16 queries before;
// the arithmetic below is float32 either way and the output is rounded to the queries' dtype once.
//
// out[b, h, r] = softmax(scale * q[b, h, r] . k[b, g, j]) @ v[b, g, j] over the slots j that query r may see
// (mask[b, 0, r, j], all slots when there is no mask), with g = h / (heads / kv_heads) (grouped queries).
//
// Each (b, h, r) is computed as if alone: the visible slots are gathered in slot order, then
//   s_t = scale * (q . k_t)  per key: per-lane fma over d, then one fixed reduction tree,
//   p_t = exp(s_t - max s)   8 at a time with one polynomial,
//   sum = lanes of p summed over chunks of 8, then one fixed reduction tree,
//   out = (sum_t p_t v_t) / sum  with t in order.
// So a query's output depends only on the sequence of (key, value) pairs it sees, not on the other queries,
// their number, the masked slots or the thread: a token decoded alone and the same token verified in a
// tree (same position, same visible keys in the same order) get bitwise the same output; torch's CPU flash
// attention has no such promise. Up to 3 heads of a group go together, so each key and value row is loaded
// once for all of them; a group's keys and values stay in L2 across its queries.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "registration.h"
#include "simd_math.h"
#include "widen.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// s[r][0..4) = scale * (q[r] . key[i]) for R rows of q and 4 keys of C * 8 floats, the keys loaded once for
// all rows. Each dot is hsum8 of the per-lane fma chain (lane l: q[l] k[l], then fma over l + 8, l + 16, ...),
// whatever R is and wherever the key sits among the 4.
template <int C, int R, typename T>
inline void dot4(const float* const* q, const T* const* key, float scale, float* const* s) {
  __m256 acc[R][4];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const __m256 q0 = _mm256_loadu_ps(q[r]);
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) acc[r][i] = _mm256_mul_ps(q0, load8(key[i]));
  }
#pragma GCC unroll 16
  for (int c = 1; c < C; ++c) {
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      const __m256 kc = load8(key[i] + 8 * c);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[r][i] = _mm256_fmadd_ps(_mm256_loadu_ps(q[r] + 8 * c), kc, acc[r][i]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    // transpose-reduce: element i is hsum8(acc[r][i]), in hsum8's order
    const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(acc[r][0], acc[r][1]), _mm256_hadd_ps(acc[r][2], acc[r][3]));
    const __m128 dots = _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
    _mm_storeu_ps(s[r], _mm_mul_ps(dots, _mm_set1_ps(scale)));
  }
}

// The slots a query sees, in order: a run [first, first + run) (the prefix, or the part of it inside a
// sliding window) followed by `extra` single slots (its tree ancestors).
struct Visible {
  int64_t first = 0, run = 0;
  std::vector<int64_t> extra;
  int64_t count() const { return run + static_cast<int64_t>(extra.size()); }
  int64_t slot(int64_t t) const { return t < run ? first + t : extra[t - run]; }

  // from W bools (null: all W slots)
  void assign(const bool* visible, int64_t W) {
    extra.clear();
    if (visible == nullptr) {
      first = 0, run = W;
      return;
    }
    const char* row = reinterpret_cast<const char*>(visible);
    const void* on = std::memchr(row, 1, W);
    first = on != nullptr ? static_cast<const char*>(on) - row : W;
    const void* off = std::memchr(row + first, 0, W - first);
    const int64_t end = off != nullptr ? static_cast<const char*>(off) - row : W;
    run = end - first;
    for (int64_t j = end; j < W; ++j)
      if (visible[j]) extra.push_back(j);
  }
};

struct Scratch {
  Visible visible;
  std::vector<float> p;     // per row: scores, then probabilities (padded to a multiple of 8)
  std::vector<float> zero;  // a zero key for padding the last group of keys (all bits zero: float or bf16)
};

// R heads of one query (they share its visible slots): q[r] [C * 8], keys/values rows at k + j * ks,
// v + j * vs for the slots j in sc.visible; writes out[r] [C * 8]. Each head's result is what it would be alone.
template <int C, int R, typename T>
void heads_of_query(const float* const* q, const T* k, int64_t ks, const T* v, int64_t vs, float scale,
                    float* const* out, Scratch& sc) {
  const Visible& vis = sc.visible;
  const int64_t cnt = vis.count();
  if (cnt == 0) {  // a query that sees nothing (not produced by our masks): zeros, as a defined answer
    for (int r = 0; r < R; ++r) std::fill(out[r], out[r] + 8 * C, 0.0f);
    return;
  }
  const int64_t padded = (cnt + 7) / 8 * 8;
  sc.p.resize(R * padded);
  sc.zero.assign(8 * C, 0.0f);
  float* p[R];
  for (int r = 0; r < R; ++r) p[r] = sc.p.data() + r * padded;
  const T* key[4];
  const T* zero = reinterpret_cast<const T*>(sc.zero.data());
  float* s[R];
  for (int64_t t = 0; t < padded; t += 4) {
    for (int i = 0; i < 4; ++i) key[i] = t + i < cnt ? k + vis.slot(t + i) * ks : zero;
    for (int r = 0; r < R; ++r) s[r] = p[r] + t;
    dot4<C, R>(q, key, scale, s);
  }
  __m256 sum[R];
  for (int r = 0; r < R; ++r) {
    float mx = p[r][0];
    for (int64_t t = 1; t < cnt; ++t) mx = std::max(mx, p[r][t]);
    const __m256 vmx = _mm256_set1_ps(mx);
    __m256 lanes = _mm256_setzero_ps();
    for (int64_t t = 0; t < padded; t += 8) {
      __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p[r] + t), vmx));
      if (t + 8 > cnt) {  // the padding's probabilities are zero
        alignas(32) float keep[8];
        for (int i = 0; i < 8; ++i) keep[i] = t + i < cnt ? 1.0f : 0.0f;
        e = _mm256_mul_ps(e, _mm256_load_ps(keep));
      }
      _mm256_storeu_ps(p[r] + t, e);
      lanes = _mm256_add_ps(lanes, e);
    }
    sum[r] = _mm256_set1_ps(hsum8(lanes));
  }
  // out[r] = sum_t p[r][t] v_t / sum[r], 32 columns at a time (R x 4 accumulators), each value row loaded
  // once for the R heads; per output float: fma over t in order.
  for (int c0 = 0; c0 < C; c0 += 4) {
    __m256 acc[R][4];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm256_setzero_ps();
    auto add_value = [&](int64_t t, const T* row) __attribute__((always_inline)) {
      __m256 vc[4];
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) vc[c] = load8(row + 8 * (c0 + c));
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m256 pt = _mm256_broadcast_ss(p[r] + t);
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) acc[r][c] = _mm256_fmadd_ps(pt, vc[c], acc[r][c]);
      }
    };
    for (int64_t t = 0; t < vis.run; ++t) add_value(t, v + (vis.first + t) * vs);
    for (int64_t t = vis.run; t < cnt; ++t) add_value(t, v + vis.extra[t - vis.run] * vs);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) _mm256_storeu_ps(out[r] + 8 * (c0 + c), _mm256_div_ps(acc[r][c], sum[r]));
  }
}

constexpr int HEADS_PER_TASK = 3;  // R: 3 x 4 dot accumulators and 3 x 4 value accumulators fit 16 ymm

template <int C, typename T>
void heads_any(int R, const float* const* q, const T* k, int64_t ks, const T* v, int64_t vs, float scale,
               float* const* out, Scratch& sc) {
  static_assert(HEADS_PER_TASK == 3, "heads_any instantiates 1 .. 3 heads");
  switch (R) {
    case 1: heads_of_query<C, 1>(q, k, ks, v, vs, scale, out, sc); break;
    case 2: heads_of_query<C, 2>(q, k, ks, v, vs, scale, out, sc); break;
    default: heads_of_query<C, 3>(q, k, ks, v, vs, scale, out, sc); break;
  }
}

// q [B, H, n, d], k and v [B, G, W, d] (each with unit stride in d; all float32 or all bfloat16), mask bool
// [B, 1, n, W] or none; returns [B, H, n, d] of q's dtype (a view of a contiguous [B, n, H, d] buffer, so that
// .transpose(1, 2) is contiguous).
template <typename T>
at::Tensor attention_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const std::optional<at::Tensor>& mask, double scale) {
  const int64_t B = q.size(0), H = q.size(1), n = q.size(2), d = q.size(3), G = k.size(1), W = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == G && v.size(2) == W && k.size(3) == d &&
                  v.size(3) == d && G > 0 && H % G == 0,
              "attention: shapes do not match (q [B, H, n, d], k and v [B, G, W, d], H a multiple of G)");
  TORCH_CHECK(d == 64 || d == 128 || d == 256, "attention: head_dim must be 64, 128 or 256");
  const bool* mp = nullptr;
  at::Tensor m;
  if (mask.has_value() && mask->defined()) {
    m = mask->contiguous();
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 4 && m.size(0) == B && m.size(1) == 1 &&
                    m.size(2) == n && m.size(3) == W,
                "attention: mask must be bool [B, 1, n, W]");
    mp = m.data_ptr<bool>();
  }
  const at::Tensor qf = q.to(at::kFloat);  // exact for bfloat16; q itself for float32
  at::Tensor out = at::empty({B, n, H, d}, qf.options());
  const float* qp = qf.data_ptr<float>();
  const T *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  float* op = out.data_ptr<float>();
  const int64_t group = H / G, blocks = (group + HEADS_PER_TASK - 1) / HEADS_PER_TASK;
  const float sc = static_cast<float>(scale);
  // a task: up to HEADS_PER_TASK heads of one group for one query, in (b, g, r, block) order so that
  // consecutive tasks share a group's keys and values
  at::parallel_for(0, B * G * n * blocks, 1, [&](int64_t t0, int64_t t1) {
    Scratch scratch;
    const float* qr[HEADS_PER_TASK];
    float* o[HEADS_PER_TASK];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / (G * n * blocks), g = t / (n * blocks) % G, r = t / blocks % n, blk = t % blocks;
      const int64_t h0 = g * group + blk * HEADS_PER_TASK;
      const int R = static_cast<int>(std::min<int64_t>(HEADS_PER_TASK, (g + 1) * group - h0));
      for (int i = 0; i < R; ++i) {
        qr[i] = qp + b * qf.stride(0) + (h0 + i) * qf.stride(1) + r * qf.stride(2);
        o[i] = op + ((b * n + r) * H + h0 + i) * d;
      }
      scratch.visible.assign(mp != nullptr ? mp + (b * n + r) * W : nullptr, W);
      const T* kb = kp + b * k.stride(0) + g * k.stride(1);
      const T* vb = vp + b * v.stride(0) + g * v.stride(1);
      if (d == 64)
        heads_any<8>(R, qr, kb, k.stride(2), vb, v.stride(2), sc, o, scratch);
      else if (d == 128)
        heads_any<16>(R, qr, kb, k.stride(2), vb, v.stride(2), sc, o, scratch);
      else
        heads_any<32>(R, qr, kb, k.stride(2), vb, v.stride(2), sc, o, scratch);
    }
  });
  return out.to(q.scalar_type()).transpose(1, 2);  // rounded once for bfloat16
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention: q, k, v must be 4-d");
  const at::ScalarType dtype = q.scalar_type();
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == dtype && t->stride(3) == 1 &&
                    (dtype == at::kFloat || dtype == at::kBFloat16),
                "attention: q, k, v must be float32 or bfloat16 CPU tensors of one dtype, contiguous in the last "
                "dimension");
  return dtype == at::kBFloat16 ? attention_of<c10::BFloat16>(q, k, v, mask, scale)
                                : attention_of<float>(q, k, v, mask, scale);
}

}  // namespace

SG_TORCH_LIBRARY_FRAGMENT(SG_LIBNAME, m) {
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
}
SG_TORCH_LIBRARY_IMPL(SG_LIBNAME, CPU, m) { m.impl("attention", &attention); }
