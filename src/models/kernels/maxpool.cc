// 3 x 3 max pooling with stride 2 over a zero-padded border of 1 (NCHW, float32): ResNet's stem pooling (or with
// MindSpore's "same" padding, the smaller half first, as mindcv's and the ModelZoo's ResNets have it), for
// MindSpore's CPU backend as ops.Custom AOT functions: forward (output and the flat index of each window's maximum
// within its plane, -1 where the maximum is the padding) and its gradient. MindSpore 2.10 runs it as a Pad and a
// MaxPool whose CPU kernels take ~1 s per ResNet-50 step at batch 32, 224 px, forward and backward
// (docs/performance.md). Built by src/models/kernels/build.py.
//
// AOT interface: params = inputs then outputs; shapes[i] / ndims[i] describe params[i].
#include <atomic>
#include <cstdint>
#include <cstring>

#include <omp.h>

extern std::atomic<int> cls_kernel_threads;  // pooling.cc

namespace {

// inputs x (N,C,H,W); outputs y (N,C,Ho,Wo), argmax (N,C,Ho,Wo) int32. Output size ceil(size / 2) either way;
// the padding above and left is 1, or for "same" half of (out - 1) * 2 + 3 - size rounded down.
int forward(void** params, int64_t** shapes, bool same) {
  cls_kernel_threads.store(omp_get_max_threads(), std::memory_order_relaxed);
  const float* x = static_cast<float*>(params[0]);
  float* y = static_cast<float*>(params[1]);
  int32_t* arg = static_cast<int32_t*>(params[2]);
  const int64_t planes = shapes[0][0] * shapes[0][1], h = shapes[0][2], w = shapes[0][3];
  const int64_t ho = shapes[1][2], wo = shapes[1][3];
  const int64_t top = same ? ((ho - 1) * 2 + 3 - h > 0 ? ((ho - 1) * 2 + 3 - h) / 2 : 0) : 1;
  const int64_t left = same ? ((wo - 1) * 2 + 3 - w > 0 ? ((wo - 1) * 2 + 3 - w) / 2 : 0) : 1;
#pragma omp parallel for schedule(static)
  for (int64_t nc = 0; nc < planes; ++nc) {
    const float* xp = x + nc * h * w;
    float* yp = y + nc * ho * wo;
    int32_t* ap = arg + nc * ho * wo;
    for (int64_t r = 0; r < ho; ++r) {
      for (int64_t c = 0; c < wo; ++c) {
        // the padding is zero, and a window that reaches over the border sees it: start from it
        const int64_t r0 = 2 * r - top, c0 = 2 * c - left;
        const bool border = r0 < 0 || c0 < 0 || r0 + 2 >= h || c0 + 2 >= w;
        float best = border ? 0.0f : xp[r0 * w + c0];
        int32_t where = border ? -1 : static_cast<int32_t>(r0 * w + c0);
        for (int64_t i = 0; i < 3; ++i) {
          const int64_t rr = r0 + i;
          if (rr < 0 || rr >= h) continue;
          for (int64_t j = 0; j < 3; ++j) {
            const int64_t cc = c0 + j;
            if (cc < 0 || cc >= w) continue;
            const float v = xp[rr * w + cc];
            if (v > best) {
              best = v;
              where = static_cast<int32_t>(rr * w + cc);
            }
          }
        }
        yp[r * wo + c] = best;
        ap[r * wo + c] = where;
      }
    }
  }
  return 0;
}

}  // namespace

extern "C" int MaxPool3x3S2Forward(int, void** params, int*, int64_t** shapes, const char**, void*, void*) {
  return forward(params, shapes, false);
}

extern "C" int MaxPool3x3S2SameForward(int, void** params, int*, int64_t** shapes, const char**, void*, void*) {
  return forward(params, shapes, true);
}

// inputs x (for its shape), argmax, dy (N,C,Ho,Wo); output dx (N,C,H,W): dy goes to each window's maximum
extern "C" int MaxPool3x3S2Backward(int, void** params, int*, int64_t** shapes, const char**, void*, void*) {
  const int32_t* arg = static_cast<int32_t*>(params[1]);
  const float* dy = static_cast<float*>(params[2]);
  float* dx = static_cast<float*>(params[3]);
  const int64_t planes = shapes[0][0] * shapes[0][1], hw = shapes[0][2] * shapes[0][3];
  const int64_t out = shapes[2][2] * shapes[2][3];
#pragma omp parallel for schedule(static)
  for (int64_t nc = 0; nc < planes; ++nc) {
    float* dp = dx + nc * hw;
    std::memset(dp, 0, sizeof(float) * hw);
    const int32_t* ap = arg + nc * out;
    const float* gp = dy + nc * out;
    for (int64_t i = 0; i < out; ++i) {
      if (ap[i] >= 0) dp[ap[i]] += gp[i];
    }
  }
  return 0;
}
