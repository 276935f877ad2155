// GPP, reparameterization, upsampling and synthesis of the n2l decoder (docs/FORMAT.md section 2).
//
// Compiled once per instruction-set variant (-DN2L_ARCH=base|avx2|avx512 with matching -march).
// Everything is row-streamed: each stage keeps a ring of its last few rows and computes a
// row on demand from the rows of the stage below, so a band of output rows is produced with
// only O(width) memory per stage (no full-resolution feature maps) and the 3x3 halos are
// recomputed only at band edges. Inner loops work on chunks of P pixels with GCC vector
// extensions, which lower to SSE2, AVX2 or AVX-512 depending on the variant's flags.
//
// No standard-library templates here (see core.h): only C functions and our own code.
#include <cmath>
#include <cstdlib>
#include <cstring>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "core.h"

#ifndef N2L_ARCH
#error "compile with -DN2L_ARCH=<variant namespace>"
#endif

namespace n2l {
namespace N2L_ARCH {
namespace {

#include "simd.h"

// exp(x) for x <= 0 (clamped at -87 so 2^n stays normal); relative error ~2e-7.
inline vf vexp_neg(vf x) {
  x = x < -87.0f ? bcast(-87.0f) : x;
  const vi n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, vi);  // round(x / ln 2), x <= 0
  const vf fn = __builtin_convertvector(n, vf);
  vf r = x - fn * 0.693359375f;  // Cody-Waite: ln 2 split in an exact high part and a low part
  r = r - fn * -2.12194440e-4f;
  vf p = bcast(1.0f / 5040) * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vi bits = (n + 127) << 23;
  return p * (vf)bits;  // GCC vector cast: reinterprets the bits
}

// softplus(x) = log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)), with
// log1p(t) = 2 atanh(t / (2 + t)), a series in s^2 <= 1/9: no libm call, so it vectorizes.
inline vf vsoftplus(vf x) {
  const vf ax = x < 0.0f ? -x : x;
  const vf t = vexp_neg(-ax);
  const vf s = t / (t + 2.0f);
  const vf s2 = s * s;
  vf q = bcast(1.0f / 11) * s2 + 1.0f / 9;
  q = q * s2 + 1.0f / 7;
  q = q * s2 + 1.0f / 5;
  q = q * s2 + 1.0f / 3;
  q = q * s2 + 1.0f;
  return vmax0(x) + 2.0f * s * q;
}

// out[o][p] = act(b[o] + sum_{i, dy, dx} w[o, i, dy, dx] * rows[i * K + dy][p + dx]) for OBN
// outputs o0 .. o0+OBN-1 of a chunk of P pixels; out is [cout][P]. rows[] point at the input
// rows already offset to the chunk (and, for K = 3, to the left halo column).
template <int OBN, int K>
inline void conv_block(const float* const* rows, int cin, const float* __restrict w,
                       const float* __restrict b, int o0, float* __restrict out, bool relu) {
  vf acc[OBN][NV];
  for (int j = 0; j < OBN; ++j)
    for (int v = 0; v < NV; ++v) acc[j][v] = bcast(b[o0 + j]);
  const int wstride = cin * K * K;
  for (int i = 0; i < cin; ++i) {
    for (int dy = 0; dy < K; ++dy) {
      const float* r = rows[i * K + dy];
      for (int dx = 0; dx < K; ++dx) {
        vf x[NV];
        for (int v = 0; v < NV; ++v) x[v] = loadu(r + dx + v * VL);
        const float* wp = w + o0 * wstride + (i * K + dy) * K + dx;
        for (int j = 0; j < OBN; ++j) {
          const vf wv = bcast(wp[j * wstride]);
          for (int v = 0; v < NV; ++v) acc[j][v] += wv * x[v];
        }
      }
    }
  }
  for (int j = 0; j < OBN; ++j)
    for (int v = 0; v < NV; ++v)
      storeu(out + (o0 + j) * P + v * VL, relu ? vmax0(acc[j][v]) : acc[j][v]);
}

template <int K>
void conv_chunk(const float* const* rows, const Layer& L, float* out, bool relu) {
  int o = 0;
  for (; o + OB <= L.cout; o += OB) conv_block<OB, K>(rows, L.cin, L.w, L.b, o, out, relu);
  switch (L.cout - o) {
    case 1: conv_block<1, K>(rows, L.cin, L.w, L.b, o, out, relu); break;
    case 2: if (OB > 2) conv_block<2, K>(rows, L.cin, L.w, L.b, o, out, relu); break;
    case 3: if (OB > 3) conv_block<3, K>(rows, L.cin, L.w, L.b, o, out, relu); break;
    default: break;
  }
}

void conv_any(const float* const* rows, const Layer& L, float* out, bool relu) {
  if (L.k == 3)
    conv_chunk<3>(rows, L, out, relu);
  else
    conv_chunk<1>(rows, L, out, relu);
}

// Bilinear taps of one axis (FORMAT.md "Upsampling"), computed in float32 exactly like torch.
struct Taps {
  int* i0 = nullptr;
  int* i1 = nullptr;
  float* a = nullptr;
};

void make_taps(Taps& t, int n_in, int n_out, int factor, int n_alloc) {
  for (int i = 0; i < n_alloc; ++i) {
    const int ii = imin(i, n_out - 1);  // entries past n_out repeat the last one (chunk tails)
    float src = (static_cast<float>(ii) + 0.5f) / static_cast<float>(factor) - 0.5f;
    src = src < 0.0f ? 0.0f : src;
    const int i0 = imin(static_cast<int>(src), n_in - 1);
    t.i0[i] = i0;
    t.i1[i] = imin(i0 + 1, n_in - 1);
    t.a[i] = src - static_cast<float>(i0);
  }
}

// Vertical pass of up(y, factor) for output row r: dst[c][x] over the source width.
void vertical_row(const float* y, int C, int h, int w, int factor, int r, float* dst) {
  float src = (static_cast<float>(r) + 0.5f) / static_cast<float>(factor) - 0.5f;
  src = src < 0.0f ? 0.0f : src;
  const int i0 = imin(static_cast<int>(src), h - 1), i1 = imin(i0 + 1, h - 1);
  const float a = src - static_cast<float>(i0), b = 1.0f - a;
  for (int c = 0; c < C; ++c) {
    const float* r0 = y + (static_cast<size_t>(c) * h + i0) * w;
    const float* r1 = y + (static_cast<size_t>(c) * h + i1) * w;
    float* d = dst + static_cast<size_t>(c) * w;
    for (int x = 0; x < w; ++x) d[x] = r0[x] * b + r1[x] * a;
  }
}

// Horizontal pass for n output columns starting at x0: dst[p] = (1 - a) v[i0] + a v[i1]. May
// write up to VL - 1 floats past n and read up to 16 floats past the source row (callers leave
// slack). Factors are >= 2, so 16 consecutive outputs use at most 10 consecutive inputs.
inline void horizontal(const float* __restrict v, const Taps& t, int x0, int n, float* __restrict dst) {
  const int* i0 = t.i0 + x0;
  const int* i1 = t.i1 + x0;
  const float* a = t.a + x0;
#if defined(__AVX512F__)
  // A 16-float window of the source and two in-register permutes instead of gathers, which
  // GCC would otherwise emulate with scalar inserts.
  for (int p = 0; p < n; p += 16) {
    const int jb = i0[p];
    const __m512i base = _mm512_set1_epi32(jb);
    const __m512i r0 = _mm512_sub_epi32(_mm512_loadu_si512(i0 + p), base);
    const __m512i r1 = _mm512_sub_epi32(_mm512_loadu_si512(i1 + p), base);
    const __m512 tab = _mm512_loadu_ps(v + jb);
    const __m512 w1 = _mm512_loadu_ps(a + p);
    const __m512 w0 = _mm512_sub_ps(_mm512_set1_ps(1.0f), w1);
    const __m512 y = _mm512_fmadd_ps(_mm512_permutexvar_ps(r1, tab), w1,
                                     _mm512_mul_ps(_mm512_permutexvar_ps(r0, tab), w0));
    _mm512_storeu_ps(dst + p, y);
  }
#elif defined(__AVX2__)
  for (int p = 0; p < n; p += 8) {
    const __m256i r0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(i0 + p));
    const __m256i r1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(i1 + p));
    const __m256 w1 = _mm256_loadu_ps(a + p);
    const __m256 w0 = _mm256_sub_ps(_mm256_set1_ps(1.0f), w1);
    const __m256 y = _mm256_fmadd_ps(_mm256_i32gather_ps(v, r1, 4), w1, _mm256_mul_ps(_mm256_i32gather_ps(v, r0, 4), w0));
    _mm256_storeu_ps(dst + p, y);
  }
#else
  for (int p = 0; p < n; ++p) dst[p] = v[i0[p]] * (1.0f - a[p]) + v[i1[p]] * a[p];
#endif
}

// Scratch memory of one band task: zeroed (so the chunk-tail slack that loads may touch
// always holds finite values), 64-byte aligned, freed together at the end of the task.
struct Arena {
  static constexpr int kMax = 256;
  void* blocks[kMax] = {};
  int n = 0;
  bool ok = true;
  Arena() = default;
  ~Arena() {
    for (int i = 0; i < n; ++i) free(blocks[i]);
  }
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  template <class T>
  T* take(size_t count) {
    if (!ok || n == kMax) {
      ok = false;
      return nullptr;
    }
    void* p = calloc(count * sizeof(T) + 128, 1);
    if (p == nullptr) {
      ok = false;
      return nullptr;
    }
    blocks[n++] = p;
    return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(p) + 63) / 64 * 64);
  }
};

// A stage producing rows r (0 <= r < height) of `ch` channels, stored padded: channel c of
// row r is at row(r) + c * stride, column x at index 1 + x, with index 0 and w + 1 holding
// the replicated edge columns and P floats of slack after them.
struct RowSource {
  int ch = 0, w = 0, stride = 0;
  float* slots = nullptr;  // ring of 4 rows
  int tag[4] = {-1, -1, -1, -1};
  virtual ~RowSource() = default;
  virtual void compute(int r, float* dst) = 0;

  void init(Arena& arena, int channels, int width) {
    ch = channels;
    w = width;
    stride = width + 2 + P;
    slots = arena.take<float>(static_cast<size_t>(4) * ch * stride);
  }
  // Rows are requested in nondecreasing windows of at most 3 (r-1, r, r+1), so 4 slots suffice.
  const float* row(int r) {
    float* dst = slots + static_cast<size_t>(r & 3) * ch * stride;
    if (tag[r & 3] != r) {
      compute(r, dst);
      for (int c = 0; c < ch; ++c) {
        float* d = dst + static_cast<size_t>(c) * stride;
        d[0] = d[1];
        d[w + 1] = d[w];
      }
      tag[r & 3] = r;
    }
    return dst;
  }
};

// x_s = concat(z_s, up2(y_{s+1})) for scale s, row by row.
struct GppInput final : RowSource {
  const Net* net = nullptr;
  int s = 0;
  bool has_u = false;
  Taps tx;
  float* vtmp = nullptr;  // vertical pass of the coarser latent, [C][w_{s+1}]

  bool init(Arena& arena, const Net& n, int scale) {
    net = &n;
    s = scale;
    has_u = s + 1 < n.M;
    RowSource::init(arena, has_u ? 2 * n.C : n.C, n.ws[s]);
    if (has_u) {
      const int alloc = w + P;
      tx.i0 = arena.take<int>(alloc);
      tx.i1 = arena.take<int>(alloc);
      tx.a = arena.take<float>(alloc);
      vtmp = arena.take<float>(static_cast<size_t>(n.C) * n.ws[s + 1] + 16);
      if (!arena.ok) return false;
      make_taps(tx, n.ws[s + 1], w, 2, alloc);
    }
    return arena.ok;
  }

  void compute(int r, float* dst) override {
    const Net& n = *net;
    for (int c = 0; c < n.C; ++c)
      noise_row(n.seed, static_cast<uint32_t>(s), static_cast<uint32_t>(c), static_cast<uint32_t>(r), 0, w,
                dst + static_cast<size_t>(c) * stride + 1);
    if (!has_u) return;
    const int wc = n.ws[s + 1];
    vertical_row(n.ys[s + 1], n.C, n.hs[s + 1], wc, 2, r, vtmp);
    for (int c = 0; c < n.C; ++c)
      horizontal(vtmp + static_cast<size_t>(c) * wc, tx, 0, w, dst + static_cast<size_t>(n.C + c) * stride + 1);
  }
};

// y_s = u + mu + softplus(sigma) * z with (mu, sigma) = gpp.s.1(relu(gpp.s.0(x_s))).
struct GppOutput final : RowSource {
  const Net* net = nullptr;
  GppInput* in = nullptr;
  int s = 0, h = 0;
  float* hid = nullptr;   // [G][P]
  float* pbuf = nullptr;  // [2C][P]
  const float** rows = nullptr;

  bool init(Arena& arena, const Net& n, int scale, GppInput* input) {
    net = &n;
    s = scale;
    in = input;
    h = n.hs[s];
    RowSource::init(arena, n.C, n.ws[s]);
    hid = arena.take<float>(static_cast<size_t>(n.G) * P);
    pbuf = arena.take<float>(static_cast<size_t>(2 * n.C) * P);
    rows = arena.take<const float*>(static_cast<size_t>(3) * in->ch);
    return arena.ok;
  }

  void compute(int r, float* dst) override {
    const Net& n = *net;
    if (s == 0 && n.y0_coded != nullptr) {  // hybrid mode: the latent was transmitted
      for (int c = 0; c < n.C; ++c)
        memcpy(dst + static_cast<size_t>(c) * stride + 1, n.y0_coded + (static_cast<size_t>(c) * h + r) * w,
               w * sizeof(float));
      return;
    }
    const Layer& L0 = n.gpp0[s];
    const Layer& L1 = n.gpp1[s];
    const int K = L0.k, C = n.C, cin = in->ch;
    const float* xr[3];
    for (int dy = 0; dy < K; ++dy) xr[dy] = in->row(clampi(r + dy - K / 2, 0, h - 1));
    const float* xc = K == 3 ? xr[1] : xr[0];
    const float* hrows[128];
    for (int g = 0; g < n.G; ++g) hrows[g] = hid + g * P;
    for (int x0 = 0; x0 < w; x0 += P) {
      for (int i = 0; i < cin; ++i)
        for (int dy = 0; dy < K; ++dy)
          rows[i * K + dy] = xr[dy] + static_cast<size_t>(i) * in->stride + x0 + (K == 3 ? 0 : 1);
      conv_any(rows, L0, hid, true);
      conv_chunk<1>(hrows, L1, pbuf, false);
      for (int c = 0; c < C; ++c) {
        const float* z = xc + static_cast<size_t>(c) * in->stride + 1 + x0;
        const float* u = xc + static_cast<size_t>(C + c) * in->stride + 1 + x0;
        float* y = dst + static_cast<size_t>(c) * stride + 1 + x0;
        for (int v = 0; v < NV; ++v) {
          const vf mu = loadu(pbuf + c * P + v * VL);
          const vf sig = vsoftplus(loadu(pbuf + (C + c) * P + v * VL));
          const vf zz = loadu(z + v * VL);
          const vf uu = in->has_u ? loadu(u + v * VL) : vf{};
          storeu(y + v * VL, uu + mu + sig * zz);
        }
      }
    }
  }
};

// Bicubic taps of one axis (`cubic_taps`) for every output column: t.i[k][x], t.a[k][x].
struct CubicTaps {
  int* i[4] = {};
  float* a[4] = {};
};
void make_cubic_taps(CubicTaps& t, int n_in, int n_out, int factor, int n_alloc) {
  for (int i = 0; i < n_alloc; ++i) {
    int idx[4];
    float wt[4];
    cubic_taps(imin(i, n_out - 1), factor, n_in, idx, wt);  // chunk tails repeat the last
    for (int k = 0; k < 4; ++k) {
      t.i[k][i] = idx[k];
      t.a[k][i] = wt[k];
    }
  }
}
void cubic_vertical_row(const float* y, int C, int h, int w, int factor, int r, float* dst) {
  int idx[4];
  float a[4];
  cubic_taps(r, factor, h, idx, a);
  for (int c = 0; c < C; ++c) {
    const float* rows[4];
    for (int k = 0; k < 4; ++k) rows[k] = y + (static_cast<size_t>(c) * h + idx[k]) * w;
    float* d = dst + static_cast<size_t>(c) * w;
    for (int x = 0; x < w; ++x) d[x] = rows[0][x] * a[0] + rows[1][x] * a[1] + rows[2][x] * a[2] + rows[3][x] * a[3];
  }
}
inline void cubic_horizontal(const float* __restrict v, const CubicTaps& t, int x0, int n, float* __restrict dst) {
  for (int p = x0; p < x0 + n; ++p)
    dst[p - x0] = v[t.i[0][p]] * t.a[0][p] + v[t.i[1][p]] * t.a[1][p] + v[t.i[2][p]] * t.a[2][p] +
                  v[t.i[3][p]] * t.a[3][p];
}

// The 1x1 synthesis chain on concat_s(up(y_s, 2^s)), scale 0 streamed from a GppOutput.
struct Synth final : RowSource {
  const Net* net = nullptr;
  GppOutput* y0 = nullptr;
  Taps tx[kMaxScales];
  CubicTaps cx[kMaxScales];  // instead of tx when net.bicubic
  float* vrow[kMaxScales] = {};
  float* feat = nullptr;  // [(M-1) C][P]: upsampled coarse latents of the chunk
  float* buf[2] = {};     // [maxw][P] ping-pong hidden activations
  float* obuf = nullptr;  // [Cout][P]
  const float** rows = nullptr;

  bool init(Arena& arena, const Net& n, GppOutput* scale0) {
    net = &n;
    y0 = scale0;
    RowSource::init(arena, n.Cout, n.W);
    const int alloc = n.W + P;
    for (int s = 1; s < n.M; ++s) {
      vrow[s] = arena.take<float>(static_cast<size_t>(n.C) * n.ws[s] + 16);
      if (n.bicubic) {
        for (int k = 0; k < 4; ++k) {
          cx[s].i[k] = arena.take<int>(alloc);
          cx[s].a[k] = arena.take<float>(alloc);
        }
        if (!arena.ok) return false;
        make_cubic_taps(cx[s], n.ws[s], n.W, 1 << s, alloc);
        continue;
      }
      tx[s].i0 = arena.take<int>(alloc);
      tx[s].i1 = arena.take<int>(alloc);
      tx[s].a = arena.take<float>(alloc);
      if (!arena.ok) return false;
      make_taps(tx[s], n.ws[s], n.W, 1 << s, alloc);
    }
    int maxw = 1;
    for (int i = 0; i < n.n_synth; ++i) maxw = imax(maxw, n.synth[i].cout);
    feat = arena.take<float>(static_cast<size_t>(imax(1, (n.M - 1) * n.C)) * P);
    buf[0] = arena.take<float>(static_cast<size_t>(maxw) * P);
    buf[1] = arena.take<float>(static_cast<size_t>(maxw) * P);
    obuf = arena.take<float>(static_cast<size_t>(n.Cout) * P);
    rows = arena.take<const float*>(static_cast<size_t>(imax(maxw, n.M * n.C)));
    return arena.ok;
  }

  void compute(int r, float* dst) override {
    const Net& n = *net;
    const int C = n.C;
    const float* yr = y0->row(r);
    for (int s = 1; s < n.M; ++s)
      (n.bicubic ? cubic_vertical_row : vertical_row)(n.ys[s], C, n.hs[s], n.ws[s], 1 << s, r, vrow[s]);
    for (int x0 = 0; x0 < w; x0 += P) {
      for (int c = 0; c < C; ++c) rows[c] = yr + static_cast<size_t>(c) * y0->stride + 1 + x0;
      for (int s = 1; s < n.M; ++s)
        for (int c = 0; c < C; ++c) {
          float* f = feat + ((s - 1) * C + c) * P;
          if (n.bicubic)
            cubic_horizontal(vrow[s] + static_cast<size_t>(c) * n.ws[s], cx[s], x0, P, f);
          else
            horizontal(vrow[s] + static_cast<size_t>(c) * n.ws[s], tx[s], x0, P, f);
          rows[s * C + c] = f;
        }
      for (int i = 0; i < n.n_synth; ++i) {
        const bool last = i == n.n_synth - 1;
        float* out = last ? obuf : buf[i & 1];
        conv_chunk<1>(rows, n.synth[i], out, !last);
        for (int o = 0; o < n.synth[i].cout; ++o) rows[o] = out + o * P;
      }
      for (int c = 0; c < n.Cout; ++c) memcpy(dst + static_cast<size_t>(c) * stride + 1 + x0, obuf + c * P, P * sizeof(float));
    }
  }
};

// x + conv3x3(x) on the Cout-channel image.
struct Residual final : RowSource {
  const Layer* L = nullptr;
  RowSource* prev = nullptr;
  int h = 0;
  float* obuf = nullptr;
  const float** rows = nullptr;

  bool init(Arena& arena, const Layer& layer, RowSource* input, int height) {
    L = &layer;
    prev = input;
    h = height;
    RowSource::init(arena, input->ch, input->w);
    obuf = arena.take<float>(static_cast<size_t>(ch) * P);
    rows = arena.take<const float*>(static_cast<size_t>(3) * ch);
    return arena.ok;
  }

  void compute(int r, float* dst) override {
    const float* xr[3];
    for (int dy = 0; dy < 3; ++dy) xr[dy] = prev->row(clampi(r + dy - 1, 0, h - 1));
    for (int x0 = 0; x0 < w; x0 += P) {
      for (int i = 0; i < ch; ++i)
        for (int dy = 0; dy < 3; ++dy) rows[i * 3 + dy] = xr[dy] + static_cast<size_t>(i) * prev->stride + x0;
      conv_chunk<3>(rows, *L, obuf, false);
      for (int c = 0; c < ch; ++c) {
        const float* x = xr[1] + static_cast<size_t>(c) * prev->stride + 1 + x0;
        float* d = dst + static_cast<size_t>(c) * stride + 1 + x0;
        for (int p = 0; p < P; ++p) d[p] = x[p] + obuf[c * P + p];
      }
    }
  }
};

bool coarse_band(const Net& n, int s, int r0, int r1) {
  Arena arena;
  GppInput in;
  GppOutput out;
  if (!in.init(arena, n, s) || !out.init(arena, n, s, &in)) return false;
  const int ws = n.ws[s];
  for (int r = r0; r < r1; ++r) {
    const float* y = out.row(r);
    for (int c = 0; c < n.C; ++c)
      memcpy(n.ys[s] + (static_cast<size_t>(c) * n.hs[s] + r) * ws, y + static_cast<size_t>(c) * out.stride + 1,
             ws * sizeof(float));
  }
  return true;
}

bool fine_band(const Net& n, int r0, int r1, uint8_t* pixels) {
  Arena arena;
  GppInput in;
  GppOutput y0;
  Synth synth;
  Residual res[kMaxResidual];
  if (!in.init(arena, n, 0) || !y0.init(arena, n, 0, &in) || !synth.init(arena, n, &y0)) return false;
  RowSource* last = &synth;
  for (int i = 0; i < n.n_res; ++i) {
    if (!res[i].init(arena, n.res[i], last, n.H)) return false;
    last = &res[i];
  }
  const int W = n.W, Co = n.Cout;
  for (int r = r0; r < r1; ++r) {
    const float* x = last->row(r);
    uint8_t* o = pixels + static_cast<size_t>(r) * W * Co;
    for (int c = 0; c < Co; ++c) quantize_row(x + static_cast<size_t>(c) * last->stride + 1, W, Co, o + c);
  }
  return true;
}

}  // namespace

#define N2L_STR2(x) #x
#define N2L_STR(x) N2L_STR2(x)
extern const Kernels kernels = {N2L_STR(N2L_ARCH), &noise_row, &coarse_band, &fine_band, &train_kernels};

}  // namespace N2L_ARCH
}  // namespace n2l
