"""Pieces shared by the nets: channel rounding, backbone + head, global average pooling and seeded dropout."""
from __future__ import annotations

import os

from mindspore import nn, ops


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of `divisor`, never going more than 10% below `value` (the MobileNets' rule)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


def conv2d(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, same: bool = False,
           **kwargs) -> nn.Conv2d:
    """A convolution padded by (kernel - 1) / 2 on each side (torchvision), or by MindSpore's (and TensorFlow's)
    "same" rule: for stride 2 on an even size the smaller half of the padding goes first (mindcv's MobileNetV3
    depthwise convolutions, the ModelZoo's ResNets)."""
    if same:
        return nn.Conv2d(in_ch, out_ch, kernel, stride, pad_mode="same", group=groups, **kwargs)
    return nn.Conv2d(in_ch, out_ch, kernel, stride, pad_mode="pad", padding=(kernel - 1) // 2, group=groups, **kwargs)


class Dropout(nn.Cell):
    """Inverted dropout whose draws are fixed by the run's seed: the mask is `uniform >= p`, kept values scaled by
    1 / (1 - p), in training only (an identity in eval and export).

    Not nn.Dropout: on CPU, MindSpore 2.10's Dropout kernel gives other masks in each process for the same seeds
    once its threads wait passively (OMP_WAIT_POLICY=PASSIVE, which src/device.py sets): two `--seed 1` runs
    trained to other accuracies. A UniformReal draw seeded from the global seed repeats exactly.
    """

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability {p} is outside [0, 1)")
        import mindspore as ms

        self.keep = 1.0 - p
        # each rank of a data-parallel job its own masks (timm seeds each rank with seed + rank); rank 0 as one device
        self.uniform = ops.UniformReal(seed=ms.get_seed() or _SEED_WHEN_UNSET, seed2=1 + _rank())

    def construct(self, x):
        if not self.training:
            return x
        mask = self.uniform(x.shape) < self.keep
        return x * mask.astype(x.dtype) / self.keep


class DropPath(nn.Cell):
    """Stochastic depth (timm's drop_path): in training each sample's residual branch is zeroed with probability
    `rate` and the kept ones scaled by 1 / (1 - rate); an identity in eval and export. `index` (the block's place in
    the net) gives each block its own seeded draws, so blocks do not drop the same samples together."""

    def __init__(self, rate: float, index: int):
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop path rate {rate} is outside [0, 1)")
        import mindspore as ms

        self.keep = 1.0 - rate
        self.uniform = ops.UniformReal(seed=ms.get_seed() or _SEED_WHEN_UNSET, seed2=1 + _rank() + 65536 * (index + 1))

    def construct(self, x):
        if not self.training or self.keep == 1.0:
            return x
        mask = self.uniform((x.shape[0],) + (1,) * (x.ndim - 1)) < self.keep
        return x * mask.astype(x.dtype) / self.keep


def drop_path_rates(rate: float, blocks: int, timm_resnet: bool = False) -> list[float]:
    """Each block's rate, rising linearly with depth as timm's: block i of n gets rate * i / n (its EfficientNet
    builder: MobileNetV2/V3), or rate * i / (n - 1) (its ResNet)."""
    last = max(blocks - 1, 1) if timm_resnet else blocks
    return [rate * i / last for i in range(blocks)]


def _rank() -> int:
    """This process's rank as the launchers export it (msrun and scripts/run_train.sh set RANK_ID); 0 alone."""
    value = os.environ.get("RANK_ID", "0").strip()
    return int(value) if value.isdigit() else 0


_SEED_WHEN_UNSET = 87654321  # MindSpore's own graph seed when no global seed is set (a fixed draw, as nn.Dropout's)


class GlobalAvgPooling(nn.Cell):
    """N x C x H x W -> N x C (N x C x 1 x 1 with keep_dims).

    `kernel`, when set, is a primitive computing the N x C x 1 x 1 mean (src/models/kernels sets a C++ one on CPU).
    """

    def __init__(self, keep_dims: bool = False):
        super().__init__()
        self.keep_dims = keep_dims
        self.kernel = None

    def construct(self, x):
        if self.kernel is None:
            return ops.mean(x, (2, 3), keep_dims=self.keep_dims)
        y = self.kernel(x)
        if self.keep_dims:
            return y
        return y.reshape(y.shape[0], y.shape[1])


class ClassifierNet(nn.Cell):
    """Backbone and head side by side without a name prefix, so a full checkpoint loads into the backbone.

    The head has `pool(feature_map) -> N x C` and `classify(pooled) -> logits`. `head_prefixes` name
    the classifier's parameters (dropped by --filter_head).
    """

    def __init__(self, backbone: nn.Cell, head: nn.Cell, head_prefixes: tuple[str, ...]):
        super().__init__(auto_prefix=False)
        self.backbone = backbone
        self.head = head
        self.head_prefixes = head_prefixes

    def construct(self, x):
        return self.head(self.backbone(x))


class PooledFeatures(nn.Cell):
    """Backbone + pooling: the features a frozen-backbone run caches."""

    def __init__(self, net: ClassifierNet):
        super().__init__(auto_prefix=False)
        self.net = net

    def construct(self, x):
        return self.net.head.pool(self.net.backbone(x))


class HeadOnFeatures(nn.Cell):
    """The classifier alone, on pooled features; parameter names stay those of the full net."""

    def __init__(self, net: ClassifierNet):
        super().__init__(auto_prefix=False)
        self.head = net.head

    def construct(self, x):
        return self.head.classify(x)


class HSwish(nn.Cell):
    """h-swish: MindSpore's fused kernel, or x * relu6(x + 3) / 6 for ONNX (MindSpore 2.10 cannot export HSwish)."""

    def __init__(self):
        super().__init__()
        self.exportable = False

    def construct(self, x):
        if self.exportable:
            return x * ops.relu6(x + 3.0) * (1.0 / 6.0)
        return ops.hardswish(x)


class HSigmoid(nn.Cell):
    """Hard sigmoid: MindSpore's fused kernel, or relu6(x + 3) / 6 for ONNX."""

    def __init__(self):
        super().__init__()
        self.exportable = False

    def construct(self, x):
        if self.exportable:
            return ops.relu6(x + 3.0) * (1.0 / 6.0)
        return ops.hardsigmoid(x)


def onnx_exportable(net: nn.Cell) -> nn.Cell:
    """Switch the net's h-swish / hard-sigmoid cells to the formulas every ONNX exporter knows (same values)."""
    for _, cell in net.cells_and_names():
        if isinstance(cell, (HSwish, HSigmoid)):
            cell.exportable = True
    return net
