"""A fast CPU depthwise convolution for training: C++ loops run by MindSpore as ops.Custom AOT operators.

MindSpore 2.10 runs grouped convolutions on CPU through oneDNN's im2col + GEMM per group on plain NCHW tensors;
in MobileNetV2/V3 training those layers take about half of every step (docs/performance.md). `fast_depthwise`
points the depthwise nn.Conv2d layers of a net at depthwise.cc instead: same Parameters and names (checkpoints
are unchanged), same numbers within float32 rounding (tests/test_kernels.py), forward and both gradients.

The library is compiled on first use with the system C++ compiler (g++ -O3 -march=native -fopenmp, ~2 s) into
~/.cache/mindspore-classification/ keyed by the source, the compiler and the CPU, and reused afterwards. Without a
compiler the net keeps MindSpore's kernels and one line says how to get the fast path. Export and GPU/Ascend
never use it. Set CLS_DEPTHWISE_KERNEL=mindspore to turn it off.
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

import mindspore.nn as nn
import mindspore.ops as ops

SOURCE = Path(__file__).with_name("depthwise.cc")
SWITCH = "CLS_DEPTHWISE_KERNEL"
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
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, " ".join(FLAGS), _cpu_signature()]).encode())
    target = _cache_dir() / f"depthwise-{key.hexdigest()[:16]}.so"
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
            proc = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True,
                                  timeout=300)
        except (OSError, subprocess.SubprocessError) as exc:
            raise KernelUnavailable(f"{compiler} did not finish building {SOURCE.name} ({exc})") from None
        if proc.returncode != 0:
            first = next((line for line in proc.stderr.splitlines() if "error" in line), proc.stderr.strip()[:200])
            raise KernelUnavailable(f"{compiler} could not build {SOURCE.name}: {first}")
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


def fast_depthwise(net: nn.Cell) -> str | None:
    """Switch the depthwise convolutions of `net` (float32, on CPU) to the C++ kernel, in place.

    Returns one line to log (how many layers, or why not), or None when the net has no depthwise layer.
    """
    layers = [cell for _, cell in net.cells_and_names() if _is_depthwise(cell)]
    if not layers:
        return None
    if os.environ.get(SWITCH, "").lower() == "mindspore":
        return f"CPU: MindSpore's depthwise convolution kernel ({SWITCH}=mindspore)"
    try:
        library = build_library()
    except KernelUnavailable as exc:
        return (f"CPU: MindSpore's own depthwise convolutions (slow on CPU; the fast kernel is unavailable: {exc})")
    primitives = {stride: _depthwise_op(library, stride) for stride in (1, 2)}
    for cell in layers:
        cell.conv2d = primitives[cell.stride[0]]
    return f"CPU: fast depthwise convolution kernel for {len(layers)} layers ({library.name})"


def use_fast_kernels(net: nn.Cell, platform_name: str, amp_level: str) -> None:
    """fast_depthwise on CPU at float32 (amp_level O0; the kernel is float32 only), logged once per process."""
    if platform_name != "CPU" or amp_level != "O0":
        return
    note = fast_depthwise(net)
    if note and note not in _LOGGED:
        _LOGGED.add(note)
        logging.getLogger("train").info(note)


_LOGGED: set[str] = set()
