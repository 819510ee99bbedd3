// Depthwise 2-D convolution (NCHW, float32, square k x k kernel, stride 1 or 2, zero padding (k-1)/2 on each side,
// or MindSpore's "same" padding: the smaller half first, as mindcv's MobileNetV3 strided layers have it) for
// MindSpore's CPU backend as ops.Custom AOT functions: forward, gradient w.r.t. the input, gradient w.r.t. the
// weight. MindSpore 2.10 runs grouped convolutions through oneDNN's im2col + GEMM per group on plain NCHW
// tensors, which is 3-20x slower than these direct loops (docs/performance.md). Built by src/models/kernels/build.py.
//
// AOT interface: params = inputs then outputs; shapes[i] / ndims[i] describe params[i].
#include <atomic>
#include <cstdint>
#include <cstring>

#include <omp.h>

extern std::atomic<int> cls_kernel_threads;  // pooling.cc

namespace {

struct Geometry {
  int64_t n, c, h, w, k, s, ph, pw, ho, wo;  // ph, pw: padding above and left of the input
};

Geometry geometry(const int64_t* x_shape, int64_t k, int64_t s, bool same) {
  Geometry g{x_shape[0], x_shape[1], x_shape[2], x_shape[3], k, s, (k - 1) / 2, (k - 1) / 2, 0, 0};
  if (same) {  // output ceil(size / s); total padding (out - 1) * s + k - size, its smaller half first
    g.ho = (g.h + s - 1) / s;
    g.wo = (g.w + s - 1) / s;
    const int64_t th = (g.ho - 1) * s + k - g.h, tw = (g.wo - 1) * s + k - g.w;
    g.ph = th > 0 ? th / 2 : 0;
    g.pw = tw > 0 ? tw / 2 : 0;
  } else {
    g.ho = (g.h + 2 * g.ph - k) / s + 1;
    g.wo = (g.w + 2 * g.pw - k) / s + 1;
  }
  return g;
}

// Output columns [*lo, *hi) whose input column col * s + off lies inside [0, width).
inline void valid_range(int64_t off, int64_t s, int64_t width, int64_t out_width, int64_t* lo, int64_t* hi) {
  int64_t first = off < 0 ? (-off + s - 1) / s : 0;
  int64_t last = (width - 1 - off) >= 0 ? (width - 1 - off) / s + 1 : 0;
  *lo = first;
  *hi = last < out_width ? last : out_width;
}

// The forward pass and the input gradient visit the same taps: output pixel (r, col) and input pixel
// (r * S + i - ph, col * S + j - pw) meet through weight (i, j). The forward gathers input into output
// (y[r][col] += w * x[..]); the input gradient scatters the output gradient back (dx[..] += w * dy[r][col]).
template <int S, bool kToInput>
void through_taps(const float* src, const float* wt, float* dst, const Geometry& g) {
  const int64_t in_plane = g.h * g.w, out_plane = g.ho * g.wo;
  const int64_t src_plane = kToInput ? out_plane : in_plane, dst_plane = kToInput ? in_plane : out_plane;
#pragma omp parallel for schedule(static)
  for (int64_t nc = 0; nc < g.n * g.c; ++nc) {
    const float* sp = src + nc * src_plane;
    const float* wp = wt + (nc % g.c) * g.k * g.k;
    float* dp = dst + nc * dst_plane;
    std::memset(dp, 0, sizeof(float) * dst_plane);
    for (int64_t i = 0; i < g.k; ++i) {
      for (int64_t j = 0; j < g.k; ++j) {
        const float wv = wp[i * g.k + j];
        int64_t w0, w1;
        valid_range(j - g.pw, S, g.w, g.wo, &w0, &w1);
        for (int64_t r = 0; r < g.ho; ++r) {
          const int64_t hi = r * S + i - g.ph;
          if (hi < 0 || hi >= g.h) continue;
          const int64_t in_row = hi * g.w + (j - g.pw), out_row = r * g.wo;
          if (kToInput) {
            const float* gr = sp + out_row;
            float* dr = dp + in_row;
#pragma omp simd
            for (int64_t col = w0; col < w1; ++col) dr[col * S] += wv * gr[col];
          } else {
            const float* xr = sp + in_row;
            float* yr = dp + out_row;
#pragma omp simd
            for (int64_t col = w0; col < w1; ++col) yr[col] += wv * xr[col * S];
          }
        }
      }
    }
  }
}

template <int S>
void grad_weight(const float* x, const float* dy, float* dw, const Geometry& g) {
#pragma omp parallel for schedule(static)
  for (int64_t ch = 0; ch < g.c; ++ch) {
    for (int64_t i = 0; i < g.k; ++i) {
      for (int64_t j = 0; j < g.k; ++j) {
        int64_t w0, w1;
        valid_range(j - g.pw, S, g.w, g.wo, &w0, &w1);
        double total = 0.0;
        for (int64_t b = 0; b < g.n; ++b) {
          const float* xp = x + (b * g.c + ch) * g.h * g.w;
          const float* gp = dy + (b * g.c + ch) * g.ho * g.wo;
          float acc = 0.0f;
          for (int64_t r = 0; r < g.ho; ++r) {
            const int64_t hi = r * S + i - g.ph;
            if (hi < 0 || hi >= g.h) continue;
            const float* gr = gp + r * g.wo;
            const float* xr = xp + hi * g.w + (j - g.pw);
#pragma omp simd reduction(+ : acc)
            for (int64_t col = w0; col < w1; ++col) acc += gr[col] * xr[col * S];
          }
          total += acc;
        }
        dw[(ch * g.k + i) * g.k + j] = static_cast<float>(total);
      }
    }
  }
}

}  // namespace

#define DEPTHWISE_ENTRY_POINTS(NAME, S, SAME)                                                              \
  /* inputs x (N,C,H,W), weight (C,1,k,k); output y */                                                     \
  extern "C" int DepthwiseForward##NAME(int, void** params, int*, int64_t** shapes, const char**, void*,   \
                                        void*) {                                                           \
    cls_kernel_threads.store(omp_get_max_threads(), std::memory_order_relaxed);                            \
    through_taps<S, false>(static_cast<float*>(params[0]), static_cast<float*>(params[1]),                 \
                           static_cast<float*>(params[2]), geometry(shapes[0], shapes[1][2], S, SAME));    \
    return 0;                                                                                              \
  }                                                                                                        \
  /* inputs x (for its shape), dy, weight; output dx */                                                    \
  extern "C" int DepthwiseGradInput##NAME(int, void** params, int*, int64_t** shapes, const char**, void*, \
                                          void*) {                                                         \
    through_taps<S, true>(static_cast<float*>(params[1]), static_cast<float*>(params[2]),                  \
                          static_cast<float*>(params[3]), geometry(shapes[0], shapes[2][2], S, SAME));     \
    return 0;                                                                                              \
  }                                                                                                        \
  /* inputs x, dy, weight (for its shape); output dw */                                                    \
  extern "C" int DepthwiseGradWeight##NAME(int, void** params, int*, int64_t** shapes, const char**,       \
                                           void*, void*) {                                                 \
    grad_weight<S>(static_cast<float*>(params[0]), static_cast<float*>(params[1]),                        \
                   static_cast<float*>(params[3]), geometry(shapes[0], shapes[2][2], S, SAME));            \
    return 0;                                                                                              \
  }

DEPTHWISE_ENTRY_POINTS(S1, 1, false)
DEPTHWISE_ENTRY_POINTS(S2, 2, false)
DEPTHWISE_ENTRY_POINTS(SameS2, 2, true)
