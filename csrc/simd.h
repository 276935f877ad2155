// Vector types and helpers of one instruction-set variant (GCC vector extensions), shared by
// kernels.cpp and train.cpp. Included inside their namespace n2l::N2L_ARCH::{anonymous}, after
// <cstring> and <cstdint>: no includes here.
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

