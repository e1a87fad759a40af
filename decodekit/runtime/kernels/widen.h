// Vector loads of float32 or bfloat16 data as float32, shared by the kernels of the decodekit_cpu extension.
// A bfloat16 is the top half of a float32, so widening is exact: zero-extend each 16-bit value to 32 bits and
// shift it into the top half. Kernels templated on the element type thus run the same float32 arithmetic on
// either, and a bfloat16 tensor gives bitwise what its float32 copy gives.
// torch rebuilds the extension when a .cpp changes, not this header: touch a .cpp after editing it.
#pragma once

#include <c10/util/BFloat16.h>

#include <immintrin.h>

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

__attribute__((target("avx512f,avx2,fma"))) inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
__attribute__((target("avx512f,avx2,fma"))) inline __m512 load16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
