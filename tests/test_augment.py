"""auto_augment policies and random erasing: the grammar, determinism under the seed, and the erased area."""
from __future__ import annotations

import math

import numpy as np
import pytest

from src.config import Config
from src.data.augment import Policy, erase_batch, magnitude_weights, parse_policy, policy_transform
from src.errors import UserError


@pytest.mark.parametrize("text,policy", [
    ("autoaug", Policy("autoaug")),
    ("trivialaugwide", Policy("trivialaugwide")),
    ("randaug-m9", Policy("randaug", 9, 2, 0.0)),
    ("randaug-m9-mstd0.5-inc1", Policy("randaug", 9, 2, 0.5)),
    ("RandAug-m7-n3-mstd1", Policy("randaug", 7, 3, 1.0)),
    ("rand-m9-mstd0.5", Policy("randaug", 9, 2, 0.5)),  # timm's spelling
    ("imagenet", Policy("autoaug")),  # torchvision's --auto-augment names
    ("ta_wide", Policy("trivialaugwide")),
])
def test_policy_strings_parse(text, policy):
    assert parse_policy(text) == policy


@pytest.mark.parametrize("text,message", [
    ("randaug", "has no magnitude"),
    ("randaug-m11", "m must be 0..10"),
    ("randaug-m9-x3", "'x' is not a part"),
    ("randaug-m9-m7", "'m' is repeated"),
    ("randaug-m9-inc0", "inc0 (timm's non-increasing posterize/solarize) is not what MindSpore's RandAugment does"),
    ("randaug-n2", "use autoaug (ImageNet AutoAugment; torchvision's imagenet), randaug-mM[-nN][-mstdS][-inc1]"),
    ("ra", "use autoaug"),  # torchvision's RandAugment counts magnitude in 31 bins: not timm's 0..10
    ("augmix", "use autoaug"),
])
def test_malformed_policies_are_refused_naming_the_grammar(text, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        parse_policy(text)
    with pytest.raises(UserError, match="--auto_augment"):
        Config(auto_augment=text)


def test_magnitude_noise_is_a_clipped_rounded_normal():
    w = magnitude_weights(9, 0.5)
    assert sum(w) == pytest.approx(1.0) and w[9] == pytest.approx(0.6827, abs=1e-3)
    assert w[10] == pytest.approx(1 - 0.5 * (1 + math.erf(1 / np.sqrt(2))), abs=1e-3)  # above 9.5, clipped to 10
    assert magnitude_weights(4, 0.0) == [1.0 if i == 4 else 0.0 for i in range(11)]


def _mapped(images: np.ndarray, transform, seed: int) -> np.ndarray:
    import mindspore.dataset as ds

    ds.config.set_seed(seed)
    data = ds.NumpySlicesDataset({"image": images}, shuffle=False).map([transform], input_columns="image")
    return np.stack([row["image"] for row in data.create_dict_iterator(output_numpy=True)])


@pytest.mark.parametrize("text", ["autoaug", "randaug-m9-mstd0.5-inc1", "trivialaugwide"])
def test_each_policy_changes_images_deterministically_under_the_seed(text):
    images = np.random.default_rng(0).integers(0, 256, (4, 48, 48, 3), dtype=np.uint8)
    first = _mapped(images, policy_transform(parse_policy(text)), seed=1)
    assert first.shape == images.shape and first.dtype == np.uint8
    assert (first != images).mean() > 0.1  # the images changed
    np.testing.assert_array_equal(_mapped(images, policy_transform(parse_policy(text)), seed=1), first)
    assert not np.array_equal(_mapped(images, policy_transform(parse_policy(text)), seed=2), first)


def test_random_erasing_covers_the_requested_area_on_average():
    """Area drawn uniformly from 0.02..1/3 of the image: a mean of (0.02 + 1/3) / 2 = 0.177; prob 0.5 halves it."""
    images = np.ones((300, 3, 32, 32), np.float32)
    erased = 1 - (erase_batch(images.copy(), 1.0, np.random.default_rng(0)) == 1).mean(axis=(1, 2, 3))
    assert erased.min() > 0 and erased.max() <= 1 / 3 + 0.02
    assert erased.mean() == pytest.approx(0.177, abs=0.015)
    half = 1 - (erase_batch(images.copy(), 0.5, np.random.default_rng(0)) == 1).mean(axis=(1, 2, 3))
    assert (half == 0).mean() == pytest.approx(0.5, abs=0.1) and half.mean() == pytest.approx(0.088, abs=0.02)
    box = erase_batch(images.copy(), 1.0, np.random.default_rng(1))[0] == 0  # one rectangle, all channels
    rows, cols = np.flatnonzero(box[0].any(1)), np.flatnonzero(box[0].any(0))
    assert box[0, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all() and (box == box[0]).all()


def test_the_train_pipeline_erases_and_mixes_alike_under_one_seed_with_parallel_workers(tmp_path):
    """MindSpore's RandomErasing draws from Python's global `random`, shared by the pipeline's threads in whatever
    order they run: one seed gave other batches. The batch op draws from a generator of its own per batch."""
    from conftest import make_imagefolder

    from src.data.checks import check_dataset
    from src.data.pipeline import create_dataset

    data = make_imagefolder(tmp_path / "data", classes=("a", "b", "c", "d"), per_class=(16, 2), size=(24, 24))

    def batches(**keys):
        cfg = Config(dataset_path=str(data), num_classes=4, image_size=24, batch_size=8, num_parallel_workers=2,
                     re_prob=0.5, **keys)
        source = check_dataset(cfg, need_train=True, need_val=False)
        import mindspore.dataset as ds

        ds.config.set_seed(cfg.seed)
        iterator = create_dataset(cfg, source, training=True).create_tuple_iterator(output_numpy=True, num_epochs=1)
        return [(image.copy(), label.copy()) for image, label in iterator]

    for keys in ({}, {"mixup": 0.4, "cutmix": 1.0}):
        first, second = batches(**keys), batches(**keys)
        assert len(first) == 8
        for (a, la), (b, lb) in zip(first, second):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(la, lb)
        assert any((image == 0).all(axis=1).any() for image, _ in first)  # some pixels were erased
    assert not all(np.array_equal(a, b) for (a, _), (b, _) in zip(batches(), batches(seed=2)))
