"""Pieces shared by the nets: the backbone + head combination and global average pooling."""
from __future__ import annotations

from mindspore import nn, ops


class GlobalAvgPooling(nn.Cell):
    """N x C x H x W -> N x C."""

    def construct(self, x):
        return ops.mean(x, (2, 3), keep_dims=False)


class ClassifierNet(nn.Cell):
    """Backbone and head side by side without a name prefix, so a full checkpoint loads into the backbone.

    `head_prefixes` name the parameters that belong to the classifier (used to filter or freeze them).
    """

    def __init__(self, backbone: nn.Cell, head: nn.Cell, head_prefixes: tuple[str, ...]):
        super().__init__(auto_prefix=False)
        self.backbone = backbone
        self.head = head
        self.head_prefixes = head_prefixes

    def construct(self, x):
        return self.head(self.backbone(x))
