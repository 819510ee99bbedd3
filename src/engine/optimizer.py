"""Optimizer factory (as timm's create_optimizer_v2): momentum SGD with weight decay on weights only."""
from __future__ import annotations

import numpy as np
from mindspore import Parameter, Tensor, nn

NO_DECAY_SUFFIXES = ("gamma", "beta", "bias")  # BatchNorm scale/shift and biases


def param_groups(params: list[Parameter], weight_decay: float) -> list[dict]:
    """Conv/dense weights decay; BatchNorm gamma/beta and biases do not; the original order is kept."""
    decay = [p for p in params if not p.name.endswith(NO_DECAY_SUFFIXES)]
    no_decay = [p for p in params if p.name.endswith(NO_DECAY_SUFFIXES)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0},
            {"order_params": params}]


def create_optimizer(params: list[Parameter], lr: np.ndarray | float, momentum: float = 0.9,
                     weight_decay: float = 0.0) -> nn.Optimizer:
    """nn.Momentum over `params`; `lr` is a per-step array (indexed by the optimizer's global step) or a constant."""
    learning_rate = Tensor(lr) if isinstance(lr, np.ndarray) else lr
    return nn.Momentum(param_groups(params, weight_decay), learning_rate=learning_rate, momentum=momentum)
