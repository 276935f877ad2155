// Vector types and helpers of one instruction-set variant (GCC vector extensions), shared by
// kernels.cpp and train.cpp. Included inside their namespace n2l::N2L_ARCH::{anonymous}, after
// <cmath>, <cstring> and <cstdint>: no includes here.
#pragma once

#if defined(__AVX512F__)
constexpr int VL = 16;  // floats per vector
constexpr int OB = 4;   // output channels per register block
#elif defined(__AVX__)
constexpr int VL = 8;
constexpr int OB = 3;
#else
constexpr int VL = 4;
constexpr int OB = 2;
#endif
constexpr int P = 32;  // pixels per chunk
constexpr int NV = P / VL;

typedef float vf __attribute__((vector_size(VL * 4)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));

inline vf bcast(float x) { return vf{} + x; }
inline vf loadu(const float* p) {
  vf v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
inline void storeu(float* p, vf v) { __builtin_memcpy(p, &v, sizeof v); }
inline vf vmax0(vf x) { return x > 0.0f ? x : vf{}; }
inline int imin(int a, int b) { return a < b ? a : b; }
inline int imax(int a, int b) { return a > b ? a : b; }
inline int clampi(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }


// Bicubic taps of output index r (FORMAT.md "Bicubic upsampling"): the 4 inputs idx[0..3],
// floor(src) - 1 .. floor(src) + 2 clamped to [0, n_in), and their cubic convolution weights
// (a = -0.75), computed in double and rounded to float as the reference builds them.
inline void cubic_taps(int r, int factor, int n_in, int* idx, float* wt) {
  const double a = -0.75, src = (r + 0.5) / factor - 0.5, lo = std::floor(src), t = src - lo;
  const double d[4] = {t + 1, t, 1 - t, 2 - t};
  for (int k = 0; k < 4; ++k) {
    const double u = d[k];
    const double v = (k == 1 || k == 2) ? ((a + 2) * u - (a + 3)) * u * u + 1 : ((a * u - 5 * a) * u + 8 * a) * u - 4 * a;
    idx[k] = clampi(static_cast<int>(lo) - 1 + k, 0, n_in - 1);
    wt[k] = static_cast<float>(v);
  }
}
