"""Class-balanced sampling (`--sampler balanced`): each epoch draws classes equally, with replacement.

An epoch of a split of N images on R ranks draws ceil(N / R) images per rank: a class uniformly at random among the
classes that have images, then one of its images uniformly, as PyTorch's WeightedRandomSampler with weights
1 / class count (what mindcv and PaddleClas users build by hand). The draws depend on (seed, epoch, rank) only, so a
run gives the same epochs again, a resumed run continues with the epochs it would have had, and each rank draws its
own images (MindSpore's WeightedRandomSampler takes the global seed, the same on every rank, so every rank would
train on the same images).
"""
from __future__ import annotations

import math

import mindspore.dataset as ds
import numpy as np


def epoch_draw(labels: np.ndarray, seed: int, epoch: int, rank: int, ranks: int) -> np.ndarray:
    """The indices one rank trains on in one epoch."""
    rng = np.random.default_rng([seed, epoch, rank, 0xBA1A])
    classes, inverse = np.unique(labels, return_inverse=True)
    by_class = np.argsort(inverse, kind="stable")  # the indices grouped by class
    starts = np.concatenate([[0], np.cumsum(np.bincount(inverse))])
    count = math.ceil(len(labels) / ranks)
    picked = rng.integers(0, len(classes), count)
    sizes = starts[picked + 1] - starts[picked]
    return by_class[starts[picked] + (rng.random(count) * sizes).astype(np.int64)]


class BalancedSampler(ds.Sampler):
    """A MindSpore sampler of `epoch_draw`, called once per epoch (a resumed pipeline, positioned by
    pipeline.resume_at, calls it for the epochs done too, and so draws the epochs the run would have drawn)."""

    def __init__(self, labels: np.ndarray, seed: int, rank: int = 0, ranks: int = 1):
        self.labels, self.seed, self.rank, self.ranks = np.asarray(labels), seed, rank, ranks
        self.epoch = 0
        super().__init__(num_samples=math.ceil(len(self.labels) / ranks))

    def __iter__(self):
        indices = epoch_draw(self.labels, self.seed, self.epoch, self.rank, self.ranks)
        self.epoch += 1
        return iter(indices.tolist())

    def __len__(self) -> int:
        return self.num_samples
