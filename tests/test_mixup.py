"""Mixup and cutmix: the soft targets sum to 1 and equal each class's share of the mixed pixels, the draws are
reproducible per batch, the loss takes the soft targets and the train top-1 counts their largest class."""
from __future__ import annotations

import types

import mindspore as ms
import numpy as np
import pytest
from conftest import make_imagefolder

from src.config import Config
from src.data.batch_augment import BatchAugment
from src.data.mixup import MixSettings, mix_batch, soft_targets
from src.engine.loss import CrossEntropySmooth
from src.engine.train_step import RunningStats
from src.errors import UserError

CLASSES = 6


def constant_batch(n=CLASSES, size=16):
    """Image i is filled with the value 10 * (i + 1), its label is i: each pixel says which image it came from."""
    values = 10.0 * (np.arange(n) + 1)
    return np.broadcast_to(values[:, None, None, None], (n, 3, size, size)).astype(np.float32), np.arange(n)


def settings(mixup=0.0, cutmix=0.0, prob=1.0, switch=0.5, off=0, smoothing=0.0):
    return MixSettings(mixup, cutmix, prob, switch, off, smoothing, CLASSES)


@pytest.mark.parametrize("seed", range(5))
def test_mixup_targets_are_the_pixel_shares(seed):
    images, labels = constant_batch()
    mixed, targets, lam = mix_batch(images, labels, settings(mixup=0.4), np.random.default_rng(seed))
    assert 0 < lam < 1
    np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-6)
    for i in range(CLASSES):
        j = CLASSES - 1 - i  # mixed with the mirrored image, as timm
        own = (mixed[i] - images[j]) / (images[i] - images[j]) if i != j else np.ones_like(mixed[i])
        np.testing.assert_allclose(own, lam, atol=1e-6)
        np.testing.assert_allclose(targets[i, i], lam, rtol=1e-6)
        np.testing.assert_allclose(targets[i, j], 1 - lam, rtol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_cutmix_targets_are_the_pixel_shares(seed):
    images, labels = constant_batch()
    mixed, targets, lam = mix_batch(images, labels, settings(cutmix=1.0), np.random.default_rng(seed))
    np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-6)
    for i in range(CLASSES):
        j = CLASSES - 1 - i
        pasted = float((mixed[i] == images[j][0, 0, 0]).mean())  # the share of pixels from the mirrored image
        np.testing.assert_allclose(targets[i, j], pasted, atol=1e-6)
        np.testing.assert_allclose(targets[i, i], 1 - pasted, atol=1e-6)
        assert np.isin(mixed[i], [images[i][0, 0, 0], images[j][0, 0, 0]]).all()  # a box, not a blend
    assert lam < 1 or not (mixed != images).any()


def test_label_smoothing_still_applies_and_the_targets_sum_to_1():
    images, labels = constant_batch()
    plain = soft_targets(labels, CLASSES, 0.1)
    assert plain[0, 0] == pytest.approx(0.9) and plain[0, 1] == pytest.approx(0.1 / (CLASSES - 1))  # as the loss
    for switch in (0.0, 1.0):
        _, targets, lam = mix_batch(images, labels, settings(mixup=1.0, cutmix=1.0, switch=switch, smoothing=0.1),
                                    np.random.default_rng(3))
        np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-6)
        np.testing.assert_allclose(targets, lam * plain + (1 - lam) * plain[::-1], rtol=1e-6)


def test_switch_prob_chooses_cutmix_or_mixup_and_prob_0_leaves_batches_alone():
    images, labels = constant_batch()
    cut = mix_batch(images, labels, settings(mixup=1.0, cutmix=1.0, switch=1.0), np.random.default_rng(1))[0]
    blend = mix_batch(images, labels, settings(mixup=1.0, cutmix=1.0, switch=0.0), np.random.default_rng(1))[0]
    assert len(np.unique(cut[0])) <= 2 and len(np.unique(blend[0])) == 1 and blend[0, 0, 0, 0] != images[0, 0, 0, 0]
    for kept in (mix_batch(images, labels, settings(mixup=1.0, prob=0.0), np.random.default_rng(1)),
                 mix_batch(images, labels, settings(mixup=1.0), np.random.default_rng(1), active=False)):
        np.testing.assert_array_equal(kept[0], images)
        np.testing.assert_array_equal(kept[1], np.eye(CLASSES, dtype=np.float32))
    # about mixup_prob of the batches are mixed
    mixed = [mix_batch(images, labels, settings(cutmix=1.0, prob=0.3), np.random.default_rng(s))[2] < 1
             for s in range(400)]
    assert 0.24 < np.mean(mixed) < 0.36


def test_mixup_off_epoch_counts_the_runs_epochs_and_draws_repeat_per_batch():
    assert [settings(mixup=1.0, off=2).active(e) for e in (1, 2, 3)] == [True, True, False]
    assert settings(mixup=1.0, off=0).active(1000)
    images, labels = constant_batch()

    def info(epoch, batch):
        return types.SimpleNamespace(get_epoch_num=lambda: epoch, get_batch_num=lambda: batch)

    mixer = BatchAugment(0.0, settings(mixup=1.0, off=3), seed=7, shard=0)
    a, b, c = mixer(list(images), list(labels), info(0, 5)), mixer(list(images), list(labels), info(0, 5)), \
        mixer(list(images), list(labels), info(0, 6))
    np.testing.assert_array_equal(a[0], b[0])  # the same batch of the same epoch mixes the same way, in any order
    assert not np.array_equal(a[0], c[0])
    # the draws depend on the batch op's epoch, which a resumed pipeline continues (pipeline.resume_at)
    resumed = BatchAugment(0.0, settings(mixup=1.0, off=3), seed=7, shard=0)(list(images), list(labels), info(2, 0))
    np.testing.assert_array_equal(resumed[0], mixer(list(images), list(labels), info(2, 0))[0])
    np.testing.assert_array_equal(mixer(list(images), list(labels), info(3, 0))[0], images)  # epoch 4: off
    other_rank = BatchAugment(0.0, settings(mixup=1.0), seed=7, shard=1)(list(images), list(labels), info(0, 5))
    assert not np.array_equal(a[0], other_rank[0])


def test_the_loss_takes_soft_targets_and_top1_counts_their_largest_class():
    logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]], np.float32)
    targets = np.array([[0.7, 0.3, 0.0], [0.45, 0.0, 0.55]], np.float32)
    loss = CrossEntropySmooth(3, 0.1)(ms.Tensor(logits), ms.Tensor(targets)).asnumpy()
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    assert loss == pytest.approx(-(targets * log_p).sum(1).mean(), rel=1e-5)  # not smoothed a second time
    stats = RunningStats(3)
    stats(ms.Tensor(np.float32(loss)), ms.Tensor(logits), ms.Tensor(targets))
    read = stats.read()
    assert read["top1"] == 1.0 and read["images"] == 2  # predictions 0 and 2 are the targets' largest classes
    stats(ms.Tensor(np.float32(loss)), ms.Tensor(logits), ms.Tensor(targets[::-1].copy()))
    assert stats.read()["top1"] == 0.0


def test_the_train_pipeline_yields_mixed_images_and_soft_targets(tmp_path):
    from src.data.checks import check_dataset
    from src.data.pipeline import create_dataset

    data = make_imagefolder(tmp_path / "data", classes=("a", "b", "c"), per_class=(4, 2))
    cfg = Config(dataset_path=str(data), num_classes=3, image_size=16, batch_size=4, mixup=0.5, cutmix=1.0,
                 label_smooth=0.1, num_parallel_workers=1)
    source = check_dataset(cfg, need_train=True, need_val=True)
    image, target = next(create_dataset(cfg, source, training=True).create_tuple_iterator(output_numpy=True))
    assert image.shape == (4, 3, 16, 16) and target.shape == (4, 3) and target.dtype == np.float32
    np.testing.assert_allclose(target.sum(1), 1.0, rtol=1e-6)
    val_label = next(create_dataset(cfg, source, training=False).create_tuple_iterator(output_numpy=True))[1]
    assert val_label.shape == (4,)  # evaluation keeps int labels


def test_mixing_refuses_cached_features_and_takes_mindcvs_name():
    with pytest.raises(UserError, match="--freeze_layer backbone trains the head on cached"):
        Config(mixup=0.2, freeze_layer="backbone", pretrain_ckpt="x.ckpt")
    from src.config import load_config

    cfg = load_config(["--cutmix", "1.0", "--cutmix_prob", "0.5"])
    assert cfg.cutmix == 1.0 and cfg.mixup_prob == 0.5
