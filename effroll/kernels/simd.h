// Shared by effroll's CPU kernels (int4_gemm.cpp, bf16_gemm.cpp): the CPU check and the bf16 <-> fp32
// conversions, AVX2 only. Part of every kernel library's cache key (effroll/kernels/__init__.py).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#define EFFROLL_X86 1
#define TARGET __attribute__((target("avx2,fma")))
#else
#define EFFROLL_X86 0
#endif

namespace effroll {

inline bool cpu_supported() {
#if EFFROLL_X86
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

#if EFFROLL_X86

// 8 bf16 -> 8 fp32 (a bf16 is the top half of its fp32: a 16-bit shift is exact).
TARGET inline __m256 load_bf16x8(const uint16_t* p) {
  __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

// fp32 -> bf16 bits in the low half of each lane, round to nearest even; NaN stays a (quiet) NaN.
TARGET inline __m256i to_bf16_lanes(__m256 v) {
  __m256i i = _mm256_castps_si256(v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(i, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(i, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(i, _mm256_set1_epi32(0x400000)), nan);
  return _mm256_srli_epi32(r, 16);
}

// The same rounding for 4 floats.
TARGET inline __m128i to_bf16_lanes(__m128 v) {
  __m128i i = _mm_castps_si128(v);
  __m128i lsb = _mm_and_si128(_mm_srli_epi32(i, 16), _mm_set1_epi32(1));
  __m128i r = _mm_add_epi32(i, _mm_add_epi32(lsb, _mm_set1_epi32(0x7FFF)));
  __m128i nan = _mm_castps_si128(_mm_cmpunord_ps(v, v));
  r = _mm_blendv_epi8(r, _mm_or_si128(i, _mm_set1_epi32(0x400000)), nan);
  return _mm_srli_epi32(r, 16);
}

// 16 floats (a: columns 0..7, b: 8..15) -> 16 bf16 in order.
TARGET inline __m256i to_bf16x16(__m256 a, __m256 b) {
  __m256i p = _mm256_packus_epi32(to_bf16_lanes(a), to_bf16_lanes(b));  // a0-3 b0-3 | a4-7 b4-7
  return _mm256_permute4x64_epi64(p, 0xD8);
}

#endif  // EFFROLL_X86

}  // namespace effroll
