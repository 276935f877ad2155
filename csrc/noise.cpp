// Philox4x32-10 noise, bit-identical to n2l/noise.py (docs/FORMAT.md section 1).
//
// This file must be compiled with -ffp-contract=off and without -ffast-math: the single
// float32 multiply below may not be fused with anything (CMakeLists.txt sets the flags).
#include <cstddef>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "core.h"

#ifndef N2L_ARCH
#error "compile with -DN2L_ARCH=<variant namespace>"
#endif

namespace n2l {
namespace N2L_ARCH {

namespace {
constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
constexpr int32_t kCenter = 262140;                // 8 * 65535 / 2
constexpr float kScale = 1.8688124328036793e-05f;  // float32 bits 0x379CC471
}  // namespace

#if defined(__AVX512F__)
// (hi, lo) 32-bit halves of a * m in 16 lanes: vpmuludq on the even and the odd lanes, then
// blends; about twice as fast as GCC's vectorization of the scalar loop below.
inline void mulhilo(__m512i a, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

inline __m512i halves(__m512i w) {
  return _mm512_add_epi32(_mm512_srli_epi32(w, 16), _mm512_and_si512(w, _mm512_set1_epi32(0xFFFF)));
}
#endif

void noise_row(uint32_t seed, uint32_t scale, uint32_t channel, uint32_t y, uint32_t x0, int n,
               float* __restrict out) {
#if defined(__AVX512F__)
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kM0)), m1 = _mm512_set1_epi32(static_cast<int>(kM1));
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int i = 0; i < n; i += 16) {
    __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(x0 + static_cast<uint32_t>(i))), iota);
    __m512i c1 = _mm512_set1_epi32(static_cast<int>(y));
    __m512i c2 = _mm512_set1_epi32(static_cast<int>(channel));
    __m512i c3 = _mm512_set1_epi32(static_cast<int>(scale));
    uint32_t k0 = seed, k1 = 0;
    for (int round = 0; round < 10; ++round) {
      __m512i hi0, lo0, hi1, lo1;
      mulhilo(c0, m0, hi0, lo0);
      mulhilo(c2, m1, hi1, lo1);
      c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(static_cast<int>(k0)));
      c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(static_cast<int>(k1)));
      c1 = lo1;
      c3 = lo0;
      k0 += kW0;
      k1 += kW1;
    }
    const __m512i sum = _mm512_add_epi32(_mm512_add_epi32(halves(c0), halves(c1)), _mm512_add_epi32(halves(c2), halves(c3)));
    const __m512 z = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(sum, _mm512_set1_epi32(kCenter))),
                                   _mm512_set1_ps(kScale));
    const int rest = n - i;
    if (rest >= 16)
      _mm512_storeu_ps(out + i, z);
    else
      _mm512_mask_storeu_ps(out + i, static_cast<__mmask16>((1u << rest) - 1), z);
  }
#else
  // Plain element-wise loop over x with no cross-iteration dependency: GCC vectorizes the
  // 32x32->64-bit products (vpmuludq) for every variant.
  for (int i = 0; i < n; ++i) {
    uint32_t c0 = x0 + static_cast<uint32_t>(i), c1 = y, c2 = channel, c3 = scale;
    uint32_t k0 = seed, k1 = 0;
    for (int round = 0; round < 10; ++round) {
      const uint64_t p0 = static_cast<uint64_t>(kM0) * c0;
      const uint64_t p1 = static_cast<uint64_t>(kM1) * c2;
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
      c1 = static_cast<uint32_t>(p1);
      c3 = static_cast<uint32_t>(p0);
      c0 = n0;
      c2 = n2;
      k0 += kW0;
      k1 += kW1;
    }
    const int32_t sum = static_cast<int32_t>((c0 >> 16) + (c0 & 0xFFFFu) + (c1 >> 16) + (c1 & 0xFFFFu) +
                                             (c2 >> 16) + (c2 & 0xFFFFu) + (c3 >> 16) + (c3 & 0xFFFFu));
    // float(m) is exact (|m| < 2^24); one correctly rounded multiply, never an FMA.
    out[i] = static_cast<float>(sum - kCenter) * kScale;
  }
#endif
}

// pixel = round_half_even(clamp(x, 0, 1) * 255), written every `step` bytes. Here rather than
// in kernels.cpp because it needs the same no-contraction rule: x * 255 must be rounded to
// float32 before the rounding to an integer, as torch does.
void quantize_row(const float* __restrict x, int n, int step, uint8_t* __restrict out) {
  for (int i = 0; i < n; ++i) {
    float v = x[i];
    v = v > 0.0f ? v : 0.0f;
    v = v < 1.0f ? v : 1.0f;
    // Adding and subtracting 1.5 * 2^23 rounds 0 <= v * 255 <= 255 to an integer, ties to even
    // (the default rounding mode), exactly like torch.round; it vectorizes where roundeven may not.
    const float q = (v * 255.0f + 12582912.0f) - 12582912.0f;
    out[static_cast<size_t>(i) * step] = static_cast<uint8_t>(static_cast<int>(q));
  }
}

}  // namespace N2L_ARCH
}  // namespace n2l
