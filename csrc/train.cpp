// Training kernels of the encoder, forward and backward, on one image [C, H, W]: the 3x3
// convolution with edge-replication padding (the synthesis residual layers, and pure mode's
// 3x3 GPP layers), the bilinear upsampling of the latents, and stacks of 1x1 layers with ReLU
// between them (the synthesis and the GPPs), fused per pixel. torch runs these tiny-channel convolutions through oneDNN at a fraction
// of the machine's speed; here each row is a few vector loops. Compiled per instruction-set
// variant like kernels.cpp. Work is split into bands of output rows; a band's result never
// depends on which thread computes it, so training is deterministic for any thread count.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "core.h"

#ifndef N2L_ARCH
#error "compile with -DN2L_ARCH=<variant namespace>"
#endif

namespace n2l {
namespace N2L_ARCH {
namespace {

#include "simd.h"

inline int chunks(int n) { return (n + VL - 1) / VL; }

// The lanes of v summed in order, in double.
inline float lane_sum(vf v) {
  double s = 0;
  for (int l = 0; l < VL; ++l) s += v[l];
  return static_cast<float>(s);
}

// row[clamp(i - 1)] for i in [0, W + 2) (one replicated column each side), zeros up to len.
void padded_row(const float* row, int W, float* p, int len) {
  p[0] = row[0];
  memcpy(p + 1, row, sizeof(float) * W);
  p[W + 1] = row[W - 1];
  memset(p + W + 2, 0, sizeof(float) * (len - W - 2));
}

// The padded rows r - 1, r, r + 1 (clamped) of every channel of x [C, H, W] into p[(c * 3 + dy) * len].
void padded_rows(const float* x, int C, int H, int W, int r, float* p, int len) {
  const size_t plane = static_cast<size_t>(H) * W;
  for (int c = 0; c < C; ++c)
    for (int dy = 0; dy < 3; ++dy)
      padded_row(x + c * plane + static_cast<size_t>(clampi(r + dy - 1, 0, H - 1)) * W, W, p + (c * 3 + dy) * len,
                 len);
}

// row shifted right by `shift` columns, zeros elsewhere up to len.
void shifted_row(const float* row, int W, int shift, float* g, int len) {
  memset(g, 0, sizeof(float) * len);
  memcpy(g + shift, row, sizeof(float) * W);
}

// Rows [r0, r1) of the output: y[o] = b[o] + sum_{c, dy, dx} w[o, c, dy, dx] x[c, r + dy - 1, . + dx - 1].
bool conv3x3_rows(const float* x, int C, int H, int W, const float* w, const float* b, int O, float* y, int r0,
                  int r1) {
  const int nc = chunks(W), len = nc * VL + VL;
  float* buf = static_cast<float*>(malloc(sizeof(float) * (3 * C * len + nc * VL)));
  if (buf == nullptr) return false;
  float* out = buf + 3 * C * len;
  const size_t plane = static_cast<size_t>(H) * W;
  for (int r = r0; r < r1; ++r) {
    padded_rows(x, C, H, W, r, buf, len);
    for (int o = 0; o < O; ++o) {
      const float* wo = w + o * C * 9;
      for (int j = 0; j < nc; ++j) {
        vf acc = bcast(b[o]);
        for (int t = 0; t < C * 3; ++t)  // t = c * 3 + dy
          for (int dx = 0; dx < 3; ++dx) acc += bcast(wo[t * 3 + dx]) * loadu(buf + t * len + j * VL + dx);
        storeu(out + j * VL, acc);
      }
      memcpy(y + o * plane + static_cast<size_t>(r) * W, out, sizeof(float) * W);
    }
  }
  free(buf);
  return true;
}

// Backward of conv3x3_rows for rows [r0, r1): the input gradient gx of those rows (the
// replicated border folded back onto the edge), and the weight and bias gradients of those
// output rows, written (not added) to gw [O, C, 3, 3] and gb [O].
bool conv3x3_backward_rows(const float* x, const float* gy, int C, int H, int W, const float* w, int O, float* gx,
                           float* gw, float* gb, int r0, int r1) {
  const int nc = chunks(W), len = nc * VL + VL;  // padded input rows, as in the forward
  const int nq = chunks(W + 2), qlen = nq * VL + VL;  // rows of the padded input's gradient
  const int n_acc = O * C * 9;
  const size_t floats = static_cast<size_t>(3 * C) * len + static_cast<size_t>(O) * len +
                        static_cast<size_t>(3 * O) * qlen + qlen;
  // Vectors first: aligned_alloc's alignment is the vector's, and the size a multiple of it.
  const size_t acc_bytes = sizeof(vf) * (n_acc + O);
  char* mem = static_cast<char*>(aligned_alloc(sizeof(vf), acc_bytes + sizeof(vf) * chunks(floats)));
  if (mem == nullptr) return false;
  vf* acc = reinterpret_cast<vf*>(mem);   // [O * C * 9 + O] weight and bias partial sums
  float* buf = reinterpret_cast<float*>(mem + acc_bytes);
  float* prow = buf;                      // [3C][len] padded input rows r-1, r, r+1
  float* grow = prow + 3 * C * len;       // [O][len] gradient rows of r, zero beyond W
  float* gsh = grow + O * len;            // [3O][qlen] gradient rows shifted right by 2
  float* q = gsh + 3 * O * qlen;          // [qlen] one gradient row of the padded input
  const size_t plane = static_cast<size_t>(H) * W;
  for (int i = 0; i < n_acc + O; ++i) acc[i] = vf{};

  for (int r = r0; r < r1; ++r) {
    // Weight and bias gradients: sum over the row of gy[o, r, x] * xpad[c, r + dy, x + dx].
    padded_rows(x, C, H, W, r, prow, len);
    for (int o = 0; o < O; ++o) {
      float* g = grow + o * len;
      memcpy(g, gy + o * plane + static_cast<size_t>(r) * W, sizeof(float) * W);
      memset(g + W, 0, sizeof(float) * (len - W));
      vf* ao = acc + o * C * 9;
      for (int j = 0; j < nc; ++j) {
        const vf gv = loadu(g + j * VL);
        acc[n_acc + o] += gv;
        for (int t = 0; t < C * 3; ++t)
          for (int dx = 0; dx < 3; ++dx) ao[t * 3 + dx] += gv * loadu(prow + t * len + j * VL + dx);
      }
    }

    // Input gradient of source row r: the padded rows that replicate it (r + 1; 0 and H + 1
    // at the edges), each the transposed convolution of the output rows it feeds.
    for (int o = 0; o < O; ++o)
      for (int dy = 0; dy < 3; ++dy) {  // gsh[o][dy] = gy row (r + 1 - dy) shifted right by 2
        const int yr = r + 1 - dy;
        float* g = gsh + (o * 3 + dy) * qlen;
        if (yr >= 0 && yr < H)
          shifted_row(gy + o * plane + static_cast<size_t>(yr) * W, W, 2, g, qlen);
        else
          memset(g, 0, sizeof(float) * qlen);
      }
    for (int c = 0; c < C; ++c) {
      float* gxr = gx + c * plane + static_cast<size_t>(r) * W;
      memset(gxr, 0, sizeof(float) * W);
      // Padded rows replicating source row r: r + 1, and 0 or H + 1 at the edges (all three if H = 1).
      int rps[3], n_rp = 0;
      if (r == 0) rps[n_rp++] = 0;
      rps[n_rp++] = r + 1;
      if (r == H - 1) rps[n_rp++] = H + 1;
      for (int k = 0; k < n_rp; ++k) {
        const int rp = rps[k];
        // Output rows rp - dy feed padded row rp; all lie in r - 1 .. r + 1, i.e. in gsh.
        for (int j = 0; j < nq; ++j) {
          vf a = vf{};
          for (int o = 0; o < O; ++o) {
            const float* wo = w + (o * C + c) * 9;
            for (int dy = 0; dy < 3; ++dy) {
              const int yr = rp - dy;
              if (yr < 0 || yr >= H) continue;
              const float* g = gsh + (o * 3 + (r + 1 - yr)) * qlen;
              for (int dx = 0; dx < 3; ++dx) a += bcast(wo[dy * 3 + dx]) * loadu(g + j * VL + 2 - dx);
            }
          }
          storeu(q + j * VL, a);
        }
        for (int xx = 0; xx < W; ++xx) gxr[xx] += q[xx + 1];
        gxr[0] += q[0];
        gxr[W - 1] += q[W + 1];
      }
    }
  }
  for (int i = 0; i < n_acc + O; ++i) (i < n_acc ? gw[i] : gb[i - n_acc]) = lane_sum(acc[i]);
  free(mem);
  return true;
}

// Bilinear taps of one axis (the reference's `upsample`): output i reads lo[i] and hi[i] with
// weights 1 - frac[i] and frac[i]; every value exact in float32 for a power-of-two factor.
void axis_taps(int size, int factor, int out, int* lo, int* hi, float* frac) {
  for (int i = 0; i < out; ++i) {
    float src = (static_cast<float>(i) + 0.5f) / static_cast<float>(factor) - 0.5f;
    src = src < 0.0f ? 0.0f : src;
    const int l = static_cast<int>(src);
    frac[i] = src - static_cast<float>(l);
    lo[i] = imin(l, size - 1);
    hi[i] = imin(l + 1, size - 1);
  }
}

struct Taps2D {
  int *lx, *hx, *ly, *hy;
  float *fx, *fy, *tmp;  // tmp: [h, W], the rows upsampled along x only
  void* mem;
  bool init(int h, int w, int factor, int H, int W) {
    mem = malloc(sizeof(int) * 2 * (W + H) + sizeof(float) * (W + H + static_cast<size_t>(h) * W));
    if (mem == nullptr) return false;
    lx = static_cast<int*>(mem);
    hx = lx + W;
    ly = hx + W;
    hy = ly + H;
    fx = reinterpret_cast<float*>(hy + H);
    fy = fx + W;
    tmp = fy + H;
    axis_taps(w, factor, W, lx, hx, fx);
    axis_taps(h, factor, H, ly, hy, fy);
    return true;
  }
};

// y [C, H, W] = bilinear upsampling of x [C, h, w] by `factor`, cropped to H x W.
bool upsample(const float* x, int C, int h, int w, int factor, int H, int W, float* y) {
  Taps2D t;
  if (!t.init(h, w, factor, H, W)) return false;
  for (int c = 0; c < C; ++c) {
    const float* xc = x + static_cast<size_t>(c) * h * w;
    for (int i = 0; i < h; ++i)
      for (int X = 0; X < W; ++X)
        t.tmp[i * W + X] = (1.0f - t.fx[X]) * xc[i * w + t.lx[X]] + t.fx[X] * xc[i * w + t.hx[X]];
    for (int Y = 0; Y < H; ++Y) {
      const float *a = t.tmp + t.ly[Y] * W, *b = t.tmp + t.hy[Y] * W, f = t.fy[Y];
      float* out = y + (static_cast<size_t>(c) * H + Y) * W;
      for (int X = 0; X < W; ++X) out[X] = (1.0f - f) * a[X] + f * b[X];
    }
  }
  free(t.mem);
  return true;
}

// gx [C, h, w]: the gradient of upsample's input from that of its output, gy [C, H, W].
bool upsample_backward(const float* gy, int C, int h, int w, int factor, int H, int W, float* gx) {
  Taps2D t;
  if (!t.init(h, w, factor, H, W)) return false;
  for (int c = 0; c < C; ++c) {
    memset(t.tmp, 0, sizeof(float) * h * W);
    for (int Y = 0; Y < H; ++Y) {
      float *a = t.tmp + t.ly[Y] * W, *b = t.tmp + t.hy[Y] * W;
      const float f = t.fy[Y], *g = gy + (static_cast<size_t>(c) * H + Y) * W;
      for (int X = 0; X < W; ++X) a[X] += (1.0f - f) * g[X];
      for (int X = 0; X < W; ++X) b[X] += f * g[X];
    }
    float* gc = gx + static_cast<size_t>(c) * h * w;
    memset(gc, 0, sizeof(float) * h * w);
    for (int i = 0; i < h; ++i)
      for (int X = 0; X < W; ++X) {
        gc[i * w + t.lx[X]] += (1.0f - t.fx[X]) * t.tmp[i * W + X];
        gc[i * w + t.hx[X]] += t.fx[X] * t.tmp[i * W + X];
      }
  }
  free(t.mem);
  return true;
}


// Bicubic taps of one axis (`cubic_taps`): output i reads inputs idx[4i .. 4i+3] with weights
// wt[4i .. 4i+3].
void cubic_axis_taps(int size, int factor, int out, int* idx, float* wt) {
  for (int i = 0; i < out; ++i) cubic_taps(i, factor, size, idx + 4 * i, wt + 4 * i);
}

struct CubicTaps2D {
  int *ix, *iy;
  float *wx, *wy, *tmp;  // tmp: [h, W], the rows upsampled along x only
  void* mem;
  bool init(int h, int w, int factor, int H, int W) {
    mem = malloc(sizeof(int) * 4 * (W + H) + sizeof(float) * (4 * (W + H) + static_cast<size_t>(h) * W));
    if (mem == nullptr) return false;
    ix = static_cast<int*>(mem);
    iy = ix + 4 * W;
    wx = reinterpret_cast<float*>(iy + 4 * H);
    wy = wx + 4 * W;
    tmp = wy + 4 * H;
    cubic_axis_taps(w, factor, W, ix, wx);
    cubic_axis_taps(h, factor, H, iy, wy);
    return true;
  }
};

// y [C, H, W] = bicubic upsampling of x [C, h, w] by `factor`, cropped to H x W.
bool upsample_cubic(const float* x, int C, int h, int w, int factor, int H, int W, float* y) {
  CubicTaps2D t;
  if (!t.init(h, w, factor, H, W)) return false;
  for (int c = 0; c < C; ++c) {
    const float* xc = x + static_cast<size_t>(c) * h * w;
    for (int i = 0; i < h; ++i) {
      const float* r = xc + static_cast<size_t>(i) * w;
      for (int X = 0; X < W; ++X) {
        const int* j = t.ix + 4 * X;
        const float* a = t.wx + 4 * X;
        t.tmp[static_cast<size_t>(i) * W + X] = a[0] * r[j[0]] + a[1] * r[j[1]] + a[2] * r[j[2]] + a[3] * r[j[3]];
      }
    }
    for (int Y = 0; Y < H; ++Y) {
      const int* j = t.iy + 4 * Y;
      const float* a = t.wy + 4 * Y;
      const float *r0 = t.tmp + static_cast<size_t>(j[0]) * W, *r1 = t.tmp + static_cast<size_t>(j[1]) * W;
      const float *r2 = t.tmp + static_cast<size_t>(j[2]) * W, *r3 = t.tmp + static_cast<size_t>(j[3]) * W;
      float* out = y + (static_cast<size_t>(c) * H + Y) * W;
      for (int X = 0; X < W; ++X) out[X] = a[0] * r0[X] + a[1] * r1[X] + a[2] * r2[X] + a[3] * r3[X];
    }
  }
  free(t.mem);
  return true;
}

// gx [C, h, w]: the gradient of upsample_cubic's input from that of its output, gy [C, H, W].
bool upsample_cubic_backward(const float* gy, int C, int h, int w, int factor, int H, int W, float* gx) {
  CubicTaps2D t;
  if (!t.init(h, w, factor, H, W)) return false;
  for (int c = 0; c < C; ++c) {
    memset(t.tmp, 0, sizeof(float) * h * W);
    for (int Y = 0; Y < H; ++Y) {
      const float* g = gy + (static_cast<size_t>(c) * H + Y) * W;
      for (int k = 0; k < 4; ++k) {
        float* r = t.tmp + static_cast<size_t>(t.iy[4 * Y + k]) * W;
        const float a = t.wy[4 * Y + k];
        for (int X = 0; X < W; ++X) r[X] += a * g[X];
      }
    }
    float* gc = gx + static_cast<size_t>(c) * h * w;
    memset(gc, 0, sizeof(float) * h * w);
    for (int i = 0; i < h; ++i)
      for (int X = 0; X < W; ++X) {
        const float v = t.tmp[static_cast<size_t>(i) * W + X];
        for (int k = 0; k < 4; ++k) gc[static_cast<size_t>(i) * w + t.ix[4 * X + k]] += t.wx[4 * X + k] * v;
      }
  }
  free(t.mem);
  return true;
}

// A stack of 1x1 layers with ReLU between them, on VL pixels at a time: act[0] = the input,
// act[l + 1] = layer l's output (after its ReLU, except the last's). act holds kMaxWidth
// vectors per layer boundary.
void pointwise_chunk(const Layer* layers, int n_layers, vf* act) {
  for (int l = 0; l < n_layers; ++l) {
    const Layer& L = layers[l];
    const vf* in = act + l * kMaxWidth;
    vf* out = act + (l + 1) * kMaxWidth;
    for (int o = 0; o < L.cout; ++o) {
      const float* w = L.w + o * L.cin;
      vf a = bcast(L.b[o]);
      for (int i = 0; i < L.cin; ++i) a += bcast(w[i]) * in[i];
      out[o] = l + 1 < n_layers ? vmax0(a) : a;
    }
  }
}

// Loads VL pixels [p, p + VL) of the N-pixel planes x[c] (zeros past N).
void load_chunk(const float* x, int channels, int N, int p, vf* out) {
  for (int c = 0; c < channels; ++c) {
    const float* src = x + static_cast<size_t>(c) * N + p;
    if (p >= N) {
      out[c] = vf{};
    } else if (p + VL <= N) {
      out[c] = loadu(src);
    } else {
      float t[VL] = {};
      memcpy(t, src, sizeof(float) * (N - p));
      out[c] = loadu(t);
    }
  }
}

void store_chunk(const vf* v, int channels, int N, int p, float* y) {
  if (p >= N) return;  // a block's vectors past N
  for (int c = 0; c < channels; ++c) {
    float* dst = y + static_cast<size_t>(c) * N + p;
    if (p + VL <= N) {
      storeu(dst, v[c]);
    } else {
      float t[VL];
      storeu(t, v[c]);
      memcpy(dst, t, sizeof(float) * (N - p));
    }
  }
}

vf* alloc_vectors(size_t n) {
  return static_cast<vf*>(aligned_alloc(sizeof(vf), sizeof(vf) * (n == 0 ? 1 : n)));
}

// Pixels [p0, p1) of y [cout, N] = the layers applied to x [cin, N].
bool pointwise(const float* x, int N, const Layer* layers, int n_layers, float* y, int p0, int p1) {
  vf* act = alloc_vectors(static_cast<size_t>(n_layers + 1) * kMaxWidth);
  if (act == nullptr) return false;
  for (int p = p0; p < p1; p += VL) {
    load_chunk(x, layers[0].cin, N, p, act);
    pointwise_chunk(layers, n_layers, act);
    store_chunk(act + n_layers * kMaxWidth, layers[n_layers - 1].cout, N, p, y);
  }
  free(act);
  return true;
}

// Backward of `pointwise` on pixels [p0, p1) (a multiple of kBlock * VL apart, except at N): gx of
// those pixels, and the parameter gradients of those pixels into grads (overwritten), per
// layer its weight [cout, cin] then its bias [cout]. The forward is recomputed per chunk.
// Chunks of kBlock vectors (zeros past N): each weight's gradient is loaded and stored once
// per chunk rather than once per vector (stores bounded the vector-by-vector loop), summed
// over the vectors in pixel order, so the result is the same as vector by vector.
constexpr int kBlock = 4;

bool pointwise_backward(const float* x, const float* gy, int N, const Layer* layers, int n_layers, float* gx,
                        float* grads, int p0, int p1) {
  size_t n_grads = 0;
  for (int l = 0; l < n_layers; ++l) n_grads += static_cast<size_t>(layers[l].cout) * (layers[l].cin + 1);
  const size_t per_vector = static_cast<size_t>(n_layers + 1) * kMaxWidth;  // activations of one vector
  vf* act = alloc_vectors(kBlock * per_vector + 3 * kBlock * kMaxWidth + n_grads);
  if (act == nullptr) return false;
  vf* a[kBlock];  // a[v][l * kMaxWidth + i]: activations of vector v
  for (int v = 0; v < kBlock; ++v) a[v] = act + v * per_vector;
  vf* g = act + kBlock * per_vector;  // g[i * kBlock + v]: gradient at the current layer boundary
  vf* gin = g + kBlock * kMaxWidth;
  vf* io = gin + kBlock * kMaxWidth;  // one vector's channels, for loads and stores
  vf* acc = io + kBlock * kMaxWidth;
  for (size_t i = 0; i < n_grads; ++i) acc[i] = vf{};
  const int c_in = layers[0].cin, c_out = layers[n_layers - 1].cout;
  for (int p = p0; p < p1; p += kBlock * VL) {
    for (int v = 0; v < kBlock; ++v) {
      load_chunk(x, c_in, N, p + v * VL, a[v]);
      pointwise_chunk(layers, n_layers, a[v]);
      load_chunk(gy, c_out, N, p + v * VL, io);  // zeros past N: no contribution
      for (int o = 0; o < c_out; ++o) g[o * kBlock + v] = io[o];
    }
    size_t off = n_grads;
    for (int l = n_layers - 1; l >= 0; --l) {
      const Layer& L = layers[l];
      const size_t in = static_cast<size_t>(l) * kMaxWidth;
      off -= static_cast<size_t>(L.cout) * (L.cin + 1);
      vf* aw = acc + off;
      vf* ab = aw + L.cout * L.cin;
      for (int o = 0; o < L.cout; ++o) {
        const vf* go = g + o * kBlock;
        vf sb = ab[o];
        for (int v = 0; v < kBlock; ++v) sb += go[v];
        ab[o] = sb;
        for (int i = 0; i < L.cin; ++i) {
          vf sw = aw[o * L.cin + i];
          for (int v = 0; v < kBlock; ++v) sw += go[v] * a[v][in + i];
          aw[o * L.cin + i] = sw;
        }
      }
      for (int i = 0; i < L.cin; ++i) {
        vf s[kBlock] = {};
        for (int o = 0; o < L.cout; ++o) {
          const vf w = bcast(L.w[o * L.cin + i]);
          for (int v = 0; v < kBlock; ++v) s[v] += w * g[o * kBlock + v];
        }
        for (int v = 0; v < kBlock; ++v)  // ReLU's mask: the input of a layer l > 0 is a ReLU's output
          gin[i * kBlock + v] = l > 0 ? (a[v][in + i] > 0.0f ? s[v] : vf{}) : s[v];
      }
      std::swap(g, gin);
    }
    for (int v = 0; v < kBlock; ++v) {
      for (int i = 0; i < c_in; ++i) io[i] = g[i * kBlock + v];
      store_chunk(io, c_in, N, p + v * VL, gx);
    }
  }
  for (size_t i = 0; i < n_grads; ++i) grads[i] = lane_sum(acc[i]);
  free(act);
  return true;
}

}  // namespace

extern const TrainKernels train_kernels = {&conv3x3_rows,   &conv3x3_backward_rows,   &upsample, &upsample_backward,
                                           &upsample_cubic, &upsample_cubic_backward, &pointwise, &pointwise_backward};

}  // namespace N2L_ARCH
}  // namespace n2l
