"""The C++ CPU kernels (src/models/kernels): same numbers as MindSpore's Conv2d and BatchNorm, same parameters, clean
fallback."""
from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from src.models import create_model, kernels
from src.models.common import GlobalAvgPooling
from src.models.resnet.net import StemMaxPool


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


def _depthwise(channels, k, stride, pad_mode="pad"):
    if pad_mode == "same":  # MindSpore's rule (mindcv's MobileNetV3): the smaller half of the padding first
        return nn.Conv2d(channels, channels, k, stride, pad_mode="same", group=channels, has_bias=True)
    return nn.Conv2d(channels, channels, k, stride, pad_mode="pad", padding=(k - 1) // 2, group=channels,
                     has_bias=True)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.delenv(kernels.SWITCH, raising=False)


@pytest.mark.parametrize("k,stride,size,pad_mode", [(3, 1, (8, 7), "pad"), (3, 2, (8, 7), "pad"), (3, 2, (7, 7), "pad"),
                                                    (5, 1, (6, 9), "pad"), (5, 2, (9, 10), "pad"),
                                                    (3, 2, (8, 7), "same"), (5, 2, (10, 9), "same"),
                                                    (5, 1, (6, 9), "same")])
def test_forward_and_both_gradients_equal_mindspores(k, stride, size, pad_mode):
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.default_rng(k + 10 * stride)
    x = ms.Tensor(rng.standard_normal((3, 6, *size)).astype(np.float32))
    reference, fast = _depthwise(6, k, stride, pad_mode), _depthwise(6, k, stride, pad_mode)
    for a, b in zip(reference.get_parameters(), fast.get_parameters()):
        value = rng.standard_normal(a.shape).astype(np.float32)
        a.set_data(ms.Tensor(value))
        b.set_data(ms.Tensor(value))
    note = kernels.fast_cpu_kernels(fast)
    assert note.startswith("CPU: fast kernels for 1 depthwise convolutions, 0 batch norms, 0 average poolings"), note
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
    assert "for 17 depthwise convolutions, 52 batch norms, 1 average poolings" in kernels.fast_cpu_kernels(net)
    assert [p.name for p in net.get_parameters()] == names  # checkpoints load and save as before
    np.testing.assert_allclose(net(x).asnumpy(), before, rtol=1e-4, atol=1e-5)


def test_library_is_built_once_and_reused():
    first = kernels.build_library()
    stamp = first.stat().st_mtime_ns
    assert kernels.build_library() == first and first.stat().st_mtime_ns == stamp


def test_without_a_compiler_the_net_keeps_mindspores_kernel(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    conv = _depthwise(4, 3, 1)
    note = kernels.fast_cpu_kernels(conv)
    assert "the fast kernels are unavailable: no C++ compiler found (install g++" in note
    assert isinstance(conv.conv2d, ops.Conv2D)


def test_switch_off_and_non_depthwise_layers(monkeypatch):
    assert kernels.fast_cpu_kernels(nn.Conv2d(4, 8, 3)) is None  # an ordinary conv: nothing to do, nothing said
    monkeypatch.setenv(kernels.SWITCH, "mindspore")
    conv = _depthwise(4, 3, 2)
    assert "CLS_CPU_KERNELS=mindspore" in kernels.fast_cpu_kernels(conv)
    assert isinstance(conv.conv2d, ops.Conv2D)
    monkeypatch.setenv(kernels.SWITCH, "batchnorm")  # only the batch norm kernel
    layers = nn.SequentialCell([_depthwise(4, 3, 1), nn.BatchNorm2d(4)])
    assert "for 0 depthwise convolutions, 1 batch norms, 0 average poolings" in kernels.fast_cpu_kernels(layers)
    assert isinstance(layers[0].conv2d, ops.Conv2D) and not isinstance(layers[1].bn_train, ops.BatchNorm)
    monkeypatch.setenv(kernels.SWITCH, "fast")  # a typo: said, and the default (every kernel) applies
    conv = _depthwise(4, 3, 1)
    note = kernels.fast_cpu_kernels(conv)
    assert "CLS_CPU_KERNELS=fast ignored: use mindspore, or some of depthwise,batchnorm,pooling,maxpool" in note
    assert isinstance(conv.conv2d, ops.Custom)


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
    assert "the fast kernels are unavailable: false could not build the kernels" in kernels.fast_cpu_kernels(conv)
    assert isinstance(conv.conv2d, ops.Conv2D)
    assert not list(tmp_path.rglob("*.so"))  # no half-written library left behind


class WeightedSum(nn.Cell):
    def __init__(self, net, weights):
        super().__init__()
        self.net = net
        self.weights = weights

    def construct(self, x):
        return (self.net(x) * self.weights).sum()


@pytest.mark.parametrize("shape", [(4, 6, 5, 7), (1, 3, 2, 2), (8, 16, 1, 1)])
def test_batchnorm_training_equals_mindspores(shape):
    """Output, every gradient and the running statistics (unbiased variance, momentum) match nn.BatchNorm2d."""
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.default_rng(sum(shape))
    x = ms.Tensor((rng.standard_normal(shape) * 3 + 2).astype(np.float32))
    weights = ms.Tensor(rng.standard_normal(shape).astype(np.float32))
    results, names = [], []
    for fast in (False, True):
        bn = nn.BatchNorm2d(shape[1], eps=1e-3, momentum=0.8).set_train(True)
        bn.gamma.set_data(ms.Tensor(np.linspace(0.5, 1.5, shape[1]).astype(np.float32)))
        bn.beta.set_data(ms.Tensor(np.linspace(-1, 1, shape[1]).astype(np.float32)))
        if fast:
            assert ", 1 batch norms," in kernels.fast_cpu_kernels(bn)
        loss, (dx, (dgamma, dbeta)) = ms.jit(ms.value_and_grad(WeightedSum(bn, weights), 0, bn.trainable_params()))(x)
        results.append([loss.asnumpy(), dx.asnumpy(), dgamma.asnumpy(), dbeta.asnumpy(), bn.moving_mean.asnumpy(),
                        bn.moving_variance.asnumpy(), bn(x).asnumpy()])
        names.append([p.name for p in bn.get_parameters()])
    assert names[0] == names[1]  # checkpoints are unchanged
    for name, want, got in zip(["loss", "d input", "d gamma", "d beta", "running mean", "running variance", "output"],
                               *results):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(want).max())),
                                   err_msg=name)
    # one forward pass moves the running statistics as the formula says: 0.8 * old + 0.2 * batch (unbiased var)
    bn = nn.BatchNorm2d(shape[1], eps=1e-3, momentum=0.8).set_train(True)
    kernels.fast_cpu_kernels(bn)
    bn(x)
    values = x.asnumpy().transpose(1, 0, 2, 3).reshape(shape[1], -1)
    np.testing.assert_allclose(bn.moving_mean.asnumpy(), 0.2 * values.mean(1), rtol=1e-5, atol=1e-6)
    if values.shape[1] > 1:
        np.testing.assert_allclose(bn.moving_variance.asnumpy(), 0.8 + 0.2 * values.var(1, ddof=1), rtol=1e-5)


class SmallNet(nn.Cell):
    """conv-BN-ReLU6, depthwise stride 2-BN-ReLU6, 1x1-BN-ReLU, pool, dense: both kernels, well conditioned.

    (A whole MobileNetV2 on 32 px images is not: its last BatchNorms see 1x1 maps of a few images, and a 1e-7
    relative change of the input moves its third SGD loss by 20%, with MindSpore's kernels alone.)"""

    def __init__(self):
        super().__init__()
        self.features = nn.SequentialCell([
            nn.Conv2d(3, 8, 3, pad_mode="pad", padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
            _depthwise(8, 3, 2), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU()])
        self.head = nn.Dense(16, 10)

    def construct(self, x):
        return self.head(self.features(x).mean((2, 3)))


def test_training_steps_are_unchanged():
    """Three momentum-SGD steps with the kernels end at MindSpore's losses, weights and running statistics."""
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.default_rng(3)
    x = ms.Tensor(rng.standard_normal((8, 3, 16, 16)).astype(np.float32))
    y = ms.Tensor(rng.integers(0, 10, 8).astype(np.int32))
    ms.set_seed(1)
    start = {p.name: p.asnumpy() for p in SmallNet().get_parameters()}
    finals, losses = [], []
    for fast in (False, True):
        net = SmallNet()
        ms.load_param_into_net(net, {k: ms.Parameter(v, k) for k, v in start.items()})
        if fast:
            assert "for 1 depthwise convolutions, 3 batch norms, 0 average poolings" in kernels.fast_cpu_kernels(net)
        loss_net = nn.WithLossCell(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"))
        step = nn.TrainOneStepCell(loss_net, nn.Momentum(net.trainable_params(), 0.1, 0.9)).set_train(True)
        losses.append([float(step(x, y).asnumpy()) for _ in range(3)])
        finals.append({p.name: p.asnumpy() for p in net.get_parameters()})
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    assert losses[0][2] < losses[0][0] - 0.05  # it did train
    assert finals[0].keys() == finals[1].keys() == start.keys()
    for name in start:
        assert not np.array_equal(finals[0][name], start[name]), name  # every parameter moved, running stats too
        np.testing.assert_allclose(finals[1][name], finals[0][name], rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("keep_dims,shape", [(True, (3, 5, 7, 6)), (False, (2, 4, 1, 1)), (True, (2, 3, 56, 56))])
def test_average_pooling_equals_mindspores(keep_dims, shape):
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.default_rng(shape[2])
    x = ms.Tensor(rng.standard_normal(shape).astype(np.float32))
    reference, fast = GlobalAvgPooling(keep_dims), GlobalAvgPooling(keep_dims)
    assert "0 batch norms, 1 average poolings" in kernels.fast_cpu_kernels(fast)
    want, got = _forward_and_grads(reference, x), _forward_and_grads(fast, x)
    assert got[0].shape == want[0].shape == ((shape[0], shape[1], 1, 1) if keep_dims else shape[:2])
    for name, w, g in zip(["output", "loss", "d input"], want, got):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("model,batch,padding,expected", [
    # MobileNetV3's squeeze-excite blocks use the average-pooling kernel: 9 SE + the head
    ("mobilenetv3_small", 2, "symmetric", "for 11 depthwise convolutions, 34 batch norms, 10 average poolings"),
    # mindcv's weights: the strided depthwise convolutions pad "same", and keep their kernel
    ("mobilenetv3_small", 2, "mindcv", "for 11 depthwise convolutions, 34 batch norms, 10 average poolings"),
    # ResNet's stem uses the max-pooling kernel, with mindcv's "same" padding too
    ("resnet50", 1, "symmetric", "for 0 depthwise convolutions, 53 batch norms, 1 average poolings, 1 max poolings"),
    ("resnet50", 1, "mindcv", "for 0 depthwise convolutions, 53 batch norms, 1 average poolings, 1 max poolings")])
def test_a_net_uses_its_kernels_and_keeps_its_output(model, batch, padding, expected):
    ms.set_context(mode=ms.GRAPH_MODE)
    net = create_model(model, 10, padding=padding).set_train(False)
    x = ms.Tensor(np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32))
    before = net(x).asnumpy()
    note = kernels.fast_cpu_kernels(net)
    assert expected in note, note
    np.testing.assert_allclose(net(x).asnumpy(), before, rtol=1e-4, atol=1e-5)


class _ReluThenPool(nn.Cell):
    """ResNet's stem: ReLU (so many inputs are exactly 0, like the zero border) then the 3 x 3 / 2 max pooling."""

    def __init__(self, same: bool = False):
        super().__init__()
        self.relu, self.pool = nn.ReLU(), StemMaxPool(same)

    def construct(self, x):
        return self.pool(self.relu(x))


@pytest.mark.parametrize("shape,same", [((2, 3, 8, 8), False), ((1, 2, 7, 9), False), ((2, 4, 1, 1), False),
                                        ((2, 3, 56, 56), False), ((2, 3, 8, 8), True), ((1, 2, 7, 10), True),
                                        ((2, 3, 56, 56), True)])
def test_stem_max_pooling_equals_mindspores(shape, same):
    """Symmetric (torchvision) and MindSpore's "same" padding (mindcv's and the ModelZoo's ResNets)."""
    ms.set_context(mode=ms.GRAPH_MODE)
    x = ms.Tensor(np.random.default_rng(shape[3]).standard_normal(shape).astype(np.float32))
    reference, fast = _ReluThenPool(same), _ReluThenPool(same)
    assert "1 average poolings" not in kernels.fast_cpu_kernels(fast)
    assert fast.pool.kernel is not None and reference.pool.kernel is None
    want, got = _forward_and_grads(reference, x), _forward_and_grads(fast, x)
    assert got[0].shape == want[0].shape == (shape[0], shape[1], (shape[2] + 1) // 2, (shape[3] + 1) // 2)
    for name, w, g in zip(["output", "loss", "d input"], want, got):
        np.testing.assert_array_equal(g, w, err_msg=name)  # a max and a routed gradient: exact


def test_the_optimizer_kernels_follow_the_switch(monkeypatch):
    """optim.cc's updates run unless CLS_CPU_KERNELS says mindspore or lists kernels without "optim"."""
    from src.models.kernels.cpu import optimizer_kernels

    monkeypatch.delenv(kernels.SWITCH, raising=False)
    assert sorted(optimizer_kernels()) == ["adam", "rmsprop"]
    for switch, on in (("mindspore", False), ("depthwise,batchnorm", False), ("depthwise, optim", True)):
        monkeypatch.setenv(kernels.SWITCH, switch)
        assert (optimizer_kernels() is not None) == on, switch
    monkeypatch.setenv(kernels.SWITCH, "optim")
    assert "ignored" not in (kernels.fast_cpu_kernels(_depthwise(4, 3, 1)) or "")
