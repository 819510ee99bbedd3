"""torchvision's MobileNetV2, MobileNetV3 and ResNet-50/101, written out in PyTorch with torchvision's module names and
layer semantics (torchvision's own wheel does not import beside the torch release installed here), to make state
dicts exactly as torchvision's `model.state_dict()` names and shapes them."""
from __future__ import annotations

import torch
from torch import nn


def _divisible(value: float, divisor: int = 8) -> int:
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


class ConvNormActivation(nn.Sequential):
    """torchvision.ops.Conv2dNormActivation: conv (padding (k-1)/2, no bias), BatchNorm, optional activation."""

    def __init__(self, cin, cout, k=3, stride=1, groups=1, act=nn.ReLU6, eps=1e-5, momentum=0.1):
        layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                  nn.BatchNorm2d(cout, eps=eps, momentum=momentum)]
        if act is not None:
            layers.append(act(inplace=True))
        super().__init__(*layers)


class V2Block(nn.Module):
    def __init__(self, cin, cout, stride, t):
        super().__init__()
        hidden = int(round(cin * t))
        self.use_res_connect = stride == 1 and cin == cout
        layers = [ConvNormActivation(cin, hidden, 1)] if t != 1 else []
        layers += [ConvNormActivation(hidden, hidden, 3, stride, hidden), nn.Conv2d(hidden, cout, 1, bias=False),
                   nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes=1000, width=1.0):
        super().__init__()
        cin = _divisible(32 * width)
        last = _divisible(1280 * max(1.0, width))
        features = [ConvNormActivation(3, cin, stride=2)]
        for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                           (6, 160, 3, 2), (6, 320, 1, 1)):
            cout = _divisible(c * width)
            for i in range(n):
                features.append(V2Block(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(ConvNormActivation(cin, last, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


class SqueezeExcitation(nn.Module):
    def __init__(self, channels, squeezed):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(channels, squeezed, 1), nn.Conv2d(squeezed, channels, 1)
        self.activation, self.scale_activation = nn.ReLU(), nn.Hardsigmoid()

    def forward(self, x):
        return x * self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))


class V3Block(nn.Module):
    def __init__(self, cin, k, exp, cout, se, act, stride):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        norm = {"eps": 0.001, "momentum": 0.01}
        layers = [ConvNormActivation(cin, exp, 1, act=act, **norm)] if exp != cin else []
        layers.append(ConvNormActivation(exp, exp, k, stride, exp, act=act, **norm))
        if se:
            layers.append(SqueezeExcitation(exp, _divisible(exp // 4, 8)))
        layers.append(ConvNormActivation(exp, cout, 1, act=None, **norm))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.block(x) if self.use_res_connect else self.block(x)


# torchvision.models.mobilenetv3._mobilenet_v3_conf: input, kernel, expanded, output, SE, activation, stride
V3_LARGE = ((16, 3, 16, 16, False, "RE", 1), (16, 3, 64, 24, False, "RE", 2), (24, 3, 72, 24, False, "RE", 1),
            (24, 5, 72, 40, True, "RE", 2), (40, 5, 120, 40, True, "RE", 1), (40, 5, 120, 40, True, "RE", 1),
            (40, 3, 240, 80, False, "HS", 2), (80, 3, 200, 80, False, "HS", 1), (80, 3, 184, 80, False, "HS", 1),
            (80, 3, 184, 80, False, "HS", 1), (80, 3, 480, 112, True, "HS", 1), (112, 3, 672, 112, True, "HS", 1),
            (112, 5, 672, 160, True, "HS", 2), (160, 5, 960, 160, True, "HS", 1), (160, 5, 960, 160, True, "HS", 1))
V3_SMALL = ((16, 3, 16, 16, True, "RE", 2), (16, 3, 72, 24, False, "RE", 2), (24, 3, 88, 24, False, "RE", 1),
            (24, 5, 96, 40, True, "HS", 2), (40, 5, 240, 40, True, "HS", 1), (40, 5, 240, 40, True, "HS", 1),
            (40, 5, 120, 48, True, "HS", 1), (48, 5, 144, 48, True, "HS", 1), (48, 5, 288, 96, True, "HS", 2),
            (96, 5, 576, 96, True, "HS", 1), (96, 5, 576, 96, True, "HS", 1))


class MobileNetV3(nn.Module):
    def __init__(self, arch="large", num_classes=1000):
        super().__init__()
        conf, last = (V3_LARGE, 1280) if arch == "large" else (V3_SMALL, 1024)
        norm = {"eps": 0.001, "momentum": 0.01}
        features = [ConvNormActivation(3, 16, 3, 2, act=nn.Hardswish, **norm)]
        for cin, k, exp, cout, se, act, stride in conf:
            features.append(V3Block(cin, k, exp, cout, se, nn.Hardswish if act == "HS" else nn.ReLU, stride))
        features.append(ConvNormActivation(conf[-1][3], 6 * conf[-1][3], 1, act=nn.Hardswish, **norm))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(6 * conf[-1][3], last), nn.Hardswish(inplace=True),
                                        nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class Bottleneck(nn.Module):
    """torchvision's ResNet V1.5 bottleneck: the stride on the 3 x 3 convolution."""

    def __init__(self, cin, width, stride=1, downsample=None):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, width * 4, 1, bias=False), nn.BatchNorm2d(width * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (self.downsample(x) if self.downsample is not None else x))


class ResNet(nn.Module):
    def __init__(self, layers=(3, 4, 6, 3), num_classes=1000):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        self.relu, self.maxpool = nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, (n, width) in enumerate(zip(layers, (64, 128, 256, 512))):
            stride = 1 if i == 0 else 2
            down = nn.Sequential(nn.Conv2d(cin, width * 4, 1, stride, bias=False), nn.BatchNorm2d(width * 4))
            blocks = [Bottleneck(cin, width, stride, down)] + [Bottleneck(width * 4, width) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = width * 4
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def torchvision_net(model: str, num_classes: int) -> nn.Module:
    """The torchvision net matching this package's `model`, in eval mode."""
    nets = {"mobilenetv2": lambda: MobileNetV2(num_classes),
            "mobilenetv3_large": lambda: MobileNetV3("large", num_classes),
            "mobilenetv3_small": lambda: MobileNetV3("small", num_classes),
            "resnet50": lambda: ResNet((3, 4, 6, 3), num_classes),
            "resnet101": lambda: ResNet((3, 4, 23, 3), num_classes)}
    return nets[model]().eval()
