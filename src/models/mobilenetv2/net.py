"""MobileNetV2 (Sandler et al., 2018) with the MindSpore ModelZoo's parameter names.

Backbone names `features.*`, head names `head.1.*`, so ModelZoo checkpoints load by name.
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
    conv2d,
    drop_path_rates,
    make_divisible,
)

# expansion t, output channels c, repeats n, first stride s
INVERTED_RESIDUAL_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                             (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
BN_EPS = 1e-5  # as torchvision, mindcv and the ModelZoo


class ConvBNReLU(nn.Cell):
    def __init__(self, in_planes: int, out_planes: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 bn_eps: float = BN_EPS):
        super().__init__()
        conv = conv2d(in_planes, out_planes, kernel_size, stride, groups)
        self.features = nn.SequentialCell([conv, nn.BatchNorm2d(out_planes, eps=bn_eps), nn.ReLU6()])

    def construct(self, x):
        return self.features(x)


class InvertedResidual(nn.Cell):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int, bn_eps: float = BN_EPS,
                 drop_path: DropPath | None = None):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        self.drop_path = drop_path if self.use_res_connect else None
        layers = [ConvBNReLU(inp, hidden, kernel_size=1, bn_eps=bn_eps)] if expand_ratio != 1 else []
        layers += [ConvBNReLU(hidden, hidden, stride=stride, groups=hidden, bn_eps=bn_eps),
                   nn.Conv2d(hidden, oup, kernel_size=1, stride=1), nn.BatchNorm2d(oup, eps=bn_eps)]
        self.conv = nn.SequentialCell(layers)

    def construct(self, x):
        if self.use_res_connect:
            if self.drop_path is not None:
                return x + self.drop_path(self.conv(x))
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2Backbone(nn.Cell):
    def __init__(self, width: float = 1.0, round_nearest: int = 8, bn_eps: float = BN_EPS, drop_path_rate: float = 0.0):
        super().__init__()
        channels = make_divisible(32 * width, round_nearest)
        self.out_channels = make_divisible(1280 * max(1.0, width), round_nearest)
        features = [ConvBNReLU(3, channels, stride=2, bn_eps=bn_eps)]
        rates = iter(enumerate(drop_path_rates(drop_path_rate, sum(n for _, _, n, _ in INVERTED_RESIDUAL_SETTING))))
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            out = make_divisible(c * width, round_nearest)
            for i in range(n):
                index, rate = next(rates)
                drop = DropPath(rate, index) if rate > 0 else None
                features.append(InvertedResidual(channels, out, s if i == 0 else 1, t, bn_eps, drop))
                channels = out
        features.append(ConvBNReLU(channels, self.out_channels, kernel_size=1, bn_eps=bn_eps))
        self.features = nn.SequentialCell(features)
        self._init_weights()

    def _init_weights(self) -> None:
        for _, cell in self.cells_and_names():
            if isinstance(cell, nn.Conv2d):
                k = cell.kernel_size[0] * cell.kernel_size[1] * cell.out_channels
                shape = cell.weight.shape
                cell.weight.set_data(Tensor(np.random.normal(0, math.sqrt(2.0 / k), shape).astype(np.float32)))

    def construct(self, x):
        return self.features(x)


class MobileNetV2Head(nn.Cell):
    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        dense = nn.Dense(in_channels, num_classes, has_bias=True)
        dense.weight.set_data(Tensor(np.random.normal(0, 0.01, dense.weight.shape).astype(np.float32)))
        self.head = nn.SequentialCell([GlobalAvgPooling(), dense])
        self.dropout = Dropout(dropout) if dropout > 0 else None

    def pool(self, x):
        return self.head[0](x)

    def classify(self, x):
        """Logits from pooled features (N x C), used directly when training on cached features."""
        if self.dropout is not None:
            x = self.dropout(x)
        return self.head[1](x)

    def construct(self, x):
        return self.classify(self.pool(x))


def mobilenetv2(num_classes: int = 1000, width: float = 1.0, dropout: float = 0.0, bn_eps: float | None = None,
                padding: str = "symmetric", drop_path_rate: float = 0.0) -> ClassifierNet:
    """`padding` changes nothing here: every source pads MobileNetV2 symmetrically."""
    backbone = MobileNetV2Backbone(width, bn_eps=BN_EPS if bn_eps is None else bn_eps, drop_path_rate=drop_path_rate)
    head = MobileNetV2Head(backbone.out_channels, num_classes, dropout)
    return ClassifierNet(backbone, head, head_prefixes=("head.",))
