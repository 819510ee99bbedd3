"""MobileNetV3 Large and Small (Howard et al., 2019, "Searching for MobileNetV3"), tables 1 and 2.

Layer for layer the torchvision model (same channel rounding, squeeze-excite width and classifier), so the
1000-class trainable parameter counts are equal: 5,483,032 (Large) and 2,542,856 (Small). Parameter names
follow mindcv's layout (`features.*`, `classifier.0.*`, `classifier.3.*`). The backbone ends with the
last 1x1 conv (960 / 576 channels); the head is pooling + Dense + h-swish + dropout + Dense, and only
the last Dense (`classifier.3.*`) depends on the number of classes, so --filter_head drops just that.
h-swish and the hard sigmoid run MindSpore's fused kernels; export switches them to relu6 formulas for ONNX.
"""
from __future__ import annotations

import math

import numpy as np
from mindspore import Tensor, nn

from src.models.common import (
    ClassifierNet,
    Dropout,
    DropPath,
    GlobalAvgPooling,
    HSigmoid,
    HSwish,
    conv2d,
    drop_path_rates,
    make_divisible,
)

# kernel, expanded channels, output channels, squeeze-excite, activation (RE = ReLU, HS = h-swish), stride
LARGE = ((3, 16, 16, False, "RE", 1), (3, 64, 24, False, "RE", 2), (3, 72, 24, False, "RE", 1),
         (5, 72, 40, True, "RE", 2), (5, 120, 40, True, "RE", 1), (5, 120, 40, True, "RE", 1),
         (3, 240, 80, False, "HS", 2), (3, 200, 80, False, "HS", 1), (3, 184, 80, False, "HS", 1),
         (3, 184, 80, False, "HS", 1), (3, 480, 112, True, "HS", 1), (3, 672, 112, True, "HS", 1),
         (5, 672, 160, True, "HS", 2), (5, 960, 160, True, "HS", 1), (5, 960, 160, True, "HS", 1))
SMALL = ((3, 16, 16, True, "RE", 2), (3, 72, 24, False, "RE", 2), (3, 88, 24, False, "RE", 1),
         (5, 96, 40, True, "HS", 2), (5, 240, 40, True, "HS", 1), (5, 240, 40, True, "HS", 1),
         (5, 120, 48, True, "HS", 1), (5, 144, 48, True, "HS", 1), (5, 288, 96, True, "HS", 2),
         (5, 576, 96, True, "HS", 1), (5, 576, 96, True, "HS", 1))
ARCHS = {"large": (LARGE, 1280), "small": (SMALL, 1024)}
BN_EPS = 1e-3  # as torchvision and the paper's TF reference (mindcv's is 1e-5: its checkpoints set bn_eps)


def _activation(kind: str) -> nn.Cell:
    return HSwish() if kind == "HS" else nn.ReLU()


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, bn_eps: float = BN_EPS,
             same: bool = False) -> list[nn.Cell]:
    return [conv2d(in_ch, out_ch, kernel, stride, groups, same), nn.BatchNorm2d(out_ch, eps=bn_eps)]


class SqueezeExcite(nn.Cell):
    """x * hard_sigmoid(expand(relu(reduce(mean(x))))), reduce to make_divisible(channels / 4)."""

    def __init__(self, channels: int):
        super().__init__()
        squeezed = make_divisible(channels // 4, 8)
        self.pool = GlobalAvgPooling(keep_dims=True)
        self.conv_reduce = nn.Conv2d(channels, squeezed, 1, has_bias=True)
        self.act_fn = nn.ReLU()
        self.conv_expand = nn.Conv2d(squeezed, channels, 1, has_bias=True)
        self.gate_fn = HSigmoid()

    def construct(self, x):
        scale = self.gate_fn(self.conv_expand(self.act_fn(self.conv_reduce(self.pool(x)))))
        return x * scale


class Bottleneck(nn.Cell):
    """Expand (1x1) -> depthwise (k x k) -> squeeze-excite -> project (1x1, linear), residual when shapes allow."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, kernel: int, stride: int, act: str, use_se: bool,
                 bn_eps: float = BN_EPS, same: bool = False, drop_path: DropPath | None = None):
        super().__init__()
        self.use_res_connect = stride == 1 and in_ch == out_ch
        self.drop_path = drop_path if self.use_res_connect else None
        layers = _conv_bn(in_ch, mid_ch, 1, bn_eps=bn_eps) + [_activation(act)] if mid_ch != in_ch else []
        layers += _conv_bn(mid_ch, mid_ch, kernel, stride, mid_ch, bn_eps, same) + [_activation(act)]
        if use_se:
            layers.append(SqueezeExcite(mid_ch))
        layers += _conv_bn(mid_ch, out_ch, 1, bn_eps=bn_eps)
        self.layers = nn.SequentialCell(layers)

    def construct(self, x):
        if self.use_res_connect:
            if self.drop_path is not None:
                return x + self.drop_path(self.layers(x))
            return x + self.layers(x)
        return self.layers(x)


class MobileNetV3Backbone(nn.Cell):
    def __init__(self, arch: str, width: float = 1.0, bn_eps: float = BN_EPS, same: bool = False,
                 drop_path_rate: float = 0.0):
        super().__init__()
        settings, _ = ARCHS[arch]
        channels = make_divisible(16 * width)
        features = _conv_bn(3, channels, 3, stride=2, bn_eps=bn_eps) + [HSwish()]
        rates = drop_path_rates(drop_path_rate, len(settings) + 1)  # timm counts the last 1x1 conv as a block
        for i, (kernel, expanded, out, use_se, act, stride) in enumerate(settings):
            mid, out = make_divisible(expanded * width), make_divisible(out * width)
            drop = DropPath(rates[i], i) if rates[i] > 0 else None
            features.append(Bottleneck(channels, mid, out, kernel, stride, act, use_se, bn_eps, same, drop))
            channels = out
        self.out_channels = 6 * channels
        features += _conv_bn(channels, self.out_channels, 1, bn_eps=bn_eps) + [HSwish()]
        self.features = nn.SequentialCell(features)
        self._init_weights()

    def _init_weights(self) -> None:
        """Kaiming normal (fan-out) for convs, zero biases; BatchNorm starts at gamma 1, beta 0. numpy's global
        generator draws the weights, so --seed (device.set_seed) fixes them."""
        for _, cell in self.cells_and_names():
            if isinstance(cell, nn.Conv2d):
                shape = cell.weight.shape
                fan_out = shape[0] * shape[2] * shape[3]
                cell.weight.set_data(Tensor(np.random.normal(0, math.sqrt(2.0 / fan_out), shape).astype(np.float32)))
                if cell.has_bias:
                    cell.bias.set_data(Tensor(np.zeros(cell.bias.shape, np.float32)))

    def construct(self, x):
        return self.features(x)


class MobileNetV3Head(nn.Cell):
    def __init__(self, in_channels: int, last_channels: int, num_classes: int, dropout: float):
        super().__init__()
        self.pool_cell = GlobalAvgPooling()
        dense1, dense2 = nn.Dense(in_channels, last_channels), nn.Dense(last_channels, num_classes)
        for dense in (dense1, dense2):
            dense.weight.set_data(Tensor(np.random.normal(0, 0.01, dense.weight.shape).astype(np.float32)))
            dense.bias.set_data(Tensor(np.zeros(dense.bias.shape, np.float32)))
        drop = Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.SequentialCell([dense1, HSwish(), drop, dense2])

    def pool(self, x):
        return self.pool_cell(x)

    def classify(self, x):
        return self.classifier(x)

    def construct(self, x):
        return self.classify(self.pool(x))


def _mobilenetv3(arch: str, num_classes: int, width: float, dropout: float, bn_eps: float | None,
                 padding: str, drop_path_rate: float) -> ClassifierNet:
    """`padding` "mindcv": the depthwise convolutions pad by MindSpore's "same" rule, as mindcv's."""
    backbone = MobileNetV3Backbone(arch, width, BN_EPS if bn_eps is None else bn_eps, padding == "mindcv",
                                   drop_path_rate)
    last = make_divisible(ARCHS[arch][1] * width)
    head = MobileNetV3Head(backbone.out_channels, last, num_classes, dropout)
    return ClassifierNet(backbone, head, head_prefixes=("classifier.3.",))


def mobilenetv3_large(num_classes: int = 1000, width: float = 1.0, dropout: float = 0.2, bn_eps: float | None = None,
                      padding: str = "symmetric", drop_path_rate: float = 0.0) -> ClassifierNet:
    return _mobilenetv3("large", num_classes, width, dropout, bn_eps, padding, drop_path_rate)


def mobilenetv3_small(num_classes: int = 1000, width: float = 1.0, dropout: float = 0.2, bn_eps: float | None = None,
                      padding: str = "symmetric", drop_path_rate: float = 0.0) -> ClassifierNet:
    return _mobilenetv3("small", num_classes, width, dropout, bn_eps, padding, drop_path_rate)
