"""Optimizer factory under mindcv's key `opt` (as timm's create_optimizer_v2 and mindcv's create_optimizer).

MindSpore's own optimizers are used where they compute the update asked for:
- momentum: nn.Momentum (v = m*v + g; w -= lr*v), the ModelZoo's and this package's default since its start;
- sgd and nesterov: nn.SGD, which is torch.optim.SGD (nesterov: w -= lr*(g + m*v)). nn.Momentum(use_nesterov=True)
  is not used: MindSpore 2.10's CPU kernel ignores the flag (measured: its updates are plain momentum's);
Five are written here because MindSpore's differ from the update that recipes are tuned with (or do not run):
- rmsprop: PyTorch's starts the mean square at 0 and adds eps outside the square root (torchvision's MobileNetV3
  recipe uses eps 0.0316, which inside the root would be a different optimizer);
- rmsproptf: TensorFlow's, which timm's RMSpropTF copies (mean square from 1, eps inside the root, the LR inside the
  momentum buffer). nn.RMSProp has that formula, but its CPU kernel takes an approximate reciprocal square root on
  tensors of 8 or more elements: updates off by up to 0.1% (measured against the formula);
- adam: nn.Adam adds eps to the bias-uncorrected root (TensorFlow's "epsilon hat"), PyTorch to the corrected one;
- adamw: nn.AdamWeightDecay has no bias correction (BERT's), PyTorch's AdamW has;
- lamb: nn.Lamb's kernel does not exist on CPU; this is the LAMB paper's update (bias-corrected Adam ratio plus
  decoupled decay, scaled per tensor by ||w|| / ||update||), on the tensors that decay; those that do not (BatchNorm,
  biases) take the unscaled step, as timm's Lamb (always_adapt=False) and NVIDIA's.
On CPU those five run each parameter's update as one C++ pass (src/models/kernels/optim.cc, the same arithmetic)
instead of 10-15 element-wise MindSpore ops; CLS_CPU_KERNELS=mindspore keeps the ops.
Weight decay stays off BatchNorm and biases unless `filter_bias_and_bn` is False. A checkpoint holds every
optimizer's moments (the train step's parameters), so --resume_ckpt continues them.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from src.config import ADAM_FAMILY, DEFAULT_EPS, OPTIMIZERS, RMSPROP_FAMILY, SGD_FAMILY

NO_DECAY_SUFFIXES = ("gamma", "beta", "bias")  # BatchNorm scale/shift and biases


def param_groups(params: list[Parameter], weight_decay: float, filter_bias_and_bn: bool = True) -> list[dict]:
    """Conv/dense weights decay; BatchNorm gamma/beta and biases do not (unless not filtered); the order is kept."""
    if not filter_bias_and_bn:
        return [{"params": list(params), "weight_decay": weight_decay}, {"order_params": params}]
    decay = [p for p in params if not p.name.endswith(NO_DECAY_SUFFIXES)]
    no_decay = [p for p in params if p.name.endswith(NO_DECAY_SUFFIXES)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0},
            {"order_params": params}]


def decays(params: list[Parameter], weight_decay: float, filter_bias_and_bn: bool = True) -> tuple[float, ...]:
    """The weight decay of each parameter, as param_groups assigns it."""
    return tuple(0.0 if filter_bias_and_bn and p.name.endswith(NO_DECAY_SUFFIXES) else weight_decay for p in params)


def create_optimizer(params: list[Parameter], lr: np.ndarray | float, cfg) -> nn.Optimizer:
    """The `cfg.opt` optimizer over `params`; `lr` is a per-step array (indexed by the optimizer's global step, which
    checkpoints save) or a constant. `cfg` needs opt, momentum, weight_decay, nesterov, filter_bias_and_bn, eps,
    rmsprop_alpha, beta1 and beta2 (config.Config has them)."""
    learning_rate = Tensor(lr) if isinstance(lr, np.ndarray) else lr
    name, wd, keep = cfg.opt, cfg.weight_decay, cfg.filter_bias_and_bn
    eps = DEFAULT_EPS.get(name, 0.0) if cfg.eps is None else cfg.eps
    groups = param_groups(params, wd, keep)
    if name == "momentum" and not cfg.nesterov:
        return nn.Momentum(groups, learning_rate=learning_rate, momentum=cfg.momentum)
    if name in SGD_FAMILY:
        return nn.SGD(groups, learning_rate=learning_rate, momentum=cfg.momentum,
                      nesterov=name == "nesterov" or cfg.nesterov)
    per_param = decays(params, wd, keep)
    fused = _cpu_kernels() if cfg.platform == "CPU" and all(p.dtype == ms.float32 for p in params) else None
    if name in RMSPROP_FAMILY:
        return RMSprop(params, learning_rate, per_param, alpha=cfg.rmsprop_alpha, eps=eps, momentum=cfg.momentum,
                       tensorflow=name == "rmsproptf", kernel=fused and fused["rmsprop"])
    if name in ADAM_FAMILY:
        return Adam(params, learning_rate, per_param, beta1=cfg.beta1, beta2=cfg.beta2, eps=eps,
                    kind={"adam": Adam.COUPLED, "adamw": Adam.DECOUPLED, "lamb": Adam.LAMB}[name],
                    kernel=fused and fused["adam"])
    raise ValueError(f"unknown optimizer {name!r} (one of {', '.join(OPTIMIZERS)})")


def describe(cfg) -> str:
    """One phrase for the log: the optimizer and the settings it uses."""
    name = cfg.optimizer_kind
    eps = DEFAULT_EPS.get(cfg.opt) if cfg.eps is None else cfg.eps
    parts = []
    if cfg.opt in SGD_FAMILY + RMSPROP_FAMILY:
        parts.append(f"momentum {cfg.momentum:g}")
    if cfg.opt in RMSPROP_FAMILY:
        parts.append(f"alpha {cfg.rmsprop_alpha:g}")
    if cfg.opt in ADAM_FAMILY:
        parts.append(f"betas {cfg.beta1:g}, {cfg.beta2:g}")
    if eps is not None:
        parts.append(f"eps {eps:g}")
    decay = "decoupled " if cfg.opt in ("adamw", "lamb") else ""
    where = ", not on BatchNorm and biases" if cfg.filter_bias_and_bn else " on every parameter"
    parts.append(f"{decay}weight decay {cfg.weight_decay:g}{where if cfg.weight_decay else ''}")
    return f"{name} ({', '.join(parts)})"


def _cpu_kernels():
    from src.models.kernels.cpu import optimizer_kernels

    return optimizer_kernels()


_fused = ops.MultitypeFuncGraph("fused")


@_fused.register("Function", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor")
def _fused_update(kernel, hyper, decay, param, grad, state1, state2):
    """One C++ pass computes the new parameter and states (optim.cc); they are written back here."""
    new_param, new1, new2 = kernel(param, ops.cast(grad, ms.float32), state1, state2, hyper, decay)
    ops.assign(state1, new1)
    ops.assign(state2, new2)
    return ops.assign(param, new_param)


class _PerParameter(nn.Optimizer):
    """An optimizer over a plain parameter list with one weight decay per parameter (applied by the subclass);
    `kernel`: the C++ update of the subclass's formula (CPU), or None for MindSpore's ops."""

    def __init__(self, params, learning_rate, weight_decays: tuple[float, ...], kernel=None):
        super().__init__(learning_rate, list(params), weight_decay=0.0)
        self.decays = tuple(Tensor(d, ms.float32) for d in weight_decays)
        self.hyper_map = ops.HyperMap()
        self.kernel = kernel
        self.zero = Tensor(0.0, ms.float32)

    def step_lr(self):
        """The LR of this step; counts the step (global_step then is the 1-based number of updates made)."""
        lr = self.get_lr()
        self.assignadd(self.global_step, self.global_step_increase_tensor)
        return lr


_rmsprop = ops.MultitypeFuncGraph("rmsprop")


@_rmsprop.register("Tensor", "Tensor", "Tensor", "Bool", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor")
def _rmsprop_update(alpha, eps, momentum, tensorflow, lr, decay, param, grad, square, buf):
    grad = grad + decay * param  # weight decay as L2 on the gradient (torch's and timm's default)
    square_new = alpha * square + (1 - alpha) * grad * grad
    if tensorflow:  # eps inside the root, the LR inside the buffer
        buf_new = momentum * buf + lr * grad / ops.sqrt(square_new + eps)
        param_new = param - buf_new
    else:
        buf_new = momentum * buf + grad / (ops.sqrt(square_new) + eps)
        param_new = param - lr * buf_new
    ops.assign(square, square_new)
    ops.assign(buf, buf_new)
    return ops.assign(param, param_new)


class RMSprop(_PerParameter):
    """torch.optim.RMSprop (centered=False): square = a*square + (1-a)*g^2; buf = m*buf + g/(sqrt(square) + eps);
    w -= lr*buf (with momentum 0 that is torch's update without momentum). `tensorflow`: TensorFlow's RMSProp and
    timm's RMSpropTF: the square starts at 1; buf = m*buf + lr*g/sqrt(square + eps); w -= buf."""

    def __init__(self, params, learning_rate, weight_decays, alpha: float, eps: float, momentum: float,
                 tensorflow: bool, kernel=None):
        super().__init__(params, learning_rate, weight_decays, kernel)
        self.tf_flag = Tensor(float(tensorflow), ms.float32)
        self.alpha, self.eps = Tensor(alpha, ms.float32), Tensor(eps, ms.float32)
        self.momentum, self.tensorflow = Tensor(momentum, ms.float32), tensorflow
        self.mean_square = self._parameters.clone(prefix="mean_square", init="ones" if tensorflow else "zeros")
        self.moment = self._parameters.clone(prefix="moment", init="zeros")

    def construct(self, gradients):
        lr = self.step_lr()
        if self.kernel is not None:
            z = self.zero
            hyper = ops.stack([ops.cast(lr, ms.float32), self.alpha, self.eps, self.momentum, self.tf_flag, z, z, z])
            return self.hyper_map(ops.partial(_fused, self.kernel, hyper), self.decays, self._parameters, gradients,
                                  self.mean_square, self.moment)
        return self.hyper_map(ops.partial(_rmsprop, self.alpha, self.eps, self.momentum, self.tensorflow, lr),
                              self.decays, self._parameters, gradients, self.mean_square, self.moment)


_adam = ops.MultitypeFuncGraph("adam")


@_adam.register("Tensor", "Tensor", "Tensor", "Number", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                "Tensor", "Tensor")
def _adam_update(beta1, beta2, eps, kind, correction1, correction2, lr, decay, param, grad, m, v):
    if kind == 0:  # Adam: L2 added to the gradient
        grad = grad + decay * param
    m_new = beta1 * m + (1 - beta1) * grad
    v_new = beta2 * v + (1 - beta2) * grad * grad
    ops.assign(m, m_new)
    ops.assign(v, v_new)
    if kind == 2:  # LAMB: r = m_hat / (sqrt(v_hat) + eps) + wd*w, scaled by ||w|| / ||r|| where wd > 0
        update = (m_new / correction1) / (ops.sqrt(v_new / correction2) + eps) + decay * param
        w_norm, u_norm = ops.norm(param), ops.norm(update)
        adapt = ops.logical_and(ops.logical_and(w_norm > 0, u_norm > 0), decay > 0)
        ratio = ops.select(adapt, w_norm / u_norm, ops.ones_like(w_norm))
        return ops.assign(param, param - lr * ratio * update)
    start = param * (1 - lr * decay) if kind == 1 else param  # AdamW: w *= 1 - lr*wd before the step
    denom = ops.sqrt(v_new) / ops.sqrt(correction2) + eps
    return ops.assign(param, start - (lr / correction1) * m_new / denom)


class Adam(_PerParameter):
    """torch.optim.Adam / AdamW (amsgrad=False): bias-corrected moments, eps added to sqrt(v / (1 - b2^t)); LAMB
    (You et al. 2019, Algorithm 2; the trust ratio on decayed tensors only, as timm's) on the same moments."""

    COUPLED, DECOUPLED, LAMB = 0, 1, 2
    PREFIXES = {COUPLED: ("moment1", "moment2"), DECOUPLED: ("adam_m", "adam_v"), LAMB: ("lamb_m", "lamb_v")}

    def __init__(self, params, learning_rate, weight_decays, beta1: float, beta2: float, eps: float, kind: int,
                 kernel=None):
        super().__init__(params, learning_rate, weight_decays, kernel)
        self.kind_value = Tensor(float(kind), ms.float32)
        self.beta1, self.beta2 = Tensor(beta1, ms.float32), Tensor(beta2, ms.float32)
        self.eps, self.kind = Tensor(eps, ms.float32), kind
        first, second = self.PREFIXES[kind]
        self.moment1 = self._parameters.clone(prefix=first, init="zeros")
        self.moment2 = self._parameters.clone(prefix=second, init="zeros")

    def construct(self, gradients):
        lr = self.step_lr()
        t = ops.cast(self.global_step.reshape(()), ms.float32)
        correction1 = 1 - ops.pow(self.beta1, t)
        correction2 = 1 - ops.pow(self.beta2, t)
        if self.kernel is not None:
            hyper = ops.stack([ops.cast(lr, ms.float32), self.beta1, self.beta2, self.eps, correction1, correction2,
                               self.kind_value, self.zero])
            return self.hyper_map(ops.partial(_fused, self.kernel, hyper), self.decays, self._parameters, gradients,
                                  self.moment1, self.moment2)
        return self.hyper_map(ops.partial(_adam, self.beta1, self.beta2, self.eps, self.kind, correction1,
                                          correction2, lr), self.decays, self._parameters, gradients,
                              self.moment1, self.moment2)
