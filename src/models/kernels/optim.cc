// One pass per parameter for the optimizers src/engine/optimizer.py writes itself (rmsprop, rmsproptf, adam, adamw,
// lamb), for MindSpore's CPU backend as ops.Custom AOT functions. As MindSpore ops each update is 10-15 element-wise
// operations, each a pass over the parameter: on CPU the memory traffic makes them 5-10% of a MobileNetV2 step at
// 224 px and about a third of one at 32 px (docs/recipes.md: rmsprop 254 img/s on the ops, momentum 393). The arithmetic is the Python Cells', in the same order, in
// float32. Built by src/models/kernels/build.py.
//
// AOT interface: params = inputs then outputs; shapes[i] / ndims[i] describe params[i].
// Inputs: param, grad, state1, state2 (the parameter's shape), hyper (float32 [8], the step's scalars),
// decay (float32 [], this parameter's weight decay). Outputs: new param, new state1, new state2.
#include <cmath>
#include <cstdint>

#include <omp.h>

namespace {

int64_t elements(const int64_t* shape, int ndim) {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

constexpr int64_t kParallelFrom = 1 << 15;  // smaller tensors run on the calling thread

}  // namespace

// hyper: lr, alpha, eps, momentum, tensorflow (0: PyTorch's RMSprop, 1: TensorFlow's / timm's RMSpropTF)
// state1: the mean square, state2: the momentum buffer
extern "C" int RMSpropUpdate(int, void** params, int* ndims, int64_t** shapes, const char**, void*, void*) {
  const float* p = static_cast<float*>(params[0]);
  const float* g = static_cast<float*>(params[1]);
  const float* sq = static_cast<float*>(params[2]);
  const float* buf = static_cast<float*>(params[3]);
  const float* h = static_cast<float*>(params[4]);
  const float decay = static_cast<float*>(params[5])[0];
  float* p_out = static_cast<float*>(params[6]);
  float* sq_out = static_cast<float*>(params[7]);
  float* buf_out = static_cast<float*>(params[8]);
  const float lr = h[0], alpha = h[1], eps = h[2], momentum = h[3];
  const bool tensorflow = h[4] != 0.0f;
  const int64_t n = elements(shapes[0], ndims[0]);
#pragma omp parallel for schedule(static) if (n >= kParallelFrom)
  for (int64_t i = 0; i < n; ++i) {
    const float grad = g[i] + decay * p[i];
    const float s = alpha * sq[i] + (1.0f - alpha) * grad * grad;
    sq_out[i] = s;
    if (tensorflow) {
      const float b = momentum * buf[i] + lr * grad / std::sqrt(s + eps);
      buf_out[i] = b;
      p_out[i] = p[i] - b;
    } else {
      const float b = momentum * buf[i] + grad / (std::sqrt(s) + eps);
      buf_out[i] = b;
      p_out[i] = p[i] - lr * b;
    }
  }
  return 0;
}

// hyper: lr, beta1, beta2, eps, 1 - beta1^t, 1 - beta2^t, kind (0 adam, 1 adamw, 2 lamb)
// state1: the first moment, state2: the second moment
extern "C" int AdamUpdate(int, void** params, int* ndims, int64_t** shapes, const char**, void*, void*) {
  const float* p = static_cast<float*>(params[0]);
  const float* g = static_cast<float*>(params[1]);
  const float* m = static_cast<float*>(params[2]);
  const float* v = static_cast<float*>(params[3]);
  const float* h = static_cast<float*>(params[4]);
  const float decay = static_cast<float*>(params[5])[0];
  float* p_out = static_cast<float*>(params[6]);
  float* m_out = static_cast<float*>(params[7]);
  float* v_out = static_cast<float*>(params[8]);
  const float lr = h[0], beta1 = h[1], beta2 = h[2], eps = h[3], c1 = h[4], c2 = h[5];
  const int kind = static_cast<int>(h[6]);
  const int64_t n = elements(shapes[0], ndims[0]);
  if (kind == 2) {  // LAMB: the update into p_out first, its norm and the weights' norm, then the scaled step
    double w_sq = 0.0, u_sq = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : w_sq, u_sq) if (n >= kParallelFrom)
    for (int64_t i = 0; i < n; ++i) {
      const float m_new = beta1 * m[i] + (1.0f - beta1) * g[i];
      const float v_new = beta2 * v[i] + (1.0f - beta2) * g[i] * g[i];
      m_out[i] = m_new;
      v_out[i] = v_new;
      const float u = (m_new / c1) / (std::sqrt(v_new / c2) + eps) + decay * p[i];
      p_out[i] = u;
      w_sq += static_cast<double>(p[i]) * p[i];
      u_sq += static_cast<double>(u) * u;
    }
    const float w_norm = static_cast<float>(std::sqrt(w_sq)), u_norm = static_cast<float>(std::sqrt(u_sq));
    const float ratio = (w_norm > 0.0f && u_norm > 0.0f && decay > 0.0f) ? w_norm / u_norm : 1.0f;
#pragma omp parallel for schedule(static) if (n >= kParallelFrom)
    for (int64_t i = 0; i < n; ++i) p_out[i] = p[i] - lr * ratio * p_out[i];
    return 0;
  }
  const float root_c2 = std::sqrt(c2), step = lr / c1;
#pragma omp parallel for schedule(static) if (n >= kParallelFrom)
  for (int64_t i = 0; i < n; ++i) {
    const float grad = kind == 0 ? g[i] + decay * p[i] : g[i];
    const float m_new = beta1 * m[i] + (1.0f - beta1) * grad;
    const float v_new = beta2 * v[i] + (1.0f - beta2) * grad * grad;
    m_out[i] = m_new;
    v_out[i] = v_new;
    const float start = kind == 1 ? p[i] * (1.0f - lr * decay) : p[i];
    p_out[i] = start - step * m_new / (std::sqrt(v_new) / root_c2 + eps);
  }
  return 0;
}
