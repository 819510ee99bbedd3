// Batch normalization with batch statistics (training mode; NCHW, float32) for MindSpore's CPU backend as
// ops.Custom AOT functions: the forward (normalized output, batch mean, 1/sqrt(var + eps), unbiased variance
// for the running statistics) and the backward (gradients of x, gamma, beta). MindSpore 2.10's CPU BatchNorm
// and BatchNormGrad take 2-3x longer than these two-pass loops on the small feature maps of MobileNetV2/V3
// (docs/performance.md). Built by src/models/kernels/build.py into one library with the other kernels.
//
// AOT interface: params = inputs then outputs; shapes[i] / ndims[i] describe params[i]. The epsilon arrives as a
// one-element float32 tensor so one compiled function serves every layer.
#include <cmath>
#include <atomic>
#include <cstdint>

#include <omp.h>

extern std::atomic<int> cls_kernel_threads;  // pooling.cc

namespace {

struct Planes {
  int64_t n, c, hw;
};

Planes planes(const int64_t* shape, int ndim) {
  Planes p{shape[0], shape[1], 1};
  for (int d = 2; d < ndim; ++d) p.hw *= shape[d];
  return p;
}

void forward(const float* x, const float* gamma, const float* beta, float eps, float* y, float* mean_out,
             float* invstd_out, float* var_out, const Planes& p) {
  const double count = static_cast<double>(p.n * p.hw);
#pragma omp parallel for schedule(dynamic, 4)
  for (int64_t ch = 0; ch < p.c; ++ch) {
    double total = 0.0;
    for (int64_t b = 0; b < p.n; ++b) {
      const float* xp = x + (b * p.c + ch) * p.hw;
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < p.hw; ++i) acc += xp[i];
      total += acc;
    }
    const float mean = static_cast<float>(total / count);
    double squares = 0.0;
    for (int64_t b = 0; b < p.n; ++b) {
      const float* xp = x + (b * p.c + ch) * p.hw;
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < p.hw; ++i) acc += (xp[i] - mean) * (xp[i] - mean);
      squares += acc;
    }
    const double var = squares / count;
    const float invstd = static_cast<float>(1.0 / std::sqrt(var + eps));
    const float scale = gamma[ch] * invstd;
    const float shift = beta[ch] - mean * scale;
    for (int64_t b = 0; b < p.n; ++b) {
      const float* xp = x + (b * p.c + ch) * p.hw;
      float* yp = y + (b * p.c + ch) * p.hw;
#pragma omp simd
      for (int64_t i = 0; i < p.hw; ++i) yp[i] = xp[i] * scale + shift;
    }
    mean_out[ch] = mean;
    invstd_out[ch] = invstd;
    var_out[ch] = static_cast<float>(count > 1.0 ? squares / (count - 1.0) : var);
  }
}

void backward(const float* x, const float* dy, const float* mean, const float* invstd, const float* gamma,
              float* dx, float* dgamma, float* dbeta, const Planes& p) {
  const double count = static_cast<double>(p.n * p.hw);
#pragma omp parallel for schedule(dynamic, 4)
  for (int64_t ch = 0; ch < p.c; ++ch) {
    const float m = mean[ch];
    double sum_dy = 0.0, sum_dy_xc = 0.0;
    for (int64_t b = 0; b < p.n; ++b) {
      const float* xp = x + (b * p.c + ch) * p.hw;
      const float* gp = dy + (b * p.c + ch) * p.hw;
      float acc = 0.0f, acc_xc = 0.0f;
#pragma omp simd reduction(+ : acc, acc_xc)
      for (int64_t i = 0; i < p.hw; ++i) {
        acc += gp[i];
        acc_xc += gp[i] * (xp[i] - m);
      }
      sum_dy += acc;
      sum_dy_xc += acc_xc;
    }
    const float is = invstd[ch];
    // dx = gamma * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)), xhat = (x - mean) * invstd
    const float scale = gamma[ch] * is;
    const float mean_dy = static_cast<float>(sum_dy / count);
    const float k = static_cast<float>(sum_dy_xc / count) * is * is;
    for (int64_t b = 0; b < p.n; ++b) {
      const float* xp = x + (b * p.c + ch) * p.hw;
      const float* gp = dy + (b * p.c + ch) * p.hw;
      float* dp = dx + (b * p.c + ch) * p.hw;
#pragma omp simd
      for (int64_t i = 0; i < p.hw; ++i) dp[i] = scale * (gp[i] - mean_dy - (xp[i] - m) * k);
    }
    dgamma[ch] = static_cast<float>(sum_dy_xc) * is;
    dbeta[ch] = static_cast<float>(sum_dy);
  }
}

}  // namespace

// inputs x (N,C,...), gamma (C), beta (C), eps (1); outputs y, mean (C), invstd (C), unbiased variance (C)
extern "C" int BatchNormTrainForward(int, void** params, int* ndims, int64_t** shapes, const char**, void*,
                                     void*) {
  cls_kernel_threads.store(omp_get_max_threads(), std::memory_order_relaxed);
  forward(static_cast<float*>(params[0]), static_cast<float*>(params[1]), static_cast<float*>(params[2]),
          static_cast<float*>(params[3])[0], static_cast<float*>(params[4]), static_cast<float*>(params[5]),
          static_cast<float*>(params[6]), static_cast<float*>(params[7]), planes(shapes[0], ndims[0]));
  return 0;
}

// inputs x, dy, mean, invstd, gamma; outputs dx, dgamma, dbeta
extern "C" int BatchNormTrainBackward(int, void** params, int* ndims, int64_t** shapes, const char**, void*,
                                      void*) {
  backward(static_cast<float*>(params[0]), static_cast<float*>(params[1]), static_cast<float*>(params[2]),
           static_cast<float*>(params[3]), static_cast<float*>(params[4]), static_cast<float*>(params[5]),
           static_cast<float*>(params[6]), static_cast<float*>(params[7]), planes(shapes[0], ndims[0]));
  return 0;
}
