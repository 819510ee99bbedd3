"""The C++ depthwise convolution (src/kernels): same numbers as MindSpore's Conv2d, same parameters, clean fallback."""
from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from src import kernels
from src.models import create_model


class SquareLoss(nn.Cell):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def construct(self, x):
        y = self.net(x)
        return (y * y).sum()


def _forward_and_grads(conv: nn.Conv2d, x: ms.Tensor) -> list[np.ndarray]:
    loss, (dx, dparams) = ms.jit(ms.value_and_grad(SquareLoss(conv), 0, conv.trainable_params()))(x)
    return [conv(x).asnumpy(), loss.asnumpy(), dx.asnumpy(), *[g.asnumpy() for g in dparams]]


def _depthwise(channels, k, stride):
    return nn.Conv2d(channels, channels, k, stride, pad_mode="pad", padding=(k - 1) // 2, group=channels,
                     has_bias=True)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.delenv(kernels.SWITCH, raising=False)


@pytest.mark.parametrize("k,stride,size", [(3, 1, (8, 7)), (3, 2, (8, 7)), (3, 2, (7, 7)), (5, 1, (6, 9)),
                                           (5, 2, (9, 10))])
def test_forward_and_both_gradients_equal_mindspores(k, stride, size):
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.default_rng(k + 10 * stride)
    x = ms.Tensor(rng.standard_normal((3, 6, *size)).astype(np.float32))
    reference, fast = _depthwise(6, k, stride), _depthwise(6, k, stride)
    for a, b in zip(reference.get_parameters(), fast.get_parameters()):
        value = rng.standard_normal(a.shape).astype(np.float32)
        a.set_data(ms.Tensor(value))
        b.set_data(ms.Tensor(value))
    note = kernels.fast_depthwise(fast)
    assert note.startswith("CPU: fast depthwise convolution kernel for 1 layers"), note
    assert isinstance(fast.conv2d, ops.Custom) and isinstance(reference.conv2d, ops.Conv2D)
    want, got = _forward_and_grads(reference, x), _forward_and_grads(fast, x)
    assert got[0].shape == want[0].shape == (3, 6, (size[0] - 1) // stride + 1, (size[1] - 1) // stride + 1)
    for name, w, g in zip(["output", "loss", "d input", "d weight", "d bias"], want, got):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(np.abs(w).max()), err_msg=name)


def test_net_keeps_its_parameters_and_output():
    ms.set_context(mode=ms.GRAPH_MODE)
    net = create_model("mobilenetv2", 10, width=0.35).set_train(False)
    names = [p.name for p in net.get_parameters()]
    x = ms.Tensor(np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32))
    before = net(x).asnumpy()
    assert "for 17 layers" in kernels.fast_depthwise(net)
    assert [p.name for p in net.get_parameters()] == names  # checkpoints load and save as before
    np.testing.assert_allclose(net(x).asnumpy(), before, rtol=1e-4, atol=1e-5)


def test_library_is_built_once_and_reused():
    first = kernels.build_library()
    stamp = first.stat().st_mtime_ns
    assert kernels.build_library() == first and first.stat().st_mtime_ns == stamp


def test_without_a_compiler_the_net_keeps_mindspores_kernel(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    conv = _depthwise(4, 3, 1)
    note = kernels.fast_depthwise(conv)
    assert "the fast kernel is unavailable: no C++ compiler found (install g++" in note
    assert isinstance(conv.conv2d, ops.Conv2D)


def test_switch_off_and_non_depthwise_layers(monkeypatch):
    assert kernels.fast_depthwise(nn.Conv2d(4, 8, 3)) is None  # an ordinary conv: nothing to do, nothing said
    monkeypatch.setenv(kernels.SWITCH, "mindspore")
    conv = _depthwise(4, 3, 2)
    assert "CLS_DEPTHWISE_KERNEL=mindspore" in kernels.fast_depthwise(conv)
    assert isinstance(conv.conv2d, ops.Conv2D)


def test_only_cpu_float32_uses_it():
    conv = _depthwise(4, 3, 1)
    kernels.use_fast_kernels(conv, "GPU", "O0")
    kernels.use_fast_kernels(conv, "CPU", "O2")
    assert isinstance(conv.conv2d, ops.Conv2D)
    kernels.use_fast_kernels(conv, "CPU", "O0")
    assert isinstance(conv.conv2d, ops.Custom)


def test_a_failing_build_keeps_mindspores_kernel(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing built yet
    monkeypatch.setenv("CXX", "false")  # a "compiler" that exits 1
    conv = _depthwise(4, 3, 1)
    assert "the fast kernel is unavailable: false could not build depthwise.cc" in kernels.fast_depthwise(conv)
    assert isinstance(conv.conv2d, ops.Conv2D)
    assert not list(tmp_path.rglob("*.so"))  # no half-written library left behind
