// Lane-wise float32 math on 8-float vectors (AVX2 + FMA), shared by the kernels of the decodekit_cpu extension.
// Each lane's result depends only on that lane's input, and a horizontal sum always adds in the same order, so
// a value computed with these is the same wherever it sits in a vector and whatever its neighbours are.
// torch rebuilds the extension when a .cpp changes, not this header: touch a .cpp after editing it.
#pragma once

#include <immintrin.h>

// exp(x) for 8 floats (x clamped to [-87.3, 88.3]): Cody-Waite reduction x = n ln2 + f, then a
// degree-5 polynomial for exp(f) and 2^n through the exponent bits. ~1 ulp; lane-wise, so a value's result
// does not depend on its neighbours.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 f = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  f = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), f);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(f, f), _mm256_add_ps(f, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// Sum of the 8 lanes, always as ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)).
inline float hsum8(__m256 v) {
  const __m256 pairs = _mm256_hadd_ps(v, v);          // l0+l1, l2+l3, ., . | l4+l5, l6+l7, ., .
  const __m256 quads = _mm256_hadd_ps(pairs, pairs);  // (l0+l1)+(l2+l3), ... | (l4+l5)+(l6+l7), ...
  return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(quads), _mm256_extractf128_ps(quads, 1)));
}
