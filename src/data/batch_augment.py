"""The train pipeline's batch-level augmentation: random erasing of each image (re_prob), then mixup/cutmix of the
batch. It is the `per_batch_map` of the batch op, so it sees the data epoch and the batch index: both steps draw
from one generator per batch, seeded by (seed, rank, data epoch, batch index). The draws then do not depend on
which pipeline thread runs first, and a resumed run (positioned by pipeline.resume_at, which continues the batch op's
epoch count) draws as the uninterrupted run did in its epoch.
"""
from __future__ import annotations

import numpy as np

from src.data.augment import erase_batch
from src.data.mixup import MixSettings, mix_batch


class BatchAugment:
    def __init__(self, re_prob: float, mixing: MixSettings | None, seed: int, shard: int):
        self.re_prob, self.mixing = re_prob, mixing
        self.seed, self.shard = seed, shard

    def __call__(self, images, labels, batch_info):
        epoch = batch_info.get_epoch_num() + 1  # the run's 1-based data epoch (a resumed run's continues)
        rng = np.random.default_rng([self.seed, self.shard, epoch, batch_info.get_batch_num()])
        images = np.stack(images).astype(np.float32, copy=False)  # a new array: erased in place
        labels = np.asarray(labels).reshape(-1)
        if self.re_prob > 0:
            erase_batch(images, self.re_prob, rng)
        if self.mixing is None:
            return images, labels
        mixed, targets, _ = mix_batch(images, labels, self.mixing, rng, active=self.mixing.active(epoch))
        return mixed, targets
