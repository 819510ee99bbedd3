"""Checkpoint loading with/without filter_head, mismatches, and the frozen-backbone feature cache."""
from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from conftest import TINY_TRAIN, make_imagefolder, run_cli, with_flags

from src.config import Config
from src.data.checks import check_dataset
from src.data.feature_cache import cache_key
from src.engine.checkpoint import read_checkpoint, save_checkpoint
from src.engine.layouts import read_weights
from src.engine.weights import load_pretrained, read_pretrained, warn_if_other_classes
from src.errors import UserError
from src.models import create_model

ms.set_context(mode=ms.GRAPH_MODE)
SMALL = {"model": "mobilenetv2", "width": 0.25}


def _save(tmp_path: Path, num_classes: int, meta: bool = True, extra: dict | None = None) -> Path:
    net = create_model("mobilenetv2", num_classes, 0.25)
    path = tmp_path / f"pre{num_classes}.ckpt"
    info = {"model": "mobilenetv2", "num_classes": num_classes, "width": 0.25,
            "class_names": [f"c{i}" for i in range(num_classes)]} if meta else {}
    if extra:
        params = [{"name": p.name, "data": p} for p in net.get_parameters()]
        params += [{"name": k, "data": ms.Tensor(v)} for k, v in extra.items()]
        save_checkpoint(params, path, info)
    else:
        save_checkpoint(net, path, info)
    return path


def _values(net) -> dict[str, np.ndarray]:
    return {p.name: p.asnumpy().copy() for p in net.get_parameters()}


def test_filter_head_drops_the_classifier_and_loads_the_rest(tmp_path):
    path = _save(tmp_path, 10, extra={"moments.head.1.weight": np.zeros((10, 1280), np.float32)})
    params, _ = read_checkpoint(path)
    net = create_model("mobilenetv2", 3, 0.25)
    before = _values(net)
    report = load_pretrained(net, read_weights(path, "pretrain_ckpt"), Config(num_classes=3, filter_head=True, **SMALL))
    after = _values(net)
    assert report.dropped == ["head.1.bias", "head.1.weight"]
    assert report.left_at_init == ["head.1.weight", "head.1.bias"]
    assert report.loaded == len(after) - 2
    for name, value in after.items():
        expected = before[name] if name.startswith("head.") else params[name].asnumpy()
        np.testing.assert_array_equal(value, expected, err_msg=name)


def test_same_classes_without_filter_loads_everything(tmp_path):
    path = _save(tmp_path, 3)
    params, _ = read_checkpoint(path)
    net = create_model("mobilenetv2", 3, 0.25)
    report = load_pretrained(net, read_weights(path, "pretrain_ckpt"), Config(num_classes=3, **SMALL))
    assert report.left_at_init == [] and report.dropped == []
    np.testing.assert_array_equal(_values(net)["head.1.weight"], params["head.1.weight"].asnumpy())


def test_other_classes_of_the_same_count_warn_naming_filter_head(tmp_path, caplog):
    path = _save(tmp_path, 3)  # classes c0, c1, c2
    meta = read_checkpoint(path)[1]
    cfg = Config(num_classes=3, pretrain_ckpt=str(path), **SMALL)
    with caplog.at_level("WARNING", logger="train"):
        assert not warn_if_other_classes(meta, ["c0", "c1", "c2"], path, cfg)
        assert not warn_if_other_classes(meta, ["ant", "bee", "cat"], path, Config(**{**cfg.to_dict(),
                                                                                      "filter_head": True}))
        assert not caplog.text
        assert warn_if_other_classes(meta, ["ant", "bee", "cat"], path, cfg)
    assert (f"pretrain_ckpt {path} was trained on other classes (c0, c1, c2) than this data set's (ant, "
            "bee, cat): its classifier is reused as it is, so pass --filter_head True to train a new one"
            ) in caplog.text


def test_class_mismatch_without_filter_head_suggests_it(tmp_path):
    path = _save(tmp_path, 10)
    with pytest.raises(UserError, match=r"has a 10-class classifier but num_classes is 3 \(pass --filter_head True"):
        read_pretrained(Config(num_classes=3, pretrain_ckpt=str(path), **SMALL))
    read_pretrained(Config(num_classes=3, pretrain_ckpt=str(path), filter_head=True, **SMALL))


def test_foreign_checkpoint_shape_mismatch_names_the_parameter(tmp_path):
    """A ModelZoo-style checkpoint without our metadata: the shape check names the parameter."""
    path = _save(tmp_path, 10, meta=False)
    with pytest.raises(UserError, match=r"parameter head.1.weight has shape \(10, 1280\) but the net expects "
                                        r"\(3, 1280\) \(fine-tune onto other classes with --filter_head True"):
        load_pretrained(create_model("mobilenetv2", 3, 0.25), read_weights(path, "pretrain_ckpt"),
                        Config(num_classes=3, **SMALL))


def test_checkpoint_of_another_model_is_refused(tmp_path):
    path = _save(tmp_path, 3)
    with pytest.raises(UserError, match=r"was trained with model=mobilenetv2 but the config has model=resnet50"):
        read_pretrained(Config(model="resnet50", num_classes=3, pretrain_ckpt=str(path)))


def test_cache_key_follows_weights_data_and_preprocessing(tmp_path):
    data = make_imagefolder(tmp_path / "d")
    cfg = Config(dataset_path=str(data), num_classes=2, **SMALL)
    source = check_dataset(cfg)
    net = create_model("mobilenetv2", 2, 0.25)
    key = cache_key(cfg, source, net)
    assert cache_key(cfg, check_dataset(cfg), net) == key
    net.head.head[1].weight.set_data(ms.Tensor(np.ones((2, 1280), np.float32)))
    assert cache_key(cfg, source, net) == key  # the head does not change the features
    assert cache_key(Config(dataset_path=str(data), num_classes=2, image_size=48, **SMALL), source, net) != key
    img = next((data / "val" / "cat").iterdir())
    os.utime(img, ns=(0, 1))
    assert cache_key(cfg, check_dataset(cfg), net) != key
    weight = net.backbone.features[0].features[0].weight
    weight.set_data(weight + 1)
    assert cache_key(cfg, source, net) != key


TINY = with_flags(TINY_TRAIN, num_classes=3)


def test_frozen_backbone_trains_the_head_on_cached_features(tmp_path):
    data = make_imagefolder(tmp_path / "photos", classes=("a", "b", "c"), per_class=(4, 2))
    pretrained = _save(tmp_path, 10)
    out = tmp_path / "out"
    args = ["train.py", "--dataset_path", str(data), "--output_path", str(out),
            "--pretrain_ckpt", str(pretrained), "--filter_head", "True", "--freeze_layer", "backbone",
            "--epoch_size", "2", *TINY]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "dropped 2 classifier parameters (head.1.bias, head.1.weight)" in first.stdout
    assert "feature cache miss" in first.stdout and "head only, on cached backbone features" in first.stdout
    assert re.search(r"^epoch: 2 step: 3, loss is", first.stdout, re.M)
    best = out / "checkpoint" / "best.ckpt"
    params, meta = read_checkpoint(best)
    assert meta.num_classes == 3 and meta.class_names == ["a", "b", "c"]
    pre, _ = read_checkpoint(pretrained)
    conv = "features.0.features.0.weight"
    np.testing.assert_array_equal(params[conv].asnumpy(), pre[conv].asnumpy())  # backbone frozen and saved
    assert params["head.1.weight"].shape == (3, 1280)

    # the full-net checkpoint evaluates with eval.py to the accuracy measured on cached features
    evaluation = run_cli("eval.py", "--dataset_path", str(data), "--output_path", str(out), "--num_classes", "3",
                         *TINY)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    acc = float(re.search(r"'acc': (\d\.\d{4})", evaluation.stdout).group(1))
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert acc == pytest.approx(max(float(r["val_top1"]) for r in rows), abs=1e-4)

    second = run_cli(*args)
    assert second.returncode == 0 and "feature cache hit" in second.stdout, second.stderr[-3000:]
    os.utime(next((data / "train" / "a").iterdir()), ns=(0, 1))  # a changed data set is never served stale
    third = run_cli(*args)
    assert third.returncode == 0 and "feature cache miss" in third.stdout, third.stderr[-3000:]
    assert len(list((out / "feature_cache").glob("*.npz"))) == 2


def test_freeze_without_checkpoint_is_refused():
    with pytest.raises(UserError, match=r"--freeze_layer backbone needs --pretrain_ckpt"):
        Config(freeze_layer="backbone")
