"""Augmentation policies (auto_augment) and random erasing (re_prob), with mindcv's key names and timm's grammar.

Random erasing runs in the batch op (`erase_batch`, called by src/data/batch_augment.py's BatchAugment), seeded per
batch.

The policies are MindSpore's own C++ operations (mindspore.dataset.vision AutoAugment, RandAugment and
TrivialAugmentWide, torchvision's op sets), configured as timm configures its own: bilinear resampling and the
ImageNet mean pixel as fill. `randaug-mM` takes timm's 0..10 magnitude scale: MindSpore's RandAugment with 11
magnitude bins puts magnitude M at M/10 of each op's range, as timm does. Its posterize and solarize grow stronger
with the magnitude, which is timm's `inc1` variant; `mstdS` draws each image's magnitude from N(M, S) (clipped to
0..10, rounded to the 11 levels) as timm does (continuously) per image.
"""
from __future__ import annotations

import math

import numpy as np

from src.policy import GRAMMAR, LEVELS, Policy, parse_policy  # noqa: F401 - the grammar is a config value's

FILL = (124, 116, 104)  # the ImageNet mean pixel, timm's fill for geometric ops


def magnitude_weights(magnitude: int, std: float) -> list[float]:
    """Probability of each level 0..10 when the magnitude is drawn from N(magnitude, std), clipped and rounded."""
    if std <= 0:
        return [1.0 if level == magnitude else 0.0 for level in range(LEVELS + 1)]

    def cdf(x: float) -> float:
        return 0.5 * (1 + math.erf((x - magnitude) / (std * math.sqrt(2))))

    return [(cdf(level + 0.5) if level < LEVELS else 1.0) - (cdf(level - 0.5) if level > 0 else 0.0)
            for level in range(LEVELS + 1)]


def policy_transform(policy: Policy):
    """The MindSpore transform of a policy, for HWC uint8 images."""
    import mindspore.dataset.transforms as transforms
    import mindspore.dataset.vision as vision

    inter = vision.Inter.BILINEAR
    if policy.name == "autoaug":
        return vision.AutoAugment(vision.AutoAugmentPolicy.IMAGENET, inter, FILL)
    if policy.name == "trivialaugwide":
        return vision.TrivialAugmentWide(31, inter, FILL)

    def at(level: int):
        return vision.RandAugment(policy.num_ops, level, LEVELS + 1, inter, FILL)

    weights = magnitude_weights(policy.magnitude, policy.magnitude_std)
    if policy.magnitude_std <= 0:
        return at(policy.magnitude)
    # RandomChoice picks uniformly: each level appears in proportion to its probability (1% resolution)
    ops = {level: at(level) for level, w in enumerate(weights) if round(100 * w) > 0}
    return transforms.RandomChoice([ops[level] for level in ops for _ in range(round(100 * weights[level]))])


ERASE_SCALE = (0.02, 1 / 3)  # area fraction, mindcv's/timm's
ERASE_RATIO = (0.3, 3.3)  # aspect
ERASE_ATTEMPTS = 10


def erase_batch(images: np.ndarray, prob: float, rng: np.random.Generator) -> np.ndarray:
    """Random erasing of each normalised NCHW image with probability `prob`, in place: what mindcv's
    vision.RandomErasing(prob, scale=(0.02, 1/3), ratio=(0.3, 3.3), value=0, max_attempts=10) does (area and
    aspect drawn uniformly, w = round(sqrt(area * aspect)), h = round(w / aspect), the box inside the image, up to
    10 attempts), with the draws from `rng`.

    MindSpore's RandomErasing is a Python op on Python's global `random`: with 2 pipeline workers its draws are
    shared between threads in whatever order they run, and the same seed gave other runs (val top-1 0.85, 0.89
    and 0.95 for one config). Here the batch op draws them from the batch's own generator."""
    _, _, height, width = images.shape
    for k in range(len(images)):
        if rng.random() >= prob:
            continue
        for _ in range(ERASE_ATTEMPTS):
            area = rng.uniform(*ERASE_SCALE) * height * width
            aspect = rng.uniform(*ERASE_RATIO)
            w = int(round(math.sqrt(area * aspect)))
            h = int(round(w / aspect))
            if h < height and w < width:
                top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
                images[k, :, top:top + h, left:left + w] = 0
                break
    return images
