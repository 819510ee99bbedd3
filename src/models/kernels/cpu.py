"""The C++ kernels as MindSpore ops.Custom AOT operators, and the switch that points a net's layers at them."""
from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

import mindspore as ms
import mindspore.nn as nn
import mindspore.ops as ops

from src.models.common import GlobalAvgPooling
from src.models.kernels.build import KernelUnavailable, build_library
from src.models.resnet.net import StemMaxPool

SWITCH = "CLS_CPU_KERNELS"


def _is_depthwise(cell: nn.Cell) -> bool:
    if not isinstance(cell, nn.Conv2d):
        return False
    k = cell.kernel_size
    return (cell.group > 1 and cell.group == cell.in_channels == cell.out_channels and k[0] == k[1]
            and k[0] % 2 == 1 and cell.stride in ((1, 1), (2, 2)) and cell.dilation == (1, 1)
            and (cell.pad_mode == "same" or (cell.pad_mode == "pad" and cell.padding in ((k[0] - 1) // 2,
                                                                                          ((k[0] - 1) // 2,) * 4)))
            and cell.data_format == "NCHW")


def _output_shape(stride: int):
    """(size + 2p - k) // stride + 1 with p = (k - 1) / 2, which is also ceil(size / stride) ("same") for odd k."""
    def shape(x, w):
        k, p = w[2], (w[2] - 1) // 2
        return [x[0], x[1], (x[2] + 2 * p - k) // stride + 1, (x[3] + 2 * p - k) // stride + 1]
    return shape


def _depthwise_op(library: Path, stride: int, same: bool = False) -> ops.Custom:
    """Conv2D-compatible primitive (x, weight) -> y with the C++ forward and a bprop made of the C++ gradients.
    `same`: MindSpore's "same" padding (differs from (k - 1) / 2 on each side only for stride 2 on even sizes)."""
    name = f"{'Same' if same else ''}S{stride}"
    grad_x = ops.Custom(f"{library}:DepthwiseGradInput{name}", out_shape=lambda x, dy, w: x,
                        out_dtype=lambda x, dy, w: x, func_type="aot")
    grad_w = ops.Custom(f"{library}:DepthwiseGradWeight{name}", out_shape=lambda x, dy, w: w,
                        out_dtype=lambda x, dy, w: w, func_type="aot")

    def bprop(x, weight, out, dout):
        return grad_x(x, dout, weight), grad_w(x, dout, weight)

    return ops.Custom(f"{library}:DepthwiseForward{name}", out_shape=_output_shape(stride),
                      out_dtype=lambda x, w: x, func_type="aot", bprop=bprop)


class _BatchNormTrain(nn.Cell):
    """Stands in for nn.BatchNorm2d's `bn_train` primitive: same call, same output tuple, same running-statistics
    update (moving = (1 - m) * moving + m * batch, unbiased batch variance, m = 1 - the layer's momentum)."""

    def __init__(self, forward: ops.Custom, momentum: float, eps: float):
        super().__init__()
        self.forward = forward
        self.momentum = momentum
        self.eps = ms.Tensor([eps], ms.float32)

    def construct(self, x, gamma, beta, moving_mean, moving_variance):
        y, mean, _, variance = self.forward(x, gamma, beta, self.eps)
        mean, variance = ops.stop_gradient(mean), ops.stop_gradient(variance)
        ops.assign(moving_mean, moving_mean * (1 - self.momentum) + mean * self.momentum)
        ops.assign(moving_variance, moving_variance * (1 - self.momentum) + variance * self.momentum)
        return (y,)


def _batchnorm_op(library: Path) -> ops.Custom:
    """(x, gamma, beta, eps) -> (y, batch mean, 1/sqrt(var + eps), unbiased var), with the C++ backward."""
    backward = ops.Custom(f"{library}:BatchNormTrainBackward", out_shape=lambda x, dy, m, s, g: (x, g, g),
                          out_dtype=lambda x, dy, m, s, g: (x, g, g), func_type="aot")

    def bprop(x, gamma, beta, eps, out, dout):
        dx, dgamma, dbeta = backward(x, dout[0], out[1], out[2], gamma)
        return dx, dgamma, dbeta, ops.zeros_like(eps)

    return ops.Custom(f"{library}:BatchNormTrainForward", out_shape=lambda x, g, b, e: (x, g, g, g),
                      out_dtype=lambda x, g, b, e: (x, g, g, g), func_type="aot", bprop=bprop)


def _is_batchnorm(cell: nn.Cell) -> bool:
    return (isinstance(cell, nn.BatchNorm2d) and cell.use_batch_statistics is None and cell.format == "NCHW"
            and cell.gamma.dtype == ms.float32 and isinstance(cell.bn_train, ops.BatchNorm))


def _mean_op(library: Path) -> ops.Custom:
    """x (N, C, H, W) -> its mean over H x W, (N, C, 1, 1), with the C++ gradient."""
    backward = ops.Custom(f"{library}:ChannelMeanBackward", out_shape=lambda x, dy: x, out_dtype=lambda x, dy: x,
                          func_type="aot")

    def bprop(x, out, dout):
        return (backward(x, dout),)

    return ops.Custom(f"{library}:ChannelMeanForward", out_shape=lambda x: [x[0], x[1], 1, 1],
                      out_dtype=lambda x: x, func_type="aot", bprop=bprop)


def _is_pooling(cell: nn.Cell) -> bool:
    return isinstance(cell, GlobalAvgPooling) and cell.kernel is None


def _maxpool_op(library: Path, same: bool = False) -> ops.Custom:
    """x (N, C, H, W) -> (3 x 3 / 2 max over a zero border of 1, or MindSpore's "same" padding, int32 index of each
    maximum), with the C++ gradient."""
    backward = ops.Custom(f"{library}:MaxPool3x3S2Backward", out_shape=lambda x, arg, dy: x,
                          out_dtype=lambda x, arg, dy: x, func_type="aot")

    def bprop(x, out, dout):
        return (backward(x, out[1], dout[0]),)

    def shape(x):
        y = [x[0], x[1], (x[2] - 1) // 2 + 1, (x[3] - 1) // 2 + 1]
        return y, y

    return ops.Custom(f"{library}:MaxPool3x3S2{'Same' if same else ''}Forward", out_shape=shape,
                      out_dtype=lambda x: (x, ms.int32), func_type="aot", bprop=bprop)


def _is_maxpool(cell: nn.Cell) -> bool:
    return isinstance(cell, StemMaxPool) and cell.kernel is None


KINDS = ("depthwise", "batchnorm", "pooling", "maxpool")
_MATCHES = {"depthwise": _is_depthwise, "batchnorm": _is_batchnorm, "pooling": _is_pooling, "maxpool": _is_maxpool}
_NAMES = {"depthwise": "depthwise convolutions", "batchnorm": "batch norms", "pooling": "average poolings",
          "maxpool": "max poolings"}


def fast_cpu_kernels(net: nn.Cell, kinds: tuple[str, ...] = KINDS) -> str | None:
    """Switch the depthwise convolutions, batch norms and global average poolings of `net` (float32, on CPU) to
    the C++ kernels, in place.

    Returns one line to log (how many layers, or why not), or None when the net has no such layer.
    """
    switch, ignored = os.environ.get(SWITCH, "").strip().lower(), ""
    if switch and switch != "mindspore":
        wanted = {kind.strip() for kind in switch.split(",")}
        if wanted <= {*KINDS, OPTIMIZER_KIND}:
            kinds = tuple(kind for kind in kinds if kind in wanted)
        else:
            ignored = f"; {SWITCH}={switch} ignored: use mindspore, or some of {','.join((*KINDS, OPTIMIZER_KIND))}"
    cells = [cell for _, cell in net.cells_and_names()]
    if switch == "mindspore" and any(match(cell) for cell in cells for match in _MATCHES.values()):
        return f"CPU: MindSpore's own kernels ({SWITCH}=mindspore)"
    found = {kind: [cell for cell in cells if _MATCHES[kind](cell)] for kind in kinds}
    if not any(found.values()):
        return None
    try:
        library = build_library()
    except KernelUnavailable as exc:
        return f"CPU: MindSpore's own kernels (slow on CPU; the fast kernels are unavailable: {exc}{ignored})"
    if found.get("depthwise"):
        primitives = {(1, False): _depthwise_op(library, 1), (2, False): _depthwise_op(library, 2),
                      (2, True): _depthwise_op(library, 2, same=True)}
        for cell in found["depthwise"]:  # stride 1 "same" is (k - 1) / 2 on each side for odd k
            cell.conv2d = primitives[cell.stride[0], cell.stride[0] == 2 and cell.pad_mode == "same"]
    if found.get("batchnorm"):
        forward = _batchnorm_op(library)
        for cell in found["batchnorm"]:
            cell.bn_train = _BatchNormTrain(forward, cell.momentum, cell.eps)
    if found.get("pooling"):
        mean = _mean_op(library)
        for cell in found["pooling"]:
            cell.kernel = mean
    if found.get("maxpool"):
        pools = {same: _maxpool_op(library, same) for same in (False, True)}
        for cell in found["maxpool"]:
            cell.kernel = pools[cell.same]
    counts = ", ".join(f"{len(found.get(kind, []))} {_NAMES[kind]}" for kind in KINDS)
    return f"CPU: fast kernels for {counts} ({library.name}{ignored})"


OPTIMIZER_KIND = "optim"  # CLS_CPU_KERNELS names it beside KINDS: the optimizers' updates (optim.cc)


def optimizer_kernels() -> dict[str, ops.Custom] | None:
    """The one-pass updates of optim.cc ({"rmsprop", "adam"} -> primitive), or None where MindSpore's ops run them:
    CLS_CPU_KERNELS=mindspore, a CLS_CPU_KERNELS list without "optim", or no compiler (the net's line says why)."""
    switch = os.environ.get(SWITCH, "").strip().lower()
    if switch == "mindspore" or (switch and OPTIMIZER_KIND not in {k.strip() for k in switch.split(",")}):
        return None
    try:
        library = build_library()
    except KernelUnavailable:
        return None

    def update(name: str) -> ops.Custom:
        return ops.Custom(f"{library}:{name}Update", out_shape=lambda p, g, a, b, h, d: (p, p, p),
                          out_dtype=lambda p, g, a, b, h, d: (p, p, p), func_type="aot")

    return {"rmsprop": update("RMSprop"), "adam": update("Adam")}


def kernel_threads() -> int | None:
    """OpenMP threads the C++ kernels last ran with in this process (None if none ran or they are unavailable).

    The library MindSpore loaded for the ops.Custom operators is the same file, so dlopen returns the same handle
    and this reads the number its kernels recorded on the thread MindSpore called them from.
    """
    try:
        threads = ctypes.CDLL(str(build_library())).KernelThreads()
    except (KernelUnavailable, OSError, AttributeError):
        return None
    return threads or None


def use_fast_kernels(net: nn.Cell, platform_name: str, amp_level: str) -> None:
    """fast_cpu_kernels on CPU at float32 (amp_level O0; the kernels are float32 only), logged once per process."""
    if platform_name != "CPU" or amp_level != "O0":
        return
    note = fast_cpu_kernels(net)
    if note and note not in _LOGGED:
        _LOGGED.add(note)
        logging.getLogger("train").info(note)


_LOGGED: set[str] = set()
