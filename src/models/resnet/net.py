"""ResNet-50/101 (He et al., 2016; stride on the 3x3 conv as in torchvision) with ModelZoo parameter names.

Backbone: conv1, bn1, layer1..layer4; head: end_point (the ModelZoo's name for the classifier).
The last BatchNorm of each block starts at zero (identity residuals), as in the ModelZoo.
"""
from __future__ import annotations

from mindspore import nn
from mindspore.common.initializer import HeNormal

from src.models.common import ClassifierNet, Dropout, DropPath, GlobalAvgPooling, conv2d, drop_path_rates


def _conv(cin: int, cout: int, k: int, stride: int = 1, same: bool = False) -> nn.Conv2d:
    return conv2d(cin, cout, k, stride, same=same, weight_init=HeNormal(mode="fan_out", nonlinearity="relu"))


BN_EPS = 1e-5  # as torchvision, mindcv and the ModelZoo


def _bn(channels: int, last: bool = False, eps: float = BN_EPS) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=eps, momentum=0.9, gamma_init="zeros" if last else "ones")


class ResidualBlock(nn.Cell):
    expansion = 4

    def __init__(self, in_channel: int, out_channel: int, stride: int = 1, bn_eps: float = BN_EPS, same: bool = False,
                 drop_path: DropPath | None = None):
        super().__init__()
        self.drop_path = drop_path
        channel = out_channel // self.expansion
        self.conv1, self.bn1 = _conv(in_channel, channel, 1), _bn(channel, eps=bn_eps)
        self.conv2, self.bn2 = _conv(channel, channel, 3, stride, same), _bn(channel, eps=bn_eps)
        self.conv3, self.bn3 = _conv(channel, out_channel, 1), _bn(out_channel, last=True, eps=bn_eps)
        self.relu = nn.ReLU()
        self.down_sample = stride != 1 or in_channel != out_channel
        self.down_sample_layer = (nn.SequentialCell([_conv(in_channel, out_channel, 1, stride),
                                                     _bn(out_channel, eps=bn_eps)])
                                  if self.down_sample else None)

    def construct(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.drop_path is not None:  # timm's ResNet drops the branch of every block, downsampling ones too
            out = self.drop_path(out)
        if self.down_sample:
            identity = self.down_sample_layer(x)
        return self.relu(out + identity)


class StemMaxPool(nn.Cell):
    """3 x 3 max pooling, stride 2, over a zero border of 1 (torchvision pads with -inf: the same here, as the input
    is post-ReLU, >= 0). Written as Pad + valid MaxPool2d because MaxPool2d(pad_mode="pad") does not export to ONNX.

    `same`: pad by MindSpore's "same" rule instead (mindcv's and the ModelZoo's ResNets): on an even size, none
    before and one row and column after.

    `kernel`, when set, is a primitive x -> (y, argmax) doing the symmetric pooling in one pass (src/models/kernels
    sets a C++ one on CPU: MindSpore's Pad and MaxPool kernels take ~1 s of every ResNet-50 training step at batch 32).
    """

    def __init__(self, same: bool = False):
        super().__init__()
        self.same = same
        self.pad = nn.Pad(((0, 0), (0, 0), (1, 1), (1, 1)))
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, pad_mode="same" if self.same else "valid")
        self.kernel = None

    def construct(self, x):
        if self.kernel is not None:
            return self.kernel(x)[0]
        if self.same:
            return self.pool(x)
        return self.pool(self.pad(x))


class ResNetBackbone(nn.Cell):
    def __init__(self, layer_nums: tuple[int, int, int, int], bn_eps: float = BN_EPS, padding: str = "symmetric",
                 drop_path_rate: float = 0.0):
        """`padding` "mindcv": the stem max pooling pads by MindSpore's "same" rule; "modelzoo": the strided
        convolutions too (as those layouts' nets)."""
        super().__init__()
        same_conv = padding == "modelzoo"
        self.conv1, self.bn1 = _conv(3, 64, 7, 2, same_conv), _bn(64, eps=bn_eps)
        self.relu = nn.ReLU()
        self.maxpool = StemMaxPool(same=padding in ("mindcv", "modelzoo"))
        in_channels, out_channels = (64, 256, 512, 1024), (256, 512, 1024, 2048)
        strides = (1, 2, 2, 2)
        rates = drop_path_rates(drop_path_rate, sum(layer_nums), timm_resnet=True)
        first = [sum(layer_nums[:i]) for i in range(4)]  # the net-wide index of each stage's first block

        def drop(index: int) -> DropPath | None:
            return DropPath(rates[index], index) if rates[index] > 0 else None

        self.layer1, self.layer2, self.layer3, self.layer4 = (
            nn.SequentialCell([ResidualBlock(in_channels[i] if j == 0 else out_channels[i], out_channels[i],
                                             strides[i] if j == 0 else 1, bn_eps, same_conv, drop(first[i] + j))
                                for j in range(layer_nums[i])])
            for i in range(4))
        self.out_channels = out_channels[-1]

    def construct(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class ResNetHead(nn.Cell):
    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.pool = GlobalAvgPooling()
        self.dropout = Dropout(dropout) if dropout > 0 else None
        self.end_point = nn.Dense(in_channels, num_classes, has_bias=True)

    def classify(self, x):
        """Logits from pooled features (N x C), used directly when training on cached features."""
        if self.dropout is not None:
            x = self.dropout(x)
        return self.end_point(x)

    def construct(self, x):
        return self.classify(self.pool(x))


def _resnet(layer_nums, num_classes: int, width: float, dropout: float, bn_eps: float | None,
            padding: str, drop_path_rate: float) -> ClassifierNet:
    backbone = ResNetBackbone(layer_nums, BN_EPS if bn_eps is None else bn_eps, padding, drop_path_rate)
    return ClassifierNet(backbone, ResNetHead(backbone.out_channels, num_classes, dropout),
                         head_prefixes=("end_point.",))


def resnet50(num_classes: int = 1000, width: float = 1.0, dropout: float = 0.0, bn_eps: float | None = None,
             padding: str = "symmetric", drop_path_rate: float = 0.0) -> ClassifierNet:
    return _resnet((3, 4, 6, 3), num_classes, width, dropout, bn_eps, padding, drop_path_rate)


def resnet101(num_classes: int = 1000, width: float = 1.0, dropout: float = 0.0, bn_eps: float | None = None,
              padding: str = "symmetric", drop_path_rate: float = 0.0) -> ClassifierNet:
    return _resnet((3, 4, 23, 3), num_classes, width, dropout, bn_eps, padding, drop_path_rate)



