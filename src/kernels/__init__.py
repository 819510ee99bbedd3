"""Fast CPU kernels: C++ loops run by MindSpore as ops.Custom AOT operators.

MindSpore 2.10 runs grouped convolutions on CPU through oneDNN's im2col + GEMM per group on plain NCHW tensors,
its CPU BatchNorm/BatchNormGrad take 2-3x longer than two passes over each channel, and its ReduceMean gradient is
a Tile + RealDiv; in MobileNetV2/V3 training those take most of every step (docs/performance.md).
`fast_cpu_kernels` points the depthwise nn.Conv2d layers of a net at depthwise.cc, the batch-statistics path of
its nn.BatchNorm2d layers at batchnorm.cc and its GlobalAvgPooling cells at pooling.cc: same Parameters and names
(checkpoints are unchanged), same numbers within float32 rounding (tests/test_kernels.py), forward and gradients,
running statistics updated as MindSpore does.

The library is compiled on first use with the system C++ compiler (g++ -O3 -march=native -fopenmp, ~3 s) into
~/.cache/mindspore-classification/ keyed by the sources, the compiler and the CPU, and reused afterwards. Without
a compiler the net keeps MindSpore's kernels and one line says how to get the fast path. Export, evaluation-mode
BatchNorm and GPU/Ascend never use it. CLS_CPU_KERNELS=mindspore turns it off; CLS_CPU_KERNELS=depthwise,pooling
(any subset of KINDS) keeps only those.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import mindspore as ms
import mindspore.nn as nn
import mindspore.ops as ops

from src.models.common import GlobalAvgPooling

SOURCES = tuple(Path(__file__).with_name(name) for name in ("depthwise.cc", "batchnorm.cc", "pooling.cc"))
SWITCH = "CLS_CPU_KERNELS"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++14")


class KernelUnavailable(Exception):
    """The library could not be built; the message says why and how to fix it."""


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mindspore-classification" / "kernels"


def _cpu_signature() -> str:
    """-march=native code runs only on CPUs like this one: key the build on the CPU's model and flags."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        info = []
    wanted = [line for line in info if line.startswith(("model name", "flags"))][:2]
    return platform.machine() + "\n" + "\n".join(wanted)


def build_library() -> Path:
    """Path of the compiled library, compiling it once per source/compiler/CPU."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler or not shutil.which(compiler):
        raise KernelUnavailable("no C++ compiler found (install g++, e.g. `apt install g++`, or set CXX)")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelUnavailable(f"C++ compiler {compiler} does not run ({exc})") from None
    texts = [source.read_text() for source in SOURCES]
    key = hashlib.sha256("\0".join([*texts, version, " ".join(FLAGS), _cpu_signature()]).encode())
    target = _cache_dir() / f"kernels-{key.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
    except OSError as exc:
        raise KernelUnavailable(f"cannot write the kernel cache {target.parent} ({exc.strerror}; "
                                "set XDG_CACHE_HOME to a writable folder)") from None
    try:
        try:
            proc = subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", tmp], capture_output=True,
                                  text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as exc:
            raise KernelUnavailable(f"{compiler} did not finish building the kernels ({exc})") from None
        if proc.returncode != 0:
            first = next((line for line in proc.stderr.splitlines() if "error" in line), proc.stderr.strip()[:200])
            raise KernelUnavailable(f"{compiler} could not build the kernels: {first}")
        os.replace(tmp, target)  # atomic: parallel workers building at once all end with a complete file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _is_depthwise(cell: nn.Cell) -> bool:
    if not isinstance(cell, nn.Conv2d):
        return False
    k = cell.kernel_size
    return (cell.group > 1 and cell.group == cell.in_channels == cell.out_channels and k[0] == k[1]
            and k[0] % 2 == 1 and cell.stride in ((1, 1), (2, 2)) and cell.dilation == (1, 1)
            and cell.pad_mode == "pad" and cell.padding in ((k[0] - 1) // 2, ((k[0] - 1) // 2,) * 4)
            and cell.data_format == "NCHW")


def _output_shape(stride: int):
    def shape(x, w):
        k, p = w[2], (w[2] - 1) // 2
        return [x[0], x[1], (x[2] + 2 * p - k) // stride + 1, (x[3] + 2 * p - k) // stride + 1]
    return shape


def _depthwise_op(library: Path, stride: int) -> ops.Custom:
    """Conv2D-compatible primitive (x, weight) -> y with the C++ forward and a bprop made of the C++ gradients."""
    grad_x = ops.Custom(f"{library}:DepthwiseGradInputS{stride}", out_shape=lambda x, dy, w: x,
                        out_dtype=lambda x, dy, w: x, func_type="aot")
    grad_w = ops.Custom(f"{library}:DepthwiseGradWeightS{stride}", out_shape=lambda x, dy, w: w,
                        out_dtype=lambda x, dy, w: w, func_type="aot")

    def bprop(x, weight, out, dout):
        return grad_x(x, dout, weight), grad_w(x, dout, weight)

    return ops.Custom(f"{library}:DepthwiseForwardS{stride}", out_shape=_output_shape(stride),
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


KINDS = ("depthwise", "batchnorm", "pooling")
_MATCHES = {"depthwise": _is_depthwise, "batchnorm": _is_batchnorm, "pooling": _is_pooling}
_NAMES = {"depthwise": "depthwise convolutions", "batchnorm": "batch norms", "pooling": "average poolings"}


def fast_cpu_kernels(net: nn.Cell, kinds: tuple[str, ...] = KINDS) -> str | None:
    """Switch the depthwise convolutions, batch norms and global average poolings of `net` (float32, on CPU) to
    the C++ kernels, in place.

    Returns one line to log (how many layers, or why not), or None when the net has no such layer.
    """
    switch, ignored = os.environ.get(SWITCH, "").strip().lower(), ""
    if switch and switch != "mindspore":
        wanted = {kind.strip() for kind in switch.split(",")}
        if wanted <= set(KINDS):
            kinds = tuple(kind for kind in kinds if kind in wanted)
        else:
            ignored = f"; {SWITCH}={switch} ignored: use mindspore, or some of {','.join(KINDS)}"
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
        primitives = {stride: _depthwise_op(library, stride) for stride in (1, 2)}
        for cell in found["depthwise"]:
            cell.conv2d = primitives[cell.stride[0]]
    if found.get("batchnorm"):
        forward = _batchnorm_op(library)
        for cell in found["batchnorm"]:
            cell.bn_train = _BatchNormTrain(forward, cell.momentum, cell.eps)
    if found.get("pooling"):
        mean = _mean_op(library)
        for cell in found["pooling"]:
            cell.kernel = mean
    counts = ", ".join(f"{len(found.get(kind, []))} {_NAMES[kind]}" for kind in KINDS)
    return f"CPU: fast kernels for {counts} ({library.name}{ignored})"


def use_fast_kernels(net: nn.Cell, platform_name: str, amp_level: str) -> None:
    """fast_cpu_kernels on CPU at float32 (amp_level O0; the kernels are float32 only), logged once per process."""
    if platform_name != "CPU" or amp_level != "O0":
        return
    note = fast_cpu_kernels(net)
    if note and note not in _LOGGED:
        _LOGGED.add(note)
        logging.getLogger("train").info(note)


_LOGGED: set[str] = set()
