"""Data as users hold it: PaddleClas label lists, CSV label tables, MindRecord shards; class weights and balanced
sampling. The same images read by every reader give the same tensors."""
from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import RESULT_LINE, TINY_NET, run_cli, write_image

from src.config import Config
from src.data.checks import check_dataset
from src.data.mindrecord import write_dataset
from src.data.sampler import BalancedSampler, epoch_draw
from src.engine.loss import class_weights
from src.errors import UserError


def _rows(root: Path, split: str) -> list[tuple[str, int, str]]:
    """(path relative to root, label, class name) of an image folder's split, in ImageFolderDataset's order."""
    rows = []
    for label, name in enumerate(sorted(p.name for p in (root / split).iterdir())):
        rows += [(f"{split}/{name}/{f.name}", label, name) for f in sorted((root / split / name).iterdir())]
    return rows


def _all_formats(root: Path) -> Path:
    """The tiny image folder plus its label lists, CSVs (class names) and MindRecord shards (under root/mr)."""
    for split, count in (("train", 8), ("val", 4)):  # each image one grey level of its own: its identity
        for ci, name in enumerate(("cat", "dog")):
            for i in range(count):
                level = 10 + 7 * (ci * count + i) + (3 if split == "val" else 0)
                write_image(root / split / name / f"{i}.png", size=(16, 16), value=level)
    for split in ("train", "val"):
        rows = _rows(root, split)
        (root / f"{split}_list.txt").write_text("".join(f"{p} {label}\n" for p, label, _ in rows))
        with open(root / f"{split}.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["file_name", "label"])
            writer.writerows((p, name) for p, _, name in rows)
    write_dataset(root / "mr", {split: [(root / p, label) for p, label, _ in _rows(root, split)]
                                for split in ("train", "val")}, ["cat", "dog"], None, "test")
    return root


@pytest.fixture(scope="module")
def formats(tmp_path_factory) -> Path:
    return _all_formats(tmp_path_factory.mktemp("formats") / "data")


def _cfg(root: Path, dataset: str, **kw) -> Config:
    path = root / "mr" if dataset == "mindrecord" else root
    return Config(dataset=dataset, dataset_path=str(path), num_classes=2, image_size=32,
                  num_parallel_workers=1, **{"batch_size": 4, **kw})


def _batches(cfg: Config, training: bool, **kw) -> list[tuple[np.ndarray, np.ndarray]]:
    import mindspore.dataset as ds

    from src.data.pipeline import create_dataset

    ds.config.set_seed(cfg.seed)
    source = check_dataset(cfg)
    data = create_dataset(cfg, source, training=training, **kw)
    return [(x, y) for x, y in data.create_tuple_iterator(output_numpy=True, num_epochs=1)]


@pytest.mark.parametrize("dataset", ["list", "csv"])
def test_label_files_read_the_folder_s_images_into_identical_batches(formats, dataset):
    """The readers agree: the same seed gives the same augmented train batches and the same val batches."""
    for training in (True, False):
        folder = _batches(_cfg(formats, "imagefolder"), training)
        other = _batches(_cfg(formats, dataset), training)
        assert len(folder) == len(other) == (4 if training else 2)
        for (x1, y1), (x2, y2) in zip(folder, other):
            np.testing.assert_array_equal(y1, y2)
            np.testing.assert_array_equal(x1, x2)
    source = check_dataset(_cfg(formats, dataset))
    assert source.class_names == (["cat", "dog"] if dataset == "csv" else ["0", "1"])
    assert source.train.class_counts == (8, 8) and source.val.num_images == 8


def test_mindrecord_holds_the_same_images_and_shards_them_across_ranks(formats):
    """Val batches equal the folder's; two ranks' training epochs are disjoint halves that together are the split
    (in MindDataset's own order)."""
    folder = _batches(_cfg(formats, "imagefolder"), False)
    shards = _batches(_cfg(formats, "mindrecord"), False)
    for (x1, y1), (x2, y2) in zip(folder, shards, strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    source = check_dataset(_cfg(formats, "mindrecord"))
    assert source.class_names == ["cat", "dog"] and source.train.class_counts == (8, 8)
    cfg = _cfg(formats, "mindrecord", batch_size=1)
    per_rank = [{round(float(x[0, 0, 0, 0]), 4) for x, _ in _batches(cfg, True, num_shards=2, shard_id=rank)}
                for rank in (0, 1)]  # (any crop of a one-level image has its level)
    assert len(per_rank[0]) == len(per_rank[1]) == 8 and len(per_rank[0] | per_rank[1]) == 16


def test_a_flat_val_folder_with_a_list_evaluates_with_class_names(trained, tmp_path):
    """ImageNet's val/ as published: all images in one folder and a label file; the class names come from a
    PaddleClas class_id_map file and reach per_class.csv."""
    data = tmp_path / "flat"
    lines = []
    for label, name in enumerate(("cat", "dog")):
        for f in sorted((trained.data / "val" / name).iterdir()):
            (data / "val").mkdir(parents=True, exist_ok=True)
            (data / "val" / f"{name} {f.name}").write_bytes(f.read_bytes())  # a space in the file name
            lines.append(f"val/{name} {f.name}\t{label}")
    (data / "val_list.txt").write_text("\r\n".join(lines) + "\r\n")
    (data / "labels.txt").write_text("0 cat\n1 dog\n")
    best = re.search(r"^best val top1: (\d\.\d{4})", trained.proc.stdout, re.M).group(1)  # on the class folders
    listed = run_cli("eval.py", "--dataset", "list", "--dataset_path", str(data), "--class_names", "labels.txt",
                     "--output_path", str(tmp_path / "b"), "--pretrain_ckpt",
                     str(trained.out / "checkpoint" / "best.ckpt"), *TINY_NET)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert RESULT_LINE.search(listed.stdout).group(1) == best
    rows = list(csv.DictReader(open(tmp_path / "b" / "per_class.csv")))
    assert [r["class"] for r in rows] == ["cat", "dog"] and [r["images"] for r in rows] == ["3", "3"]
    assert "differ from the classes" not in listed.stdout + listed.stderr
    # a val CSV alone, labels as names, no class_names file and no train CSV: the checkpoint's classes number them
    (data / "val" / "labels.csv").write_text("file_name,label\n" + "".join(
        f"{line.split(chr(9))[0][4:]},{'cat' if line.endswith('0') else 'dog'}\n" for line in reversed(lines)))
    table = run_cli("eval.py", "--dataset", "csv", "--dataset_path", str(data), "--val_csv", "val/labels.csv",
                    "--output_path", str(tmp_path / "c"), "--pretrain_ckpt",
                    str(trained.out / "checkpoint" / "best.ckpt"), *TINY_NET)
    assert table.returncode == 0, table.stderr[-2000:]
    assert RESULT_LINE.search(table.stdout).group(1) == best


def _list_error(root: Path, text: str, **kw) -> str:
    (root / "train_list.txt").write_text(text)
    with pytest.raises(UserError) as info:
        check_dataset(Config(dataset="list", dataset_path=str(root), num_classes=2, **kw), need_val=False)
    return str(info.value)


def test_label_list_mistakes_are_one_line_naming_the_file_and_line(tmp_path):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b c.png")
    listed = tmp_path / "train_list.txt"
    assert re.search(rf"{re.escape(str(listed))} line 2: .*missing\.png does not exist and 1 more",
                     _list_error(tmp_path, "a.png 0\nmissing.png 1\n\nother.png 0\n"))
    assert "line 2: label 2 is out of range for 2 classes" in _list_error(tmp_path, "a.png 0\nb c.png 2\n")
    assert "line 1: label '-1' is not an integer" in _list_error(tmp_path, "a.png -1\n")
    assert "line 1: label '0,1' is not an integer from 0 (one label per image; multi-label" in \
        _list_error(tmp_path, "a.png 0,1\n")
    assert "line 3: ./a.png is listed again (first at line 1" in \
        _list_error(tmp_path, "a.png 0\nb c.png 1\n./a.png 1\n")
    assert "line 1: 'a.png' is not 'relative/path.jpg label'" in _list_error(tmp_path, "a.png\n")
    assert "notes.txt is not a .jpg/.jpeg/.png/.bmp file" in _list_error(tmp_path, "notes.txt 0\n")
    assert "lists no images" in _list_error(tmp_path, "\n\n")
    (tmp_path / "n.txt").write_text("x\ny\nz\n")
    assert "the class_names file lists 3 classes but num_classes is 2 (pass --num_classes 3)" in \
        _list_error(tmp_path, "a.png 0\n", class_names=str(tmp_path / "n.txt"))
    (tmp_path / "n.txt").write_text("x\nx\n")
    assert "line 2: class name 'x' repeats line 1" in _list_error(tmp_path, "a.png 0\n", class_names="n.txt")
    # a good list: a space inside the path (the label is the last field), a class without images warned about
    (tmp_path / "train_list.txt").write_text("\ufeffa.png 0\r\nb c.png  0\r\n")
    source = check_dataset(Config(dataset="list", dataset_path=str(tmp_path), num_classes=2), need_val=False)
    assert [(p.name, label) for p, label in source.train.samples] == [("a.png", 0), ("b c.png", 0)]
    assert not source.named and source.train.class_counts == (2, 0)


def test_csv_mistakes_and_label_kinds(tmp_path):
    write_image(tmp_path / "imgs" / "a.png")
    write_image(tmp_path / "imgs" / "b.png")
    table = tmp_path / "imgs" / "train.csv"

    def source(text: str, **kw):
        table.write_text(text)
        return check_dataset(Config(dataset="csv", dataset_path=str(tmp_path), train_csv="imgs/train.csv",
                                    **{"num_classes": 2, **kw}), need_val=False)

    names = source('file_name,label,extra\n"a.png",dog,1\nb.png,"cat"\n')  # paths relative to the CSV's folder
    assert names.class_names == ["cat", "dog"] and [s[1] for s in names.train.samples] == [1, 0]
    assert source("file_name,label\na.png,1\nb.png,0\n").class_names == ["0", "1"]
    (tmp_path / "names.txt").write_text("dog\ncat\n")
    assert [s[1] for s in source("file_name,label\na.png,dog\n", class_names="names.txt").train.samples] == [0]
    (tmp_path / "names.txt").write_text("dog\ncat\n")
    for text, message, kw in [
        ("image,label\na.png,dog\n", "has no column 'file_name' (name the columns with --csv_image_column", {}),
        ("file_name,label\na.png,dog\nb.png,cat\n", "has 2 classes (cat, dog) but num_classes is 3 (pass "
         "--num_classes 2)", {"num_classes": 3}),
        ("file_name,label\na.png,bird\n", "row 2: label 'bird' is not one of the 2 classes (dog, cat; the "
         "class_names file", {"class_names": "names.txt"}),
        ("file_name,label\nc.png,dog\nb.png,cat\n", f"row 2: {tmp_path / 'imgs' / 'c.png'} does not exist (paths "
         f"are relative to {tmp_path / 'imgs'})", {}),
    ]:
        with pytest.raises(UserError, match=re.escape(message)):
            source(text, **kw)


def _damaged(formats: Path, tmp_path: Path) -> Path:
    import shutil

    copy = tmp_path / "mr"
    shutil.copytree(formats / "mr", copy)
    return copy


def test_damaged_mindrecord_shards_are_named_before_compile(formats, tmp_path):
    def error(root: Path) -> str:
        with pytest.raises(UserError) as info:
            check_dataset(Config(dataset="mindrecord", dataset_path=str(root), num_classes=2))
        return str(info.value)

    root = _damaged(formats, tmp_path)
    shard = root / "train" / "train.mindrecord"
    size = shard.stat().st_size
    with open(shard, "r+b") as fh:
        fh.truncate(size - 100)
    assert f"{shard} is truncated ({size - 100} bytes, its header says {size})" in error(root)
    shard.write_bytes(b"\x00" * 64)
    assert f"{shard} is not a MindRecord shard (no header" in error(root)
    root = _damaged(formats, tmp_path / "2")
    (root / "val" / "val.mindrecord.db").unlink()
    assert "val.mindrecord.db is missing (MindSpore reads each shard with the .db index" in error(root)
    assert "hold 2 classes but num_classes is 3 (pass --num_classes 2)" in \
        str(pytest.raises(UserError, check_dataset, Config(dataset="mindrecord", dataset_path=str(formats / "mr"),
                                                            num_classes=3)).value)


def test_balanced_sampling_draws_classes_equally_per_epoch_and_rank():
    labels = np.array([0] * 900 + [1] * 100)
    draws = epoch_draw(labels, seed=1, epoch=0, rank=0, ranks=1)
    assert len(draws) == 1000 and abs(np.mean(labels[draws]) - 0.5) < 0.05  # 9:1 -> 50/50
    assert len(np.unique(draws[labels[draws] == 1])) > 90  # with replacement, most of the rare class each epoch
    np.testing.assert_array_equal(draws, epoch_draw(labels, 1, 0, 0, 1))  # deterministic
    assert not np.array_equal(draws, epoch_draw(labels, 1, 1, 0, 1))  # a new draw every epoch
    rank0, rank1 = epoch_draw(labels, 1, 0, 0, 2), epoch_draw(labels, 1, 0, 1, 2)
    assert len(rank0) == len(rank1) == 500 and not np.array_equal(rank0, rank1)  # each rank its own images
    sampler = BalancedSampler(labels, 1)  # one epoch per call
    assert list(iter(sampler)) == draws.tolist() and list(iter(sampler)) == epoch_draw(labels, 1, 1, 0, 1).tolist()


def test_balanced_sampling_in_the_pipeline(formats):
    """A pipeline's epochs draw anew, and a resumed run's pipeline (fast or exact) draws the epochs the run would
    have drawn."""
    import mindspore.dataset as ds

    from src.data.pipeline import create_dataset, resume_at

    cfg = _cfg(formats, "imagefolder", sampler="balanced", random_flip=0.0, batch_size=1)
    source = check_dataset(cfg)

    def epochs(done: int, count: int, exact: bool = False) -> list[list[float]]:
        ds.config.set_seed(cfg.seed)
        data = create_dataset(cfg, source, training=True)
        if done:
            resume_at(data, done, exact)
        iterator = data.create_tuple_iterator(output_numpy=True, num_epochs=done + count)  # (the run's, as Model's)
        return [[round(float(x[0, 0, 0, 0]), 4) for x, _ in iterator] for _ in range(count)]

    run = epochs(0, 3)
    assert all(len(epoch) == 16 for epoch in run) and run[0] != run[1] != run[2]
    assert epochs(1, 2) == run[1:] and epochs(1, 2, exact=True) == run[1:]


def test_class_weights_weigh_samples_as_keras_class_weight():
    """A sample of class c counts w_c times, its (smoothed, mixed) target unchanged; the mean is over the batch."""
    import mindspore as ms
    import torch

    from src.engine.loss import CrossEntropySmooth

    logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-0.5, 1.5, 0.0], [1.0, 1.0, 1.0]], np.float32)
    labels = np.array([0, 2, 1, 2], np.int32)
    weights = np.array([1.0, 3.0, 0.5], np.float32)

    def ours(smooth: float, target) -> float:
        return float(CrossEntropySmooth(3, smooth, weights)(ms.Tensor(logits), ms.Tensor(target)).asnumpy())

    def torch_ce(target: np.ndarray) -> torch.Tensor:  # per sample, probability targets
        return torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(target), reduction="none")

    one_hot = np.eye(3, dtype=np.float32)[labels]
    np.testing.assert_allclose(ours(0.0, labels), float((torch_ce(one_hot) * torch.tensor(weights[labels])).mean()),
                               rtol=1e-5)
    all_b = np.array([1, 1, 1, 1], np.int32)  # a batch of one class: the loss times that class's weight
    plain = float(CrossEntropySmooth(3, 0.1)(ms.Tensor(logits), ms.Tensor(all_b)).asnumpy())
    np.testing.assert_allclose(ours(0.1, all_b), 3.0 * plain, rtol=1e-5)
    smooth = np.full((4, 3), 0.1 / 2, np.float32)  # the ModelZoo's smoothing: on 0.9, off 0.05
    smooth[np.arange(4), labels] = 0.9
    expected = (torch_ce(smooth) * torch.tensor(weights[labels])).mean()
    np.testing.assert_allclose(ours(0.1, labels), float(expected), rtol=1e-5)
    np.testing.assert_allclose(ours(0.1, smooth), float(expected), rtol=1e-5)  # the same as soft targets
    # a mixed sample (mixup's targets: smoothed rows mixed) weighs lam x w_a + (1 - lam) x w_b
    mixed = 0.3 * smooth + 0.7 * smooth[[1, 2, 3, 0]]
    mixed_weight = 0.3 * weights[labels] + 0.7 * weights[labels[[1, 2, 3, 0]]]
    np.testing.assert_allclose(ours(0.1, mixed), float((torch_ce(mixed) * torch.tensor(mixed_weight)).mean()),
                               rtol=1e-5)
    # the gradient too
    t_logits = torch.tensor(logits, requires_grad=True)
    (torch.nn.functional.cross_entropy(t_logits, torch.tensor(smooth), reduction="none")
     * torch.tensor(weights[labels])).mean().backward()
    grad = ms.grad(CrossEntropySmooth(3, 0.1, weights))(ms.Tensor(logits), ms.Tensor(labels)).asnumpy()
    np.testing.assert_allclose(grad, t_logits.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_class_weights_values(tmp_path):
    names = ["a", "b", "c"]
    np.testing.assert_allclose(class_weights("balanced", (90, 9, 1), names), [100 / 270, 100 / 27, 100 / 3])
    assert class_weights("none", (1, 1, 1), names) is None
    np.testing.assert_allclose(class_weights("1,2.5,0", (1, 1, 1), names), [1, 2.5, 0])
    (tmp_path / "w.txt").write_text("c 4\na 1\nb 2\n")
    np.testing.assert_allclose(class_weights(str(tmp_path / "w.txt"), (1, 1, 1), names), [1, 2, 4])
    for text, message in [("1,2", "has 2 weights for 3 classes"), ("1,-1,1", "at least 0"),
                          ("weights.txt", "no such file"), ("1,x,1", "got '1,x,1'")]:
        with pytest.raises(UserError, match=message):
            class_weights(text, (1, 1, 1), names)
    with pytest.raises(UserError, match="classes c have no train images"):
        class_weights("balanced", (2, 1, 0), names)
    with pytest.raises(UserError, match="--sampler balanced draws any image at any time"):
        Config(dataset="mindrecord", sampler="balanced")
    with pytest.raises(UserError, match="--train_csv applies to --dataset csv, not list"):
        Config(dataset="list", train_csv="x.csv")


def test_csv_label_kinds_are_one_per_file_and_val_follows_train(tmp_path):
    for name in ("a", "b", "c"):
        write_image(tmp_path / f"{name}.png")

    def error(train: str, val: str | None = None, **kw) -> str:
        (tmp_path / "train.csv").write_text(train)
        if val is not None:
            (tmp_path / "val.csv").write_text(val)
        with pytest.raises(UserError) as info:
            check_dataset(Config(dataset="csv", dataset_path=str(tmp_path), num_classes=2, **kw),
                          need_val=val is not None)
        return str(info.value)

    assert "row 3: the label is empty" in error("file_name,label\na.png,cat\nb.png,\n")
    assert "row 4: label '1' is an integer, but most labels are names" in \
        error("file_name,label\na.png,cat\nb.png,dog\nc.png,1\n")
    # integer train labels, name val labels: each would be numbered its own way, so the val labels would be wrong
    assert "val.csv row 2: label 'cat' is a name but the train labels are integers" in \
        error("file_name,label\na.png,0\nb.png,1\n", "file_name,label\nc.png,cat\n")
    assert "row 2: label 'bird' is not one of the 2 classes (cat, dog; the train labels' classes)" in \
        error("file_name,label\na.png,cat\nb.png,dog\n", "file_name,label\nc.png,bird\n")
    (tmp_path / "latin.csv").write_bytes("file_name,label\na.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="latin.csv is not UTF-8 text"):
        check_dataset(Config(dataset="csv", dataset_path=str(tmp_path), train_csv="latin.csv"), need_val=False)


def test_label_list_edge_cases(tmp_path):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png")
    assert "line 2: label '²' is not an integer" in _list_error(tmp_path, "a.png 0\nb.png ²\n")
    assert f"line 2: {tmp_path / 'a.png'} is listed again (first at line 1" in \
        _list_error(tmp_path, f"a.png 0\n{tmp_path / 'a.png'} 1\n")
    (tmp_path / "ids.txt").write_text("1 cat\n2 dog\n")
    assert "ids.txt line 1: the lines are 'id name' but this id is 1, not 0" in \
        _list_error(tmp_path, "a.png 0\n", class_names="ids.txt")
    (tmp_path / "train_list.txt").write_text("a.png 0\nb.png 1\n")
    (tmp_path / "val_list.txt").write_text("b.png 1\n")
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("train").addHandler(handler)
    try:
        check_dataset(Config(dataset="list", dataset_path=str(tmp_path), num_classes=2))
    finally:
        logging.getLogger("train").removeHandler(handler)
    assert any("1 val images are also train images" in r.getMessage() for r in records)


def test_the_converter_never_replaces_what_it_did_not_write_and_converts_as_one_unit(formats, tmp_path, monkeypatch):
    import shutil

    import src.data.mindrecord as mindrecord

    samples = {"train": [(formats / p, label) for p, label, _ in _rows(formats, "train")],
               "val": [(formats / p, label) for p, label, _ in _rows(formats, "val")]}
    photos = tmp_path / "photos"
    shutil.copytree(formats / "train", photos / "train")
    with pytest.raises(UserError, match="photos/train exists and is not a shard set of tools/convert_to_mindrecord"):
        mindrecord.write_dataset(photos, samples, ["cat", "dog"], None, "test")
    assert len(list((photos / "train").rglob("*.png"))) == 16  # the images are still there
    out = tmp_path / "mr"
    mindrecord.write_dataset(out, samples, ["cat", "dog"], None, "first")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real = mindrecord._write_split

    def dies_on_val(folder, split, *args):
        real(folder, split, *args)
        if split == "val":
            raise KeyboardInterrupt  # an interruption after both splits' shards, before the swap

    monkeypatch.setattr(mindrecord, "_write_split", dies_on_val)
    with pytest.raises(KeyboardInterrupt):
        mindrecord.write_dataset(out, samples, ["cat", "dog"], None, "second")
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # as it was, nothing left over
    # a killed conversion's hidden folder (its process gone) is removed by the next one
    (out / ".train.converting-999999999").mkdir()
    mindrecord.write_dataset(out, {"train": samples["train"]}, ["cat", "dog"], None, "train only")
    assert sorted(p.name for p in out.iterdir()) == ["train"]  # the old val (another conversion) went with it
    # a val of another conversion beside this train is refused
    mindrecord.write_dataset(tmp_path / "other", samples, ["cat", "dog"], None, "other")
    shutil.copytree(tmp_path / "other" / "val", out / "val")
    with pytest.raises(UserError, match="val's shards come from another conversion than train/'s"):
        check_dataset(Config(dataset="mindrecord", dataset_path=str(out), num_classes=2))


def test_damaged_mindrecord_indexes_are_named_before_compile(formats, tmp_path):
    import sqlite3

    from src.data.pipeline import pipeline_error

    root = _damaged(formats, tmp_path)
    index = root / "val" / "val.mindrecord.db"
    with open(index, "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(UserError, match=f"{re.escape(str(index))} is damaged .*copy it again with its shard"):
        check_dataset(Config(dataset="mindrecord", dataset_path=str(root), num_classes=2))
    root = _damaged(formats, tmp_path / "2")
    with sqlite3.connect(root / "train" / "train.mindrecord.db") as db:
        db.execute("UPDATE INDEXES SET label_0 = 7 WHERE ROW_ID = 3")
    with pytest.raises(UserError, match=r"train index labels \[7\] beyond the 2 classes .*convert again"):
        check_dataset(Config(dataset="mindrecord", dataset_path=str(root), num_classes=2))
    line = pipeline_error(RuntimeError("Dataset Pipeline Error Message: [ERROR] Invalid data, bad blob."), 2, 5,
                          "mindrecord")
    assert line.startswith("a record of the MindRecord shards cannot be read at epoch 2 step 5: Invalid data") and \
        "convert the data again" in line


def test_a_conversion_killed_in_its_swap_is_rolled_back_and_a_failed_swap_undone(formats, tmp_path, monkeypatch):
    import os
    import shutil

    import src.data.mindrecord as mindrecord

    samples = {split: [(formats / p, label) for p, label, _ in _rows(formats, split)] for split in ("train", "val")}
    out = tmp_path / "mr"
    mindrecord.write_dataset(out, samples, ["cat", "dog"], None, "first")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # a swap that fails at the last rename puts the earlier folders back
    real_rename = Path.rename

    def failing(self, target):
        if Path(target) == out / "val" and ".converting-" in self.name and not self.name.endswith("-old"):
            raise OSError(28, "No space left on device")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError):
        mindrecord.write_dataset(out, samples, ["cat", "dog"], None, "second")
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # SIGKILL inside the swap: the old folders aside, the new train in place; the next conversion rolls back first
    dead = 2 ** 22 + 12345
    with pytest.raises(ProcessLookupError):
        os.kill(dead, 0)
    for split in ("train", "val"):
        (out / split).rename(out / f".{split}.converting-{dead}-old")
    shutil.copytree(formats / "mr" / "train", out / "train")  # "new"
    mindrecord._recover(out)
    assert sorted(p.name for p in out.iterdir()) == ["train", "val"]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    check_dataset(Config(dataset="mindrecord", dataset_path=str(out), num_classes=2))


def test_shards_of_a_label_list_without_names_keep_them_unnamed(formats, tmp_path):
    from src.data.mindrecord import write_dataset

    samples = {"train": [(formats / p, label) for p, label, _ in _rows(formats, "train")]}
    write_dataset(tmp_path / "mr", samples, ["0", "1"], None, "list", named=False)
    source = check_dataset(Config(dataset="mindrecord", dataset_path=str(tmp_path / "mr"), num_classes=2),
                           need_val=False)
    assert not source.named and source.class_names == ["0", "1"]


def test_the_balanced_sampler_s_view_of_a_folder_is_imagefolderdataset_s_order(tmp_path):
    """--sampler balanced reads a class folder through its own list: the same files, in MindSpore's order (mixed-case
    extensions, hidden files and upper-case names included)."""
    import mindspore.dataset as ds

    from src.data.pipeline import random_access

    names = {"cat": ["b.png", "A.PNG", ".h.png", "c.jpg", "a.png"], "dog": ["Z.jpeg", "y.JPG"]}
    for index, (label, files) in enumerate(names.items()):
        for i, name in enumerate(files):
            write_image(tmp_path / "train" / label / name, fmt="JPEG" if "j" in name.lower() else "PNG",
                        value=20 * index + 3 * i + 5)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("x")
    cfg = Config(dataset_path=str(tmp_path), num_classes=2)
    source = check_dataset(cfg, need_val=False)
    split = source.train
    folder = ds.ImageFolderDataset(str(split.path), extensions=sorted(split.extensions), decode=False, shuffle=False,
                                   class_indexing={"cat": 0, "dog": 1})
    expected = [(bytes(x), int(y)) for x, y in folder.create_tuple_iterator(output_numpy=True, num_epochs=1)]
    ours = random_access(source, split)
    assert [(ours[i][0].tobytes(), int(ours[i][1])) for i in range(len(ours))] == expected and len(expected) == 7


def test_eval_csv_numbers_name_labels_by_the_checkpoint(tmp_path):
    write_image(tmp_path / "val" / "a.png")
    (tmp_path / "val.csv").write_text("file_name,label\nval/a.png,dog\n")
    (tmp_path / "train.csv").write_text("file_name,label\ntrain/missing.png,cat\ntrain/gone.png,dog\n")
    cfg = Config(dataset="csv", dataset_path=str(tmp_path), num_classes=2)
    source = check_dataset(cfg, need_train=False, known_names=["dog", "cat"])  # the train images are not needed
    assert source.class_names == ["dog", "cat"] and source.val.samples[0][1] == 0 and source.train is None
    assert check_dataset(cfg, need_train=False).class_names == ["cat", "dog"]  # no checkpoint names: the train CSV's
    (tmp_path / "names.txt").write_text("cat\ndog\n")
    with pytest.raises(UserError, match="the class_names file's classes .* are not the checkpoint's"):
        check_dataset(cfg.replace(class_names="names.txt"), need_train=False, known_names=["dog", "cat"])
    with pytest.raises(UserError, match="each counter the imbalance: together"):
        Config(class_weights="balanced", sampler="balanced")


def test_convert_to_mindrecord_as_users_run_it(tmp_path):
    from conftest import make_imagefolder

    data = make_imagefolder(tmp_path / "data")
    (data / "train_list.txt").write_text("".join(f"{p.relative_to(data)} {int(p.parent.name == 'dog')}\n"
                                                 for p in sorted((data / "train").rglob("*.png"))))
    (data / "val_list.txt").write_text("".join(f"{p.relative_to(data)} {int(p.parent.name == 'dog')}\n"
                                               for p in sorted((data / "val").rglob("*.png"))))
    out = tmp_path / "mr"
    proc = run_cli("tools/convert_to_mindrecord.py", "--dataset", "list", "--dataset_path", str(data),
                   "--output_dir", str(out), "--num_classes", "2", "--shard_size", "5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"converted: python train.py --dataset mindrecord --dataset_path {out} --num_classes 2" in proc.stdout
    source = check_dataset(Config(dataset="mindrecord", dataset_path=str(out), num_classes=2))
    assert len(source.train.shards) == 3 and source.train.num_images == 12 and not source.named
    refused = run_cli("tools/convert_to_mindrecord.py", "--dataset_path", str(data), "--output_dir", str(data),
                      "--num_classes", "2")
    assert refused.returncode == 2 and refused.stderr.startswith("error: ") and "Traceback" not in refused.stderr
    assert len(list((data / "train").rglob("*.png"))) == 12
