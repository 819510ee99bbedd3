"""Per-step learning-rate arrays, built up front as in the ModelZoo.

The optimizer indexes the array with its global step, which checkpoints save, so a resumed run
continues on the same curve (no second warmup).
"""
from __future__ import annotations

import math

import numpy as np


def _warmup(i: int, warmup_steps: int, lr_init: float, lr_max: float) -> float:
    return lr_init + (lr_max - lr_init) * i / warmup_steps


def _cosine(i, total, warmup, lr_init, lr_max, lr_end):
    """Linear warmup, then half a cosine from lr_max to lr_end (ModelZoo MobileNetV2)."""
    if i < warmup:
        return _warmup(i, warmup, lr_init, lr_max)
    progress = (i - warmup) / max(1, total - warmup)
    return lr_end + (lr_max - lr_end) * (1.0 + math.cos(math.pi * progress)) / 2.0


def _steps(i, total, warmup, lr_init, lr_max, lr_end):
    """lr_max, then x0.1 at 30%, 60% and 80% of training (ModelZoo ResNet); warmup if asked."""
    if i < warmup:
        return _warmup(i, warmup, lr_init, lr_max)
    for boundary, factor in ((0.3, 1.0), (0.6, 0.1), (0.8, 0.01)):
        if i < boundary * total:
            return lr_max * factor
    return lr_max * 0.001


def _poly(i, total, warmup, lr_init, lr_max, lr_end):
    """Linear warmup, then lr_max * (1 - progress)^2 down to zero (ModelZoo ResNet 'poly')."""
    if i < warmup:
        return _warmup(i, warmup, lr_init, lr_max)
    base = 1.0 - (i - warmup) / max(1, total - warmup)
    return max(0.0, lr_max * base * base)


def _linear(i, total, warmup, lr_init, lr_max, lr_end):
    """Linear warmup, then a straight line from lr_max to lr_end."""
    if i < warmup:
        return _warmup(i, warmup, lr_init, lr_max)
    return lr_max - (lr_max - lr_end) * (i - warmup) / max(1, total - warmup)


SCHEDULES = {"cosine": _cosine, "steps": _steps, "poly": _poly, "linear": _linear}


def build_lr_schedule(mode: str, lr_init: float, lr_max: float, lr_end: float, warmup_epochs: float,
                      total_epochs: int, steps_per_epoch: int) -> np.ndarray:
    """float32 learning rate for every optimizer step of the run (`steps_per_epoch`: optimizer steps)."""
    total = total_epochs * steps_per_epoch
    warmup = int(warmup_epochs * steps_per_epoch)
    fn = SCHEDULES[mode]
    lr = [fn(i, total, warmup, lr_init, lr_max, lr_end) for i in range(total)]
    return np.asarray(lr, dtype=np.float32)
