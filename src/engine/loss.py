"""Cross-entropy with label smoothing as in the ModelZoo: on-value 1-s, off-value s/(C-1).

Int labels are smoothed here; soft targets (batch x classes, from mixup/cutmix, smoothed when they were mixed)
are taken as they are."""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, nn, ops


class CrossEntropySmooth(nn.Cell):
    def __init__(self, num_classes: int, smooth_factor: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        self.on_value = Tensor(1.0 - smooth_factor, ms.float32)
        self.off_value = Tensor(smooth_factor / (num_classes - 1), ms.float32)
        self.ce = nn.SoftmaxCrossEntropyWithLogits(reduction="mean")

    def construct(self, logits, label):
        if label.ndim == 2:  # soft targets
            return self.ce(logits, ops.cast(label, ms.float32))
        one_hot = ops.one_hot(label, self.num_classes, self.on_value, self.off_value)
        return self.ce(logits, one_hot)
