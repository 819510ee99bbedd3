// Global average pooling over H x W (NCHW, float32) for MindSpore's CPU backend as ops.Custom AOT functions:
// forward (N, C, H, W) -> (N, C, 1, 1) and its gradient. MindSpore 2.10's CPU ReduceMean and the Tile + RealDiv
// of its gradient take several times longer than one pass over each plane; MobileNetV3's squeeze-excite blocks
// run them on every expanded feature map (docs/performance.md). Built by src/models/kernels/build.py.
//
// AOT interface: params = inputs then outputs; shapes[i] / ndims[i] describe params[i].
#include <atomic>
#include <cstdint>

#include <omp.h>

// The OpenMP team size the kernels run with, as seen on the thread MindSpore calls them from (0 until one ran).
// MindSpore sets OMP_NUM_THREADS=1 in its process environment when it loads; libgomp has read the variable
// before that, but a different load order would leave every kernel on one core: KernelThreads() makes it visible.
std::atomic<int> cls_kernel_threads{0};
extern "C" int KernelThreads() { return cls_kernel_threads.load(std::memory_order_relaxed); }


// inputs x (N,C,H,W); output y (N,C,1,1)
extern "C" int ChannelMeanForward(int, void** params, int*, int64_t** shapes, const char**, void*, void*) {
  const float* x = static_cast<float*>(params[0]);
  float* y = static_cast<float*>(params[1]);
  cls_kernel_threads.store(omp_get_max_threads(), std::memory_order_relaxed);
  const int64_t planes = shapes[0][0] * shapes[0][1], hw = shapes[0][2] * shapes[0][3];
#pragma omp parallel for schedule(static)
  for (int64_t nc = 0; nc < planes; ++nc) {
    const float* xp = x + nc * hw;
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < hw; ++i) acc += xp[i];
    y[nc] = acc / static_cast<float>(hw);
  }
  return 0;
}

// inputs x (for its shape), dy (N,C,1,1); output dx (N,C,H,W) = dy / (H * W) on every position
extern "C" int ChannelMeanBackward(int, void** params, int*, int64_t** shapes, const char**, void*, void*) {
  const float* dy = static_cast<float*>(params[1]);
  float* dx = static_cast<float*>(params[2]);
  const int64_t planes = shapes[0][0] * shapes[0][1], hw = shapes[0][2] * shapes[0][3];
#pragma omp parallel for schedule(static)
  for (int64_t nc = 0; nc < planes; ++nc) {
    const float value = dy[nc] / static_cast<float>(hw);
    float* dp = dx + nc * hw;
#pragma omp simd
    for (int64_t i = 0; i < hw; ++i) dp[i] = value;
  }
  return 0;
}
