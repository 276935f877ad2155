// Python bindings (nanobind), run-time instruction-set dispatch and threading of the n2l
// C++ CPU core (decoder and training kernels). Compiled with baseline flags: only the variants
// in kernels.cpp / noise.cpp / train.cpp use AVX2 or AVX-512, and only after the CPU has been
// checked here.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <math.h>

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <cstring>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "core.h"

namespace nb = nanobind;
using n2l::Kernels;
using n2l::Layer;
using n2l::Net;

namespace {

using FloatArray = nb::ndarray<const float, nb::c_contig, nb::device::cpu>;

std::vector<const Kernels*> supported_variants() {
  std::vector<const Kernels*> v;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  // x86-64-v4 / v3 as compiled (CMakeLists.txt); the checks include OS support of the registers.
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("bmi2"))
    v.push_back(&n2l::avx512::kernels);
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2") &&
      __builtin_cpu_supports("f16c") && __builtin_cpu_supports("movbe"))
    v.push_back(&n2l::avx2::kernels);
#endif
  v.push_back(&n2l::base::kernels);
  return v;
}

const Kernels* g_active = nullptr;

const Kernels& active() {
  if (g_active == nullptr) g_active = supported_variants().front();
  return *g_active;
}

// Worker threads kept between calls. A training step makes some thirty calls of 0.1-3 ms
// each; starting threads per call cost about what the second core gained (bench/RESULTS.md 7y).
// One caller at a time borrows the workers; a caller that finds them busy (candidates trained
// side by side) runs its tasks itself: no result depends on the number of threads.
class Pool {
 public:
  // Runs fn(task) for task in [0, n_tasks) on the caller and up to `threads` - 1 workers,
  // handing tasks out in order; returns false if any task failed.
  template <class F>
  bool run(int n_tasks, int threads, F&& fn) {
    std::atomic<int> next{0};
    std::atomic<bool> ok{true};
    auto work = [&] {
      for (int t; (t = next.fetch_add(1)) < n_tasks;)
        if (!fn(t)) ok = false;
    };
    const int helpers = std::max(0, std::min(threads, n_tasks) - 1);
    std::unique_lock<std::mutex> borrowed(busy_, std::try_to_lock);
    if (helpers == 0 || !borrowed.owns_lock()) {
      work();
      return ok;
    }
    {
      std::lock_guard<std::mutex> lock(m_);
      const uint64_t seen = generation_.load(std::memory_order_relaxed);  // a new worker waits for the next job
      while (static_cast<int>(workers_.size()) < helpers)
        workers_.emplace_back([this, id = workers_.size(), seen] { loop(id, seen); });
      job_ = work;
      wanted_ = running_ = helpers;
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    work();
    std::unique_lock<std::mutex> lock(m_);
    done_.wait(lock, [&] { return running_ == 0; });
    job_ = nullptr;
    return ok;
  }

 private:
  void loop(size_t id, uint64_t seen) {
    for (;;) {
      // The next call usually comes within a few hundred microseconds: spin before sleeping.
      for (int i = 0; i < kSpins && generation_.load(std::memory_order_acquire) == seen; ++i) std::this_thread::yield();
      std::unique_lock<std::mutex> lock(m_);
      wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
      seen = generation_.load(std::memory_order_acquire);
      if (static_cast<int>(id) >= wanted_) continue;
      const std::function<void()> job = job_;
      lock.unlock();
      job();
      lock.lock();
      if (--running_ == 0) done_.notify_one();
    }
  }

  static constexpr int kSpins = 20000;
  std::mutex busy_, m_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;  // never joined: the pool lives as long as the process
  std::function<void()> job_;
  std::atomic<uint64_t> generation_{0};
  int wanted_ = 0, running_ = 0;
};

Pool* g_pool = nullptr;

template <class F>
bool parallel_for(int n_tasks, int threads, F&& fn) {
  if (threads <= 1 || n_tasks <= 1) {
    bool ok = true;
    for (int t = 0; t < n_tasks; ++t) ok = fn(t) && ok;
    return ok;
  }
  static std::once_flag once;
  // A forked child has none of the parent's workers: it starts a pool of its own.
  std::call_once(once, [] { pthread_atfork(nullptr, nullptr, [] { g_pool = nullptr; }); });
  static std::mutex creating;
  {
    std::lock_guard<std::mutex> lock(creating);
    if (g_pool == nullptr) g_pool = new Pool;  // leaked on purpose: workers outlive module teardown
  }
  return g_pool->run(n_tasks, threads, fn);
}

Layer to_layer(const FloatArray& w, const FloatArray& b, int cin, int cout, int k, const std::string& name) {
  if (w.ndim() != 4 || w.shape(0) != static_cast<size_t>(cout) || w.shape(1) != static_cast<size_t>(cin) ||
      w.shape(2) != static_cast<size_t>(k) || w.shape(3) != static_cast<size_t>(k))
    throw std::invalid_argument("layer " + name + ": weight shape does not match the config");
  if (b.ndim() != 1 || b.shape(0) != static_cast<size_t>(cout))
    throw std::invalid_argument("layer " + name + ": bias shape does not match the config");
  Layer L;
  L.w = w.data();
  L.b = b.data();
  L.cin = cin;
  L.cout = cout;
  L.k = k;
  return L;
}

void decode(uint32_t seed, int H, int W, int M, int C, int G, int gpp_kernel, int gpp_kernel_min_scale,
            const std::vector<int>& synth_hidden, int n_res, int Cout, bool bicubic, const std::vector<FloatArray>& weights,
            const std::vector<FloatArray>& biases, const std::vector<FloatArray>& coded,
            nb::ndarray<uint8_t, nb::c_contig, nb::device::cpu> out, int threads) {
  if (H < 1 || W < 1) throw std::invalid_argument("height and width must be >= 1");
  if (M < 1 || M > n2l::kMaxScales || C < 1 || C > 32 || G < 1 || G > 128 || (gpp_kernel != 1 && gpp_kernel != 3) ||
      synth_hidden.size() > 8 || n_res < 0 || n_res > n2l::kMaxResidual || (Cout != 1 && Cout != 3))
    throw std::invalid_argument("invalid model config");
  for (int h : synth_hidden)
    if (h < 1 || h > 256) throw std::invalid_argument("invalid synth_hidden width");
  if (out.ndim() != 3 || out.shape(0) != static_cast<size_t>(H) || out.shape(1) != static_cast<size_t>(W) ||
      out.shape(2) != static_cast<size_t>(Cout))
    throw std::invalid_argument("output must be a C-contiguous uint8 array [H, W, out_channels]");
  const int n_coded = static_cast<int>(coded.size());  // hybrid mode: the coarsest scales are transmitted
  if (n_coded > M) throw std::invalid_argument("more coded latents than scales");
  const size_t n_layers = 2 * (M - n_coded) + synth_hidden.size() + 1 + n_res;
  if (weights.size() != n_layers || biases.size() != n_layers)
    throw std::invalid_argument("expected " + std::to_string(n_layers) + " weight and bias arrays");

  Net net;
  net.seed = seed;
  net.H = H;
  net.W = W;
  net.M = M;
  net.C = C;
  net.G = G;
  net.Cout = Cout;
  net.n_synth = static_cast<int>(synth_hidden.size()) + 1;
  net.n_res = n_res;
  net.bicubic = bicubic;
  size_t li = 0;
  for (int s = M - 1; s >= 0; --s) {  // bitstream order, ModelConfig.layer_shapes()
    net.hs[s] = static_cast<int>((static_cast<int64_t>(H) + (1 << s) - 1) >> s);
    net.ws[s] = static_cast<int>((static_cast<int64_t>(W) + (1 << s) - 1) >> s);
    if (s >= M - n_coded) {
      const FloatArray& y = coded[M - 1 - s];
      if (y.ndim() != 3 || y.shape(0) != static_cast<size_t>(C) || y.shape(1) != static_cast<size_t>(net.hs[s]) ||
          y.shape(2) != static_cast<size_t>(net.ws[s]))
        throw std::invalid_argument("coded latent of scale " + std::to_string(s) + " must be [C, h_s, w_s]");
      continue;
    }
    const int k = s >= gpp_kernel_min_scale ? gpp_kernel : 1;
    const int cin = s == M - 1 ? C : 2 * C;
    net.gpp0[s] = to_layer(weights[li], biases[li], cin, G, k, "gpp." + std::to_string(s) + ".0");
    ++li;
    net.gpp1[s] = to_layer(weights[li], biases[li], G, 2 * C, 1, "gpp." + std::to_string(s) + ".1");
    ++li;
  }
  std::vector<int> widths{M * C};
  widths.insert(widths.end(), synth_hidden.begin(), synth_hidden.end());
  widths.push_back(Cout);
  for (int i = 0; i < net.n_synth; ++i, ++li)
    net.synth[i] = to_layer(weights[li], biases[li], widths[i], widths[i + 1], 1, "synth." + std::to_string(i));
  for (int r = 0; r < n_res; ++r, ++li)
    net.res[r] = to_layer(weights[li], biases[li], Cout, Cout, 3, "synth_res." + std::to_string(r));

  std::vector<std::vector<float>> ys(M);
  for (int s = 1; s < M; ++s) {
    ys[s].resize(static_cast<size_t>(C) * net.hs[s] * net.ws[s]);
    net.ys[s] = ys[s].data();
    if (s >= M - n_coded) std::memcpy(net.ys[s], coded[M - 1 - s].data(), ys[s].size() * sizeof(float));
  }
  if (n_coded == M) net.y0_coded = coded[M - 1].data();
  const Kernels& k = active();
  uint8_t* pixels = out.data();
  threads = std::max(1, threads);
  bool ok = true;
  {
    nb::gil_scoped_release release;
    // Coarse latents, coarsest first (each needs the next coarser one complete), in bands of
    // rows. The split depends only on the size, never on the thread count, and every row is
    // computed the same way in any band, so the pixels do not depend on `threads`.
    for (int s = M - 1 - n_coded; s >= 1 && ok; --s) {
      const int rows = std::max(8, static_cast<int>(65536 / std::max(1, net.ws[s])));
      const int n_bands = (net.hs[s] + rows - 1) / rows;
      ok = parallel_for(n_bands, threads, [&](int b) {
        return k.coarse_band(net, s, b * rows, std::min(net.hs[s], (b + 1) * rows));
      });
    }
    // Full resolution: scale-0 GPP, upsampling, synthesis and residual layers, streamed per
    // band of 32 rows (the halo of the 3x3 layers is recomputed at band edges only).
    constexpr int kBand = 32;
    const int n_bands = (H + kBand - 1) / kBand;
    if (ok)
      ok = parallel_for(n_bands, threads,
                        [&](int b) { return k.fine_band(net, b * kBand, std::min(H, (b + 1) * kBand), pixels); });
  }
  if (!ok) throw std::bad_alloc();
}

void noise_into(uint32_t seed, uint32_t scale, uint32_t y0, uint32_t x0,
                nb::ndarray<float, nb::ndim<3>, nb::c_contig, nb::device::cpu> out) {
  const size_t channels = out.shape(0), h = out.shape(1), w = out.shape(2);
  float* d = out.data();
  const Kernels& k = active();
  nb::gil_scoped_release release;
  for (size_t c = 0; c < channels; ++c)
    for (size_t y = 0; y < h; ++y)
      k.noise_row(seed, scale, static_cast<uint32_t>(c), y0 + static_cast<uint32_t>(y), x0, static_cast<int>(w),
                  d + (c * h + y) * w);
}

using OutArray = nb::ndarray<float, nb::c_contig, nb::device::cpu>;

// Training kernels work in bands of a fixed size, never of the thread count, and their
// per-band partial sums are added in band order: results do not depend on `threads`.
constexpr int kTrainBand = 16;         // rows per band of the 3x3 convolution
constexpr int kPointwiseBand = 4096;   // pixels per band of the 1x1 stacks (a multiple of every block of vectors)

// fn(band, lo, hi) for the bands [lo, hi) of [0, n), on up to `threads` threads without the GIL.
template <class F>
void for_bands(int n, int band_size, int threads, F&& fn) {
  bool ok;
  {
    nb::gil_scoped_release release;
    ok = parallel_for((n + band_size - 1) / band_size, threads,
                      [&](int b) { return fn(b, b * band_size, std::min(n, (b + 1) * band_size)); });
  }
  if (!ok) throw std::bad_alloc();
}

// out[i] = sum over bands b, in order, of partial[b * stride + i], for i < count.
void sum_bands(const std::vector<float>& partial, size_t stride, size_t offset, size_t count, float* out) {
  const size_t n_bands = partial.size() / stride;
  for (size_t i = 0; i < count; ++i) {
    double s = 0;
    for (size_t b = 0; b < n_bands; ++b) s += partial[b * stride + offset + i];
    out[i] = static_cast<float>(s);
  }
}

template <class Array>
void check_shape(const Array& a, std::initializer_list<int> shape, const char* what) {
  bool ok = a.ndim() == shape.size();
  size_t i = 0;
  for (int n : shape) ok = ok && i < a.ndim() && a.shape(i++) == static_cast<size_t>(n);
  if (!ok) throw std::invalid_argument(std::string(what) + " has the wrong shape");
}

void check_conv3x3(const FloatArray& x, const FloatArray& w, int& C, int& H, int& W, int& O) {
  if (x.ndim() != 3 || w.ndim() != 4 || w.shape(1) != x.shape(0) || w.shape(2) != 3 || w.shape(3) != 3)
    throw std::invalid_argument("conv3x3: x must be [C, H, W] and w [O, C, 3, 3]");
  C = static_cast<int>(x.shape(0));
  H = static_cast<int>(x.shape(1));
  W = static_cast<int>(x.shape(2));
  O = static_cast<int>(w.shape(0));
  if (C < 1 || H < 1 || W < 1 || O < 1) throw std::invalid_argument("conv3x3: empty tensor");
}

void conv3x3_forward(const FloatArray& x, const FloatArray& w, const FloatArray& b, OutArray y, int threads) {
  int C, H, W, O;
  check_conv3x3(x, w, C, H, W, O);
  check_shape(b, {O}, "conv3x3: b");
  check_shape(y, {O, H, W}, "conv3x3: y");
  const n2l::TrainKernels& k = *active().train;
  for_bands(H, kTrainBand, threads, [&](int, int r0, int r1) {
    return k.conv3x3_rows(x.data(), C, H, W, w.data(), b.data(), O, y.data(), r0, r1);
  });
}

void conv3x3_backward(const FloatArray& x, const FloatArray& w, const FloatArray& gy, OutArray gx, OutArray gw,
                      OutArray gb, int threads) {
  int C, H, W, O;
  check_conv3x3(x, w, C, H, W, O);
  check_shape(gy, {O, H, W}, "conv3x3: gy");
  check_shape(gx, {C, H, W}, "conv3x3: gx");
  check_shape(gw, {O, C, 3, 3}, "conv3x3: gw");
  check_shape(gb, {O}, "conv3x3: gb");
  const n2l::TrainKernels& k = *active().train;
  const size_t n_w = static_cast<size_t>(O) * C * 9, stride = n_w + O;
  std::vector<float> partial(static_cast<size_t>((H + kTrainBand - 1) / kTrainBand) * stride);
  for_bands(H, kTrainBand, threads, [&](int band, int r0, int r1) {
    float* p = partial.data() + band * stride;
    return k.conv3x3_backward_rows(x.data(), gy.data(), C, H, W, w.data(), O, gx.data(), p, p + n_w, r0, r1);
  });
  sum_bands(partial, stride, 0, n_w, gw.data());
  sum_bands(partial, stride, n_w, O, gb.data());
}

// upsample: x [C, h, w] -> y [C, H, W]; backward: gy [C, H, W] -> gx [C, h, w].
void upsample_call(const FloatArray& src, int factor, OutArray dst, bool backward, bool bicubic) {
  if (src.ndim() != 3 || dst.ndim() != 3 || src.shape(0) != dst.shape(0) || src.shape(0) < 1)
    throw std::invalid_argument("upsample: arrays must be [C, ., .] with the same C");
  const int C = static_cast<int>(src.shape(0));
  const int h = static_cast<int>(backward ? dst.shape(1) : src.shape(1));
  const int w = static_cast<int>(backward ? dst.shape(2) : src.shape(2));
  const int H = static_cast<int>(backward ? src.shape(1) : dst.shape(1));
  const int W = static_cast<int>(backward ? src.shape(2) : dst.shape(2));
  if (h < 1 || w < 1 || factor < 1 || H < 1 || W < 1 || static_cast<int64_t>(h) * factor < H ||
      static_cast<int64_t>(w) * factor < W)
    throw std::invalid_argument("upsample: need [C, h, w] -> [C, H, W] with H <= h * factor, W <= w * factor");
  const n2l::TrainKernels& k = *active().train;
  bool ok;
  {
    nb::gil_scoped_release release;
    auto* fn = bicubic ? (backward ? k.upsample_cubic_backward : k.upsample_cubic)
                       : (backward ? k.upsample_backward : k.upsample);
    ok = fn(src.data(), C, h, w, factor, H, W, dst.data());
  }
  if (!ok) throw std::bad_alloc();
}

// The layers of a 1x1 stack, and its pixel count N, from x [in, N] and [out, in] weights.
std::vector<Layer> pointwise_layers(const FloatArray& x, const std::vector<FloatArray>& weights,
                                    const std::vector<FloatArray>& biases, int& N) {
  if (weights.empty() || weights.size() != biases.size() || weights.size() > n2l::kMaxSynth + 1)
    throw std::invalid_argument("pointwise: 1 to 10 layers, one bias per weight");
  std::vector<Layer> layers;
  for (size_t l = 0; l < weights.size(); ++l) {
    const FloatArray &w = weights[l], &b = biases[l];
    if (w.ndim() != 2 || b.ndim() != 1 || b.shape(0) != w.shape(0) || w.shape(0) < 1 || w.shape(1) < 1 ||
        w.shape(0) > static_cast<size_t>(n2l::kMaxWidth) || w.shape(1) > static_cast<size_t>(n2l::kMaxWidth) ||
        (l > 0 && w.shape(1) != weights[l - 1].shape(0)))
      throw std::invalid_argument("pointwise: weights [out, in] chained, widths <= kMaxWidth, biases [out]");
    Layer L;
    L.w = w.data();
    L.b = b.data();
    L.cout = static_cast<int>(w.shape(0));
    L.cin = static_cast<int>(w.shape(1));
    layers.push_back(L);
  }
  if (x.ndim() != 2) throw std::invalid_argument("pointwise: x must be [in, N]");
  N = static_cast<int>(x.shape(1));
  check_shape(x, {layers[0].cin, N}, "pointwise: x");
  return layers;
}

void pointwise_forward(const FloatArray& x, const std::vector<FloatArray>& weights,
                       const std::vector<FloatArray>& biases, OutArray y, int threads) {
  int N;
  const std::vector<Layer> layers = pointwise_layers(x, weights, biases, N);
  const int n = static_cast<int>(layers.size());
  check_shape(y, {layers[n - 1].cout, N}, "pointwise: y");
  const n2l::TrainKernels& k = *active().train;
  for_bands(N, kPointwiseBand, threads, [&](int, int p0, int p1) {
    return k.pointwise(x.data(), N, layers.data(), n, y.data(), p0, p1);
  });
}

void pointwise_backward(const FloatArray& x, const std::vector<FloatArray>& weights,
                        const std::vector<FloatArray>& biases, const FloatArray& gy, OutArray gx, OutArray grads,
                        int threads) {
  int N;
  const std::vector<Layer> layers = pointwise_layers(x, weights, biases, N);
  const int n = static_cast<int>(layers.size());
  check_shape(gy, {layers[n - 1].cout, N}, "pointwise: gy");
  check_shape(gx, {layers[0].cin, N}, "pointwise: gx");
  size_t n_grads = 0;
  for (const Layer& L : layers) n_grads += static_cast<size_t>(L.cout) * (L.cin + 1);
  check_shape(grads, {static_cast<int>(n_grads)}, "pointwise: grads");
  const n2l::TrainKernels& k = *active().train;
  std::vector<float> partial(static_cast<size_t>((N + kPointwiseBand - 1) / kPointwiseBand) * n_grads);
  for_bands(N, kPointwiseBand, threads, [&](int band, int p0, int p1) {
    return k.pointwise_backward(x.data(), gy.data(), N, layers.data(), n, gx.data(), partial.data() + band * n_grads,
                                p0, p1);
  });
  sum_bands(partial, n_grads, 0, n_grads, grads.data());
}

// The encoder's rate proxy (n2l.encoder.laplace_bits): bits of values x at unit bins under a
// zero-mean Laplace per segment, of scale b = max(mean |x|, 1e-3) over the segment, the bits
// of segment k weighted by weights[k]. Returns the total and fills grad with its gradient
// (through b as well). Scalar code at baseline flags: the exp and log calls dominate, and
// vectors would not change that. Float32 arithmetic like torch's, sums in double and in a
// fixed order (bands of kRateBand values): the result does not depend on `threads`.
constexpr int kRateBand = 4096;
constexpr float kLn2 = 0.693147180559945f;

struct RateSegment {
  int begin = 0, end = 0;
  float inv_b = 0, tail = 0, d_tail = 0;  // 1 / b; log(0.5) + log1p(-e^(-1/b)) and its derivative in b
  bool scale_free = false;  // mean |x| >= 1e-3: b follows the values (else it is clamped)
};

// exp(max(a, -80)) like the reference (below -80 float32 denormals make exp slow); gradient
// factor 0 where clamped.
inline float clamped_exp(float a, float& slope) {
  slope = a >= -80.0f ? 1.0f : 0.0f;
  return expf(a >= -80.0f ? a : -80.0f);
}

// Bits of |x| = d under segment `seg`'s Laplace, and their derivatives in d and in b.
inline float bin_bits(float d, const RateSegment& seg, float& dd, float& db) {
  const float lo = d - 0.5f, inv = seg.inv_b;
  if (lo >= 0.0f) {  // -log2 P = -(log 0.5 - lo / b + log1p(-e^(-1/b))) / ln 2
    dd = inv / kLn2;
    db = -(lo * inv * inv + seg.d_tail) / kLn2;
    return -(seg.tail - lo * inv) / kLn2;
  }
  float s1, s2;  // P = 1 - (e^(-(d + 1/2)/b) + e^((d - 1/2)/b)) / 2
  const float e1 = clamped_exp(-(d + 0.5f) * inv, s1), e2 = clamped_exp(lo * inv, s2);
  const float p = 1.0f - 0.5f * (e1 + e2);
  if (p < 1e-12f) {
    dd = db = 0.0f;
    return -logf(1e-12f) / kLn2;
  }
  const float g1 = s1 * e1, g2 = s2 * e2;
  dd = -(0.5f * (g1 - g2) * inv) / (p * kLn2);
  db = (0.5f * (g1 * (d + 0.5f) - g2 * lo) * inv * inv) / (p * kLn2);
  return -logf(p) / kLn2;
}

float laplace_bits(const FloatArray& x, const nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>& offsets,
                   const FloatArray& weights, OutArray grad, int threads) {
  if (x.ndim() != 1 || weights.ndim() != 1 || offsets.shape(0) != weights.shape(0) + 1)
    throw std::invalid_argument("laplace_bits: x [N], offsets [S + 1] and weights [S]");
  const int N = static_cast<int>(x.shape(0)), S = static_cast<int>(weights.shape(0));
  check_shape(grad, {N}, "laplace_bits: grad");
  const int32_t* off = offsets.data();
  if (off[0] != 0 || off[S] != N) throw std::invalid_argument("laplace_bits: offsets must run from 0 to N");
  const float* v = x.data();
  std::vector<RateSegment> segs(S);
  std::vector<int> seg_of_band((N + kRateBand - 1) / kRateBand + 1, 0);
  for (int k = 0; k < S; ++k) {
    RateSegment& g = segs[k];
    g.begin = off[k];
    g.end = off[k + 1];
    if (g.end < g.begin) throw std::invalid_argument("laplace_bits: offsets must not decrease");
    if (g.end == g.begin) continue;
    double sum = 0;
    for (int i = g.begin; i < g.end; ++i) sum += fabsf(v[i]);
    const float mean = static_cast<float>(sum) / static_cast<float>(g.end - g.begin);
    g.scale_free = mean >= 1e-3f;
    const float b = g.scale_free ? mean : 1e-3f;
    g.inv_b = 1.0f / b;
    float slope;
    const float e = clamped_exp(-g.inv_b, slope);
    g.tail = logf(0.5f) + log1pf(-e);
    g.d_tail = -slope * e * g.inv_b * g.inv_b / (1.0f - e);
    for (int band = (g.begin + kRateBand - 1) / kRateBand; band * kRateBand < g.end; ++band) seg_of_band[band] = k;
  }
  // Bands of values: bits and d bits / d b per segment into partial[band][2k, 2k+1], d bits / d|x| into grad.
  const int n_bands = (N + kRateBand - 1) / kRateBand;
  std::vector<double> partial(static_cast<size_t>(n_bands) * 2 * S, 0.0);
  float* g = grad.data();
  for_bands(N, kRateBand, threads, [&](int band, int p0, int p1) {
    double* part = partial.data() + static_cast<size_t>(band) * 2 * S;
    for (int k = seg_of_band[band], i = p0; i < p1; ++k) {
      const RateSegment& seg = segs[k];
      double bits = 0, db_sum = 0;
      for (; i < std::min(p1, seg.end); ++i) {
        float dd, db;
        bits += bin_bits(fabsf(v[i]), seg, dd, db);
        db_sum += db;
        g[i] = dd;
      }
      part[2 * k] += bits;
      part[2 * k + 1] += db_sum;
    }
    return true;
  });
  double total = 0;
  std::vector<float> through_b(S, 0.0f);  // d bits / d b / n: what each value adds through its segment's scale
  for (int k = 0; k < S; ++k) {
    double bits = 0, db = 0;
    for (int band = 0; band < n_bands; ++band) {
      bits += partial[(static_cast<size_t>(band) * S + k) * 2];
      db += partial[(static_cast<size_t>(band) * S + k) * 2 + 1];
    }
    total += static_cast<double>(weights.data()[k]) * bits;
    if (segs[k].scale_free) through_b[k] = static_cast<float>(db / (segs[k].end - segs[k].begin));
  }
  for_bands(N, kRateBand, threads, [&](int band, int p0, int p1) {
    for (int k = seg_of_band[band], i = p0; i < p1; ++k)
      for (const float w = weights.data()[k]; i < std::min(p1, segs[k].end); ++i)
        g[i] = v[i] > 0.0f ? w * (g[i] + through_b[k]) : (v[i] < 0.0f ? -w * (g[i] + through_b[k]) : 0.0f);
    return true;
  });
  return static_cast<float>(total);
}

// The encoder's checkerboard rate model (n2l.encoder.checkerboard_residuals) of latents packed
// as x [C, L], grid g of shapes[g] = (h, w) after the grids before it. Out [C * L], grid by grid:
// its anchors ((i + j) even) [C, h * w - h * w / 2], then its other values minus alpha_g times
// the mean of their in-bounds cross neighbours [C, h * w / 2], alpha_g fitted by least squares
// over the grid and clamped to [0, 1]. The float operations and their order are the torch
// reference's (out-of-bounds neighbours add a zero, sums run in index order), so the bits and
// gradients are the same bit for bit (tests/test_cpu_core.py).
using ShapeArray = nb::ndarray<const int32_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

struct Grids {
  int C, L, G;
  const int32_t* hw;
  template <class Array>
  Grids(const Array& x, const ShapeArray& shapes, const char* what) {
    if (x.ndim() != 2 || shapes.shape(1) != 2) throw std::invalid_argument(std::string(what) + ": x [C, L], shapes [G, 2]");
    C = static_cast<int>(x.shape(0));
    L = static_cast<int>(x.shape(1));
    G = static_cast<int>(shapes.shape(0));
    hw = shapes.data();
    int64_t total = 0;
    for (int g = 0; g < G; ++g) {
      if (hw[2 * g] < 1 || hw[2 * g + 1] < 1) throw std::invalid_argument(std::string(what) + ": empty grid");
      total += static_cast<int64_t>(hw[2 * g]) * hw[2 * g + 1];
    }
    if (total != L) throw std::invalid_argument(std::string(what) + ": the grids do not fill x");
  }
  // fn(g, offset, h, w, n_anchors, n_others) for each grid, in order.
  template <class F>
  void each(F&& fn) const {
    for (int g = 0, offset = 0; g < G; offset += hw[2 * g] * hw[2 * g + 1], ++g) {
      const int h = hw[2 * g], w = hw[2 * g + 1];
      fn(g, offset, h, w, h * w - h * w / 2, h * w / 2);
    }
  }
};

// In-bounds cross neighbours of (i, j) in an h x w grid, as a float divisor.
inline float neighbour_count(int i, int j, int h, int w) {
  return static_cast<float>((i > 0) + (i < h - 1) + (j > 0) + (j < w - 1));
}

void checkerboard_forward(const FloatArray& x, const ShapeArray& shapes, OutArray out, OutArray alpha) {
  const Grids grids(x, shapes, "checkerboard_forward");
  const int C = grids.C, L = grids.L;
  check_shape(out, {C * L}, "checkerboard_forward: out");
  check_shape(alpha, {grids.G}, "checkerboard_forward: alpha");
  std::vector<float> pred;
  grids.each([&](int g, int offset, int h, int w, int n_anchors, int n_others) {
    float* anchors = out.data() + static_cast<size_t>(C) * offset;
    float* others = anchors + static_cast<size_t>(C) * n_anchors;  // the values first, then their residuals
    pred.resize(static_cast<size_t>(C) * n_others);
    for (int c = 0; c < C; ++c) {
      const float* row = x.data() + static_cast<size_t>(c) * L + offset;
      for (int i = 0, ka = c * n_anchors, ko = c * n_others; i < h; ++i)
        for (int j = 0; j < w; ++j) {
          const int p = i * w + j;
          if ((i + j) % 2 == 0) {
            anchors[ka++] = row[p];
            continue;
          }
          float sum = 0.0f;  // out-of-bounds neighbours add a zero, as the reference's zero slot does
          sum += i > 0 ? row[p - w] : 0.0f;
          sum += i < h - 1 ? row[p + w] : 0.0f;
          sum += j > 0 ? row[p - 1] : 0.0f;
          sum += j < w - 1 ? row[p + 1] : 0.0f;
          others[ko] = row[p];
          pred[ko++] = sum / neighbour_count(i, j, h, w);
        }
    }
    float fit_vp = 0.0f, fit_pp = 0.0f;  // summed over channels, then in index order like index_add
    for (int k = 0; k < n_others; ++k) {
      float vp = 0.0f, pp = 0.0f;
      for (int c = 0; c < C; ++c) {
        const float p = pred[static_cast<size_t>(c) * n_others + k];
        vp += others[static_cast<size_t>(c) * n_others + k] * p;
        pp += p * p;
      }
      fit_vp += vp;
      fit_pp += pp;
    }
    const float a = std::min(1.0f, std::max(0.0f, fit_vp / std::max(fit_pp, 1e-9f)));
    alpha.data()[g] = a;
    for (size_t k = 0; k < pred.size(); ++k) others[k] = others[k] - a * pred[k];
  });
}

void checkerboard_backward(const FloatArray& gout, const ShapeArray& shapes, const FloatArray& alpha, OutArray gx) {
  const Grids grids(gx, shapes, "checkerboard_backward");
  const int C = grids.C, L = grids.L;
  check_shape(gout, {C * L}, "checkerboard_backward: gout");
  check_shape(alpha, {grids.G}, "checkerboard_backward: alpha");
  std::vector<float> to_pred;  // per other value: the gradient it passes to each neighbour
  grids.each([&](int g, int offset, int h, int w, int n_anchors, int n_others) {
    const float a = alpha.data()[g];
    const float* g_anchors = gout.data() + static_cast<size_t>(C) * offset;
    const float* g_others = g_anchors + static_cast<size_t>(C) * n_anchors;
    to_pred.assign(static_cast<size_t>(h) * w, 0.0f);
    for (int c = 0; c < C; ++c) {
      float* row = gx.data() + static_cast<size_t>(c) * L + offset;
      for (int i = 0, k = c * n_others; i < h; ++i)
        for (int j = 1 - i % 2; j < w; j += 2, ++k) {
          row[i * w + j] = 0.0f + g_others[k];
          to_pred[i * w + j] = -g_others[k] * a / neighbour_count(i, j, h, w);
        }
      // The reference adds an anchor's contributions direction by direction (n2l.weights._CROSS
      // order): from the value below it, above it, right of it, left of it.
      for (int i = 0, k = c * n_anchors; i < h; ++i)
        for (int j = i % 2; j < w; j += 2, ++k) {
          const int p = i * w + j;
          float sum = 0.0f;
          sum += i < h - 1 ? to_pred[p + w] : 0.0f;
          sum += i > 0 ? to_pred[p - w] : 0.0f;
          sum += j < w - 1 ? to_pred[p + 1] : 0.0f;
          sum += j > 0 ? to_pred[p - 1] : 0.0f;
          row[p] = g_anchors[k] + sum;
        }
    }
  });
}

}  // namespace

NB_MODULE(_core, m) {
  m.doc() = "n2l C++ CPU core: decoder and training kernels (see n2l/cpu.py for the Python API)";
  m.def("decode", &decode, nb::arg("seed"), nb::arg("height"), nb::arg("width"), nb::arg("n_scales"),
        nb::arg("latent_channels"), nb::arg("gpp_hidden"), nb::arg("gpp_kernel"), nb::arg("gpp_kernel_min_scale"),
        nb::arg("synth_hidden"), nb::arg("synth_residual"), nb::arg("out_channels"), nb::arg("bicubic"), nb::arg("weights"),
        nb::arg("biases"), nb::arg("coded"), nb::arg("out"), nb::arg("threads"),
        "Decode into out ([H, W, out_channels] uint8); weights and biases in bitstream order, coded\n"
        "latents ([C, h_s, w_s] float32) of the transmitted scales, coarsest first.");
  m.def("noise_into", &noise_into, nb::arg("seed"), nb::arg("scale"), nb::arg("y0"), nb::arg("x0"), nb::arg("out"),
        "Fill out ([channels, h, w] float32) with the noise of one scale at window origin (y0, x0).");
  m.def("conv3x3_forward", &conv3x3_forward, nb::arg("x"), nb::arg("w"), nb::arg("b"), nb::arg("y"),
        nb::arg("threads"), "3x3 convolution with edge replication: y [O, H, W] from x [C, H, W] (training).");
  m.def("conv3x3_backward", &conv3x3_backward, nb::arg("x"), nb::arg("w"), nb::arg("gy"), nb::arg("gx"),
        nb::arg("gw"), nb::arg("gb"), nb::arg("threads"),
        "Gradients of conv3x3_forward with respect to x, w and b, from that of y.");
  m.def(
      "upsample_forward",
      [](const FloatArray& x, int factor, OutArray y, bool bicubic) { upsample_call(x, factor, y, false, bicubic); },
      nb::arg("x"), nb::arg("factor"), nb::arg("y"), nb::arg("bicubic") = false,
        "Bilinear (or bicubic) upsampling of x [C, h, w] by factor into y [C, H, W] (cropped; training).");
  m.def(
      "upsample_backward",
      [](const FloatArray& gy, int factor, OutArray gx, bool bicubic) { upsample_call(gy, factor, gx, true, bicubic); },
      nb::arg("gy"), nb::arg("factor"), nb::arg("gx"), nb::arg("bicubic") = false,
        "Gradient gx [C, h, w] of upsample_forward's input from that of its output, gy [C, H, W].");
  m.def("pointwise_forward", &pointwise_forward, nb::arg("x"), nb::arg("weights"), nb::arg("biases"), nb::arg("y"),
        nb::arg("threads"), "1x1 layers ([out, in] weights) with ReLU between: y [out, N] from x [in, N].");
  m.def("pointwise_backward", &pointwise_backward, nb::arg("x"), nb::arg("weights"), nb::arg("biases"),
        nb::arg("gy"), nb::arg("gx"), nb::arg("grads"), nb::arg("threads"),
        "Gradients of pointwise_forward: gx [in, N], and grads (every weight then bias, flat).");
  m.def("laplace_bits", &laplace_bits, nb::arg("x"), nb::arg("offsets"), nb::arg("weights"), nb::arg("grad"),
        nb::arg("threads"),
        "Weighted sum over segments [offsets[k], offsets[k+1]) of x's Laplace bin bits (scale: the\n"
        "segment's mean |x|, at least 1e-3); fills grad [N] with its gradient (training rate proxy).");
  m.def("checkerboard_forward", &checkerboard_forward, nb::arg("x"), nb::arg("shapes"), nb::arg("out"), nb::arg("alpha"),
        "The checkerboard rate model's anchors and prediction residuals (out [C * L]) of latent grids\n"
        "packed in x [C, L] (shapes [G, 2]), and each grid's prediction weight (alpha [G]).");
  m.def("checkerboard_backward", &checkerboard_backward, nb::arg("gout"), nb::arg("shapes"), nb::arg("alpha"),
        nb::arg("gx"), "Gradient gx [C, L] of checkerboard_forward's input from that of its output.");
  m.def(
      "isa", [] { return std::string(active().name); }, "The instruction-set variant in use.");
  m.def(
      "supported_isas",
      [] {
        std::vector<std::string> names;
        for (const Kernels* k : supported_variants()) names.emplace_back(k->name);
        return names;
      },
      "Variants this CPU can run, best first.");
  m.def(
      "set_isa",
      [](const std::string& name) {
        for (const Kernels* k : supported_variants())
          if (name == k->name) {
            g_active = k;
            return;
          }
        throw std::invalid_argument("instruction set '" + name + "' is not supported on this CPU");
      },
      nb::arg("name"), "Force a variant (for tests and benchmarks).");
}
