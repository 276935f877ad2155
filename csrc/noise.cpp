// Philox4x32-10 noise, bit-identical to n2l/noise.py (docs/FORMAT.md section 1).
//
// This file must be compiled with -ffp-contract=off and without -ffast-math: the single
// float32 multiply below may not be fused with anything (CMakeLists.txt sets the flags).
#include <cstddef>

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

void noise_row(uint32_t seed, uint32_t scale, uint32_t channel, uint32_t y, uint32_t x0, int n,
               float* __restrict out) {
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
