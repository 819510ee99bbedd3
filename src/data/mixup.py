"""Batch-level mixup and cutmix with soft targets: timm's `Mixup` in its default "batch" mode, as mindcv uses it.

Each batch is mixed with probability `mixup_prob`: with mixup, every image becomes lam * image + (1 - lam) * the
image at the mirrored position of the batch (timm's `flip`), lam ~ Beta(mixup, mixup); with cutmix, a box of area
1 - lam taken from the mirrored image is pasted in, lam ~ Beta(cutmix, cutmix) and corrected to the box's area
after clipping at the border. With both alphas set, cutmix is chosen with probability `mixup_switch_prob`. The
targets are the label-smoothed one-hot rows (the ModelZoo's smoothing, as the unmixed loss: on 1 - s, off
s / (C - 1)) mixed with the same lam, so they sum to 1 and each class's share equals its share of the pixels.

MindSpore's MixUpBatch/CutMixBatch are not used: they have no switch between the two, CutMixBatch draws a
lam per image, and neither knows the epoch, which `mixup_off_epoch` needs. The batch op runs this through
src/data/batch_augment.py's BatchAugment, with a generator seeded per batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from src.config import Config


@dataclass(frozen=True)
class MixSettings:
    mixup: float  # Beta alpha of mixup (0: off)
    cutmix: float  # Beta alpha of cutmix (0: off)
    prob: float  # probability that a batch is mixed
    switch_prob: float  # with both alphas: probability of cutmix instead of mixup
    off_epoch: int  # no mixing from this (1-based) data epoch on; 0: never off
    smoothing: float
    num_classes: int

    @classmethod
    def from_config(cls, cfg: Config) -> MixSettings | None:
        if not cfg.mixes:
            return None
        return cls(cfg.mixup, cfg.cutmix, cfg.mixup_prob, cfg.mixup_switch_prob, cfg.mixup_off_epoch,
                   cfg.label_smooth, cfg.num_classes)

    def active(self, epoch: int) -> bool:
        """Whether batches of data epoch `epoch` (1-based) are mixed: timm turns mixing off at epoch index
        mixup_off_epoch, i.e. the run's epochs up to mixup_off_epoch are mixed."""
        return self.off_epoch <= 0 or epoch <= self.off_epoch


def soft_targets(labels: np.ndarray, num_classes: int, smoothing: float) -> np.ndarray:
    """One-hot rows with the ModelZoo's label smoothing (on 1 - s, off s / (C - 1)), float32."""
    off = smoothing / (num_classes - 1) if num_classes > 1 else 0.0
    targets = np.full((len(labels), num_classes), off, np.float32)
    targets[np.arange(len(labels)), labels] = 1.0 - smoothing
    return targets


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """timm's rand_bbox: a box of side sqrt(1 - lam) x the image's, centred anywhere, clipped at the border."""
    ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    return (int(np.clip(cy - cut_h // 2, 0, height)), int(np.clip(cy + cut_h // 2, 0, height)),
            int(np.clip(cx - cut_w // 2, 0, width)), int(np.clip(cx + cut_w // 2, 0, width)))


def mix_batch(images: np.ndarray, labels: np.ndarray, settings: MixSettings, rng: np.random.Generator,
              active: bool = True) -> tuple[np.ndarray, np.ndarray, float]:
    """(mixed NCHW images, soft targets, lam): lam is the share of each image's own class (1.0: unmixed)."""
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels).reshape(-1)
    lam, use_cutmix = 1.0, False
    if active and rng.random() < settings.prob:
        if settings.mixup > 0 and settings.cutmix > 0:
            use_cutmix = bool(rng.random() < settings.switch_prob)
        else:
            use_cutmix = settings.cutmix > 0
        alpha = settings.cutmix if use_cutmix else settings.mixup
        lam = float(rng.beta(alpha, alpha))
    flipped = images[::-1]
    if lam < 1.0 and use_cutmix:
        height, width = images.shape[-2:]
        y0, y1, x0, x1 = cutmix_box(height, width, lam, rng)
        images = images.copy()
        images[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
    elif lam < 1.0:
        images = images * np.float32(lam) + flipped * np.float32(1.0 - lam)
    targets = soft_targets(labels, settings.num_classes, settings.smoothing)
    if lam < 1.0:
        targets = targets * np.float32(lam) + targets[::-1] * np.float32(1.0 - lam)
    return images, targets.astype(np.float32), lam
