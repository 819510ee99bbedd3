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


def _decayed(epoch: float, step_size: float, gamma: float, milestones: tuple[int, ...], mode: str) -> float:
    """The factor on lr_max at `epoch` (counted after warmup) of the step, multistep and exponential modes."""
    if mode == "step":  # torch's StepLR: gamma ** (epoch // step_size); timm's 2.4-epoch steps alike
        return gamma ** math.floor(epoch / step_size + 1e-9)
    if mode == "multistep":  # torch's MultiStepLR
        return gamma ** sum(epoch + 1e-9 >= m for m in milestones)
    return gamma ** epoch  # exponential: torch's ExponentialLR, gamma per epoch


SCHEDULES = {"cosine": _cosine, "steps": _steps, "poly": _poly, "linear": _linear}
DECAYS = ("step", "multistep", "exponential")


def build_lr_schedule(mode: str, lr_init: float, lr_max: float, lr_end: float, warmup_epochs: float,
                      total_epochs: int, steps_per_epoch: int, *, step_size: float = 30.0, gamma: float = 0.1,
                      milestones: tuple[int, ...] = (), step_per_epoch: bool = True, num_cycles: int = 1,
                      cycle_decay: float = 1.0) -> np.ndarray:
    """float32 learning rate for every optimizer step of the run (`steps_per_epoch`: optimizer steps).

    After the linear warmup, step/multistep/exponential decay lr_max by `gamma` as torch's StepLR, MultiStepLR and
    ExponentialLR do, counting epochs from the warmup's end: at epoch boundaries (`step_per_epoch`, the schedulers
    stepped once per epoch) or at every step from the fractional epoch. Cosine with `num_cycles` > 1 restarts at the
    peak (times `cycle_decay` per cycle) after each equal cycle, as torch's CosineAnnealingWarmRestarts(T_0=cycle).
    """
    total = total_epochs * steps_per_epoch
    warmup = int(warmup_epochs * steps_per_epoch)
    if mode in DECAYS:
        def fn(i, total, warmup, lr_init, lr_max, lr_end):
            if i < warmup:
                return _warmup(i, warmup, lr_init, lr_max)
            after = i - warmup
            epoch = after // steps_per_epoch if step_per_epoch else after / steps_per_epoch
            return lr_max * _decayed(epoch, step_size, gamma, tuple(milestones), mode)
    elif mode == "cosine" and num_cycles > 1:
        def fn(i, total, warmup, lr_init, lr_max, lr_end):
            if i < warmup:
                return _warmup(i, warmup, lr_init, lr_max)
            cycle_len = (total - warmup) / num_cycles
            cycle = min(int((i - warmup) / cycle_len), num_cycles - 1)
            peak = lr_max * cycle_decay ** cycle
            progress = (i - warmup - cycle * cycle_len) / cycle_len
            return lr_end + (peak - lr_end) * (1.0 + math.cos(math.pi * progress)) / 2.0
    else:
        fn = SCHEDULES[mode]
    lr = [fn(i, total, warmup, lr_init, lr_max, lr_end) for i in range(total)]
    return np.asarray(lr, dtype=np.float32)


def describe(cfg) -> str:
    """One phrase for the log: the schedule after warmup, and the warmup."""
    mode = cfg.lr_decay_mode
    when = "" if cfg.lr_step_per_epoch else ", per step"
    shape = {
        "cosine": f"cosine from {cfg.lr_max:g} to {cfg.lr_end:g}" + (
            f" in {cfg.num_cycles} cycles (each peak x{cfg.cycle_decay:g})" if cfg.num_cycles > 1 else ""),
        "steps": f"steps: {cfg.lr_max:g}, x0.1 at 30%, 60% and 80% of the run",
        "poly": f"poly from {cfg.lr_max:g}",
        "linear": f"linear from {cfg.lr_max:g} to {cfg.lr_end:g}",
        "step": f"step: {cfg.lr_max:g}, x{cfg.lr_gamma:g} every {cfg.lr_step_size:g} epochs{when}",
        "multistep": f"multistep: {cfg.lr_max:g}, x{cfg.lr_gamma:g} at epochs {cfg.lr_milestones}{when}",
        "exponential": f"exponential: {cfg.lr_max:g}, x{cfg.lr_gamma:g} per epoch{when}",
    }[mode]
    warmup = f" after {cfg.warmup_epochs:g} warmup epochs from {cfg.lr_init:g}" if cfg.warmup_epochs else ""
    return f"{shape}{warmup}"


def schedule_of(cfg, steps_per_epoch: int) -> np.ndarray:
    """The per-step LR array of a config (config.Config) with `steps_per_epoch` optimizer steps per epoch."""
    from src.config import milestones

    return build_lr_schedule(cfg.lr_decay_mode, cfg.lr_init, cfg.lr_max, cfg.lr_end, cfg.warmup_epochs,
                             cfg.epoch_size, steps_per_epoch, step_size=cfg.lr_step_size, gamma=cfg.lr_gamma,
                             milestones=tuple(milestones(cfg.lr_milestones)) if cfg.lr_milestones else (),
                             step_per_epoch=cfg.lr_step_per_epoch, num_cycles=cfg.num_cycles,
                             cycle_decay=cfg.cycle_decay)
