// Shared declarations of the n2l C++ CPU core (decoder and training kernels).
//
// kernels.cpp, noise.cpp and train.cpp are compiled once per instruction-set variant (base, avx2,
// avx512), each into its own namespace n2l::<variant>; module.cpp picks one at run time.
// Keep this header free of standard-library templates: an inline template instantiated in
// an AVX-512 translation unit could be merged by the linker into code that runs on a CPU
// without AVX-512.
#pragma once
#include <cstdint>

namespace n2l {

constexpr int kMaxScales = 12;
constexpr int kMaxSynth = 9;     // up to 8 hidden 1x1 layers + the output layer
constexpr int kMaxResidual = 8;
constexpr int kMaxWidth = 64;  // widest layer of the training kernels' fused 1x1 stacks

struct Layer {
  const float* w = nullptr;  // [cout, cin, k, k]
  const float* b = nullptr;  // [cout]
  int cin = 0, cout = 0, k = 1;
};

// One network and image size, plus the whole coarse latents y_s (s >= 1), [C, h_s, w_s] each.
struct Net {
  uint32_t seed = 0;
  int H = 0, W = 0;
  int M = 0, C = 0, G = 0, Cout = 0;
  int n_synth = 0, n_res = 0;
  int hs[kMaxScales] = {}, ws[kMaxScales] = {};
  Layer gpp0[kMaxScales], gpp1[kMaxScales];
  Layer synth[kMaxSynth];
  Layer res[kMaxResidual];
  float* ys[kMaxScales] = {};  // ys[0] unused: scale 0 is streamed into the synthesis
  const float* y0_coded = nullptr;  // scale 0's transmitted latent [C, H, W] when it is coded
  bool bicubic = false;  // the synthesis upsamples the latents with the bicubic kernel (else bilinear)
};

// The encoder's training kernels of one variant (train.cpp), each false if out of memory. A
// 3x3 convolution with edge-replication padding on one image, x [C, H, W], w [O, C, 3, 3],
// b [O], y [O, H, W], on rows [r0, r1).
struct TrainKernels {
  bool (*conv3x3_rows)(const float* x, int C, int H, int W, const float* w, const float* b, int O, float* y, int r0,
                       int r1);
  // gx rows [r0, r1) of the input gradient; gw [O*C*9] and gb [O] (overwritten): the weight
  // and bias gradients of output rows [r0, r1) only, for the caller to sum over bands.
  bool (*conv3x3_backward_rows)(const float* x, const float* gy, int C, int H, int W, const float* w, int O,
                                float* gx, float* gw, float* gb, int r0, int r1);
  // y [C, H, W] = bilinear upsampling of x [C, h, w] by `factor` (FORMAT.md), cropped to H x W;
  // and the gradient gx [C, h, w] of its input from gy [C, H, W].
  bool (*upsample)(const float* x, int C, int h, int w, int factor, int H, int W, float* y);
  bool (*upsample_backward)(const float* gy, int C, int h, int w, int factor, int H, int W, float* gx);
  // The same with bicubic upsampling (FORMAT.md, the synthesis' kernel when signalled).
  bool (*upsample_cubic)(const float* x, int C, int h, int w, int factor, int H, int W, float* y);
  bool (*upsample_cubic_backward)(const float* gy, int C, int h, int w, int factor, int H, int W, float* gx);
  // 1x1 layers (k = 1, widths <= kMaxWidth) with ReLU between them, y [cout, N] from x [cin, N],
  // on pixels [p0, p1); and their backward: gx of those pixels, and into grads (overwritten)
  // the parameter gradients of those pixels only, per layer its weight then its bias.
  bool (*pointwise)(const float* x, int N, const Layer* layers, int n_layers, float* y, int p0, int p1);
  bool (*pointwise_backward)(const float* x, const float* gy, int N, const Layer* layers, int n_layers, float* gx,
                             float* grads, int p0, int p1);
};

// The entry points of one instruction-set variant.
struct Kernels {
  const char* name;
  // Noise of (seed, scale, channel, row y) at columns x0 .. x0+n-1 into out[0..n).
  void (*noise_row)(uint32_t seed, uint32_t scale, uint32_t channel, uint32_t y, uint32_t x0, int n,
                    float* out);
  // Latent y_s of a generated scale, rows [r0, r1), into net.ys[s] (needs net.ys[s+1] complete).
  // Returns false if out of memory.
  bool (*coarse_band)(const Net& net, int s, int r0, int r1);
  // Pixels of rows [r0, r1) into out ([H, W, Cout] uint8). Needs all net.ys[s >= 1].
  bool (*fine_band)(const Net& net, int r0, int r1, uint8_t* out);
  const TrainKernels* train;  // the encoder's kernels, same variant
};

#define N2L_DECLARE_VARIANT(ns) \
  namespace ns {                \
  extern const Kernels kernels; \
  extern const TrainKernels train_kernels; \
  void noise_row(uint32_t, uint32_t, uint32_t, uint32_t, uint32_t, int, float*); \
  void quantize_row(const float*, int, int, uint8_t*); \
  }

N2L_DECLARE_VARIANT(base)
#if defined(__x86_64__) || defined(_M_X64)
N2L_DECLARE_VARIANT(avx2)
N2L_DECLARE_VARIANT(avx512)
#endif

}  // namespace n2l
