"""Dataset layouts, the checks that run before compile, and what the pipelines produce."""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import make_imagefolder, write_image

from src.config import Config
from src.data.checks import CIFAR_RECORD, check_dataset
from src.data.pipeline import create_dataset
from src.errors import UserError


def _cfg(path: Path, **kw) -> Config:
    base = {"dataset_path": str(path), "num_classes": 2, "image_size": 16, "batch_size": 2, "num_parallel_workers": 1}
    return Config(**{**base, **kw})


def _batches(cfg, source, training, **kw):
    return list(create_dataset(cfg, source, training, **kw).create_tuple_iterator(output_numpy=True, num_epochs=1))


def test_imagefolder_train_and_val(tiny_folder):
    source = check_dataset(_cfg(tiny_folder))
    assert source.class_names == ["cat", "dog"]
    assert (source.train.num_images, source.val.num_images) == (12, 6)
    train = _batches(_cfg(tiny_folder), source, True)
    assert len(train) == 6 and train[0][0].shape == (2, 3, 16, 16) and train[0][0].dtype == np.float32
    assert train[0][1].dtype == np.int32
    val = _batches(_cfg(tiny_folder, batch_size=4), source, False)
    labels = np.concatenate([b[1] for b in val])
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]  # eval keeps the remainder batch


def test_grayscale_cmyk_jpeg_and_png_become_rgb(tmp_path):
    root = tmp_path / "mixed"
    write_image(root / "train" / "a" / "gray.png", mode="L")
    write_image(root / "train" / "a" / "cmyk.jpg", mode="CMYK", fmt="JPEG")
    write_image(root / "train" / "b" / "rgba.png", mode="RGBA")
    write_image(root / "train" / "b" / "rgb.JPEG", fmt="JPEG")
    for name in ("a", "b"):
        write_image(root / "val" / name / "x.png")
    cfg = _cfg(root, batch_size=1)
    source = check_dataset(cfg)
    assert source.train.num_images == 4
    images = [b[0] for b in _batches(cfg, source, True)]
    assert len(images) == 4 and all(i.shape == (1, 3, 16, 16) for i in images)


def test_cmyk_colours_match_pillow(tmp_path):
    from PIL import Image

    root = tmp_path / "c"
    write_image(root / "val" / "a" / "x.jpg", size=(16, 16), mode="CMYK", fmt="JPEG", value=60)
    write_image(root / "val" / "b" / "y.png", size=(16, 16), value=0)
    cfg = _cfg(root, batch_size=1, image_size=16)
    source = check_dataset(cfg, need_train=False)
    ours = _batches(cfg, source, False)[0][0][0]
    pil = np.asarray(Image.open(root / "val" / "a" / "x.jpg").convert("RGB"), np.float32)
    mean = np.array([0.485, 0.456, 0.406]) * 255
    std = np.array([0.229, 0.224, 0.225]) * 255
    expected = (pil.mean(axis=(0, 1)) - mean) / std
    np.testing.assert_allclose(ours.mean(axis=(1, 2)), expected, atol=0.05)


def test_validation_preprocess_folder_is_accepted(tmp_path):
    root = make_imagefolder(tmp_path / "d")
    (root / "val").rename(root / "validation_preprocess")
    assert check_dataset(_cfg(root)).val.path.name == "validation_preprocess"


def test_sharding_splits_the_train_set(tiny_folder):
    cfg = _cfg(tiny_folder, batch_size=1)
    source = check_dataset(cfg)
    shards = [_batches(cfg, source, True, num_shards=2, shard_id=i) for i in range(2)]
    assert [len(s) for s in shards] == [6, 6]


@pytest.mark.parametrize("setup,message", [
    (lambda r: r / "missing", r"dataset_path .*missing does not exist \(pass the folder that holds train/"),
    (lambda r: (r / "train").rename(r / "training") or r, r"has no train/ folder"),
    (lambda r: __import__("shutil").rmtree(r / "val") or r, r"has no val/ \(or validation_preprocess/\) folder"),
    (lambda r: (r / "train" / "bird").mkdir() or r, r"class folder .*train/bird has no images"),
    (lambda r: (r / "val" / "bird").mkdir() or r, r"val has class folders that train/ lacks: bird"),
    (lambda r: (r / "file").write_text("x") and r / "file",
     r"dataset_path .*file is a file, not a folder \(pass the folder that holds train/ and val/"),
    (lambda r: [p.unlink() for p in (r / "val").rglob("*.png")] and r,
     r"val has no images in its class folders \(add validation images, or train with --run_eval False\)"),
])
def test_layout_errors_say_how_to_fix(tiny_folder, setup, message):
    with pytest.raises(UserError, match=message):
        check_dataset(_cfg(setup(tiny_folder)))


def test_dataset_path_must_be_set():
    with pytest.raises(UserError, match=r"dataset_path is not set \(pass --dataset_path, the folder with your train/"):
        check_dataset(Config(dataset_path=""))


def test_class_count_must_equal_num_classes(tiny_folder):
    with pytest.raises(UserError, match=r"found 2 class folders in .*train but num_classes is 5 "
                                        r"\(pass --num_classes 2\)"):
        check_dataset(_cfg(tiny_folder, num_classes=5))


def test_corrupt_image_is_named(tiny_folder):
    bad = tiny_folder / "train" / "dog" / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(UserError, match=rf"{bad} is not a JPG image \(delete or re-encode the file\)"):
        check_dataset(_cfg(tiny_folder))


@pytest.mark.parametrize("name,fmt,why", [("cut.jpg", "JPEG", "no JPEG end-of-image marker"),
                                          ("cut.png", "PNG", "no PNG IEND chunk"),
                                          ("cut.bmp", "BMP", "shorter than its BMP header says")])
def test_truncated_image_is_named(tiny_folder, name, fmt, why):
    path = tiny_folder / "train" / "cat" / name
    write_image(path, size=(40, 40), fmt=fmt)
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    with pytest.raises(UserError, match=rf"{name} is truncated \({why}\)"):
        check_dataset(_cfg(tiny_folder))


def _photo_jpeg(size=(48, 64), seed=0) -> bytes:
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[0], 0:size[1]]
    arr = np.stack([(x * 3 + y) % 256, (y * 4) % 256, (x * 2 + 50) % 256], -1) + rng.normal(0, 10, (*size, 3))
    buffer = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _damaged(kind: str) -> tuple[str, bytes]:
    """Files whose signature and end marker look right but whose body is damaged (each crashed MindSpore after the
    graph compiled, or trained silently on invented pixels, before the decode check)."""
    import io

    from PIL import Image

    jpeg = _photo_jpeg()
    rng = np.random.default_rng(1)
    if kind == "cut_jpeg_with_end_marker":
        return "a.jpg", jpeg[: len(jpeg) // 2] + b"\xff\xd9"
    if kind == "garbage_jpeg_body":
        start = jpeg.index(b"\xff\xda") + 14
        garbage = rng.integers(0, 255, len(jpeg) - start - 2, dtype=np.uint8).tobytes().replace(b"\xff", b"\x00")
        return "b.jpg", jpeg[:start] + garbage + b"\xff\xd9"
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buffer, "PNG" if "png" in kind else "BMP")
    data = buffer.getvalue()
    if kind == "png_with_half_its_data_cut":
        end = data.rindex(b"IEND") - 4
        return "c.png", data[: end // 2] + data[end - 8:]
    bmp = bytearray(data)
    bmp[18:22] = (0).to_bytes(4, "little")  # width 0
    return "d.bmp", bytes(bmp)


@pytest.mark.parametrize("kind", ["cut_jpeg_with_end_marker", "garbage_jpeg_body", "png_with_half_its_data_cut",
                                  "bmp_of_width_0_bmp"])
def test_an_image_that_does_not_decode_is_named_before_training(tiny_folder, kind):
    name, data = _damaged(kind)
    (tiny_folder / "train" / "dog" / name).write_bytes(data)
    with pytest.raises(UserError, match=rf"train/dog/{re.escape(name)} (is damaged|cannot be decoded) \(.+\) "
                                        r"\(delete or re-encode the file\)$"):
        check_dataset(_cfg(tiny_folder))


def test_slightly_damaged_jpegs_train_with_a_warning_and_checks_are_cached(tiny_folder, caplog, monkeypatch):
    import src.data.image_check as image_check

    jpeg = _photo_jpeg()
    (tiny_folder / "train" / "cat" / "good.jpg").write_bytes(jpeg)
    (tiny_folder / "train" / "cat" / "junk.jpg").write_bytes(jpeg[:-2] + b"\xab\xcd" * 4 + b"\xff\xd9")  # stray bytes
    (tiny_folder / "train" / "cat" / "cmyk.jpg").write_bytes(b"")
    write_image(tiny_folder / "train" / "cat" / "cmyk.jpg", size=(20, 20), mode="CMYK", fmt="JPEG")
    decoded = []
    real = image_check.decode_problem
    monkeypatch.setattr(image_check, "decode_problem", lambda p: decoded.append(p) or real(p))
    with caplog.at_level("INFO", logger="train"):
        check_dataset(_cfg(tiny_folder))
    assert len(decoded) == 15 + 6  # every train and val image
    assert re.search(rf"{tiny_folder / 'train'}: 1 images are slightly damaged but decode, and train as decoded "
                     rf"\(e.g. {tiny_folder / 'train' / 'cat' / 'junk.jpg'}: Corrupt JPEG data: \d extraneous bytes "
                     r"before marker 0xd9\)", caplog.text)
    assert re.search(r"train: decoded 15 images to check them in [\d.]+ s \([\d.]+ s per 10,000 images", caplog.text)
    # a second check decodes nothing, and still warns; a changed file re-checks its own class folder only
    decoded.clear()
    caplog.clear()
    with caplog.at_level("INFO", logger="train"):
        check_dataset(_cfg(tiny_folder))
    assert decoded == [] and "1 images are slightly damaged" in caplog.text
    os.utime(tiny_folder / "train" / "dog" / "0.png", ns=(1, 1))
    check_dataset(_cfg(tiny_folder))
    assert sorted(p.name for p in decoded) == ["0.png", "1.png", "2.png", "3.png", "4.png", "5.png"]
    # eval needs only the val split decoded
    decoded.clear()
    (tiny_folder / "train" / "dog" / "0.png").write_bytes(_damaged("png_with_half_its_data_cut")[1])
    check_dataset(_cfg(tiny_folder), need_train=False)
    assert decoded == []


def test_a_symlink_loop_between_images_is_named(tiny_folder, caplog):
    a, b = tiny_folder / "train" / "cat" / "loop_a.jpg", tiny_folder / "train" / "cat" / "loop_b.jpg"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(UserError, match=r"loop_a.jpg cannot be opened \(Too many levels of symbolic links\) and 1 "
                                        r"more \(listed above\) \(delete or re-encode"):
        check_dataset(_cfg(tiny_folder))
    assert [r.getMessage().split(" cannot ")[0] for r in caplog.records if "damaged image" in r.getMessage()] == [
        f"damaged image: {a}", f"damaged image: {b}"]  # every one named, not just the first


def test_links_to_a_device_or_to_nothing_are_named_as_what_they_are(tiny_folder, tmp_path):
    """A link to /dev/zero was 'not found' (a checkpoint) or 'leads nowhere' (an image)."""
    from src.engine.checkpoint import read_checkpoint

    zero = tiny_folder / "train" / "cat" / "zero.jpg"
    zero.symlink_to("/dev/zero")
    with pytest.raises(UserError, match=r"zero.jpg is a link to /dev/zero, which is not a regular file \(delete or "):
        check_dataset(_cfg(tiny_folder))
    zero.unlink()
    zero.symlink_to(tmp_path / "gone.jpg")
    with pytest.raises(UserError, match=rf"zero.jpg is a symbolic link to {tmp_path}/gone.jpg, which does not "
                                        r"exist \(delete or "):
        check_dataset(_cfg(tiny_folder))
    (tmp_path / "z.ckpt").symlink_to("/dev/zero")
    with pytest.raises(UserError, match=r"^pretrain_ckpt \S+/z.ckpt is a link to /dev/zero, which is not a regular "
                                        r"file \(check the path"):
        read_checkpoint(tmp_path / "z.ckpt", "pretrain_ckpt")
    with pytest.raises(UserError, match=r"^pretrain_ckpt \S+ is a folder \(check the path"):
        read_checkpoint(tmp_path, "pretrain_ckpt")


def test_macos_metadata_files_are_checked_as_the_reader_would_read_them(tiny_folder):
    # MindSpore's ImageFolderDataset reads ._name.png as an image; the check must see what the reader reads
    (tiny_folder / "train" / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (tiny_folder / "train" / "cat" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")  # not an image: skipped
    with pytest.raises(UserError, match=r"\._0.png is not a PNG image \(a macOS metadata file: delete them with "
                                        r"find .*train -name '\._\*' -delete\)"):
        check_dataset(_cfg(tiny_folder))


def test_empty_image_is_named(tiny_folder):
    (tiny_folder / "val" / "cat" / "zero.png").write_bytes(b"")
    with pytest.raises(UserError, match=r"zero.png is empty"):
        check_dataset(_cfg(tiny_folder))


def test_non_image_files_are_ignored_with_a_warning(tiny_folder, caplog):
    (tiny_folder / "train" / "cat" / "notes.txt").write_text("hello")
    with caplog.at_level("WARNING", logger="train"):
        source = check_dataset(_cfg(tiny_folder))
    assert source.train.num_images == 12 and "ignored 1 files" in caplog.text


def _write_cifar(folder: Path, names, corrupt=None):
    """Files in the real CIFAR-10 binary format (10,000 records each; sparse, so they cost no disk):
    the first 8 records carry labels 0..7 and random pixels, the rest are zeros."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    head = np.zeros((8, CIFAR_RECORD), np.uint8)
    head[:, 0] = np.arange(8)
    head[:, 1:] = rng.integers(0, 256, (8, CIFAR_RECORD - 1))
    for name in names:
        with open(folder / name, "wb") as fh:
            fh.write(head.tobytes())
            fh.truncate(10_000 * CIFAR_RECORD - (5 if name == corrupt else 0))


TRAIN = [f"data_batch_{i}.bin" for i in range(1, 6)]


@pytest.mark.parametrize("layout", ["flat", "cifar-10-batches-bin", "train_test"])
def test_cifar10_layouts(tmp_path, layout):
    root = tmp_path / "cifar"
    if layout == "train_test":
        _write_cifar(root / "train", TRAIN)
        _write_cifar(root / "test", ["test_batch.bin"])
    else:
        folder = root if layout == "flat" else root / layout
        _write_cifar(folder, TRAIN + ["test_batch.bin"])
    cfg = _cfg(root, dataset="cifar10", num_classes=10, image_size=40, batch_size=4)
    source = check_dataset(cfg)
    assert (source.train.num_images, source.val.num_images) == (50_000, 10_000)
    assert source.class_names[0] == "airplane"
    train = create_dataset(cfg, source, True)
    assert train.get_dataset_size() == 12_500
    image, _ = next(train.create_tuple_iterator(output_numpy=True, num_epochs=1))
    assert image.shape == (4, 3, 40, 40)
    val = create_dataset(cfg, source, False)
    _, label = next(val.create_tuple_iterator(output_numpy=True, num_epochs=1))
    assert label.tolist() == [0, 1, 2, 3]  # eval reads in file order


def test_cifar10_errors(tmp_path):
    root = tmp_path / "cifar"
    _write_cifar(root, TRAIN[:3])
    cfg = _cfg(root, dataset="cifar10", num_classes=10, image_size=32)
    with pytest.raises(UserError, match=r"lacks the CIFAR-10 binary files data_batch_1.bin"):
        check_dataset(cfg)
    _write_cifar(root, TRAIN + ["test_batch.bin"], corrupt="data_batch_4.bin")
    with pytest.raises(UserError, match=r"data_batch_4.bin has 30729995 bytes, which is not a whole number of "
                                        r"3073-byte CIFAR records \(1 label byte \+ 32x32x3 pixels; CIFAR-10 files "
                                        r"hold 10000 records, 30730000 bytes: download the file again\)"):
        check_dataset(cfg)
    with pytest.raises(UserError, match=r"CIFAR-10 has 10 classes but num_classes is 2"):
        check_dataset(_cfg(root, dataset="cifar10"))


def test_a_cifar_format_set_of_any_size_is_read_as_mindspores_reader_reads_cifar10(tmp_path, caplog):
    import mindspore.dataset as ds

    from src.data.pipeline import CifarRecords

    standard = tmp_path / "standard"
    _write_cifar(standard, ["test_batch.bin"])
    ours = CifarRecords(((standard / "test_batch.bin", 10_000),))
    for (image, label), i in zip(ds.Cifar10Dataset(str(standard), usage="test", shuffle=False)
                                 .create_tuple_iterator(output_numpy=True, num_epochs=1), range(8)):
        assert np.array_equal(ours[i][0], image) and ours[i][1] == label and ours[i][0].dtype == image.dtype

    own = tmp_path / "own"  # 3 records per train file, 5 test records
    rng = np.random.default_rng(1)
    for name, n in [*((f, 3) for f in TRAIN), ("test_batch.bin", 5)]:
        own.mkdir(exist_ok=True)
        records = rng.integers(0, 256, (n, CIFAR_RECORD), dtype=np.uint8)
        records[:, 0] = np.arange(n) % 10
        records.tofile(own / name)
    cfg = _cfg(own, dataset="cifar10", num_classes=10, image_size=32, batch_size=4)
    with caplog.at_level("INFO", logger="train"):
        source = check_dataset(cfg)
    assert (source.train.num_images, source.val.num_images) == (15, 5)
    assert "CIFAR-format train set: 15 images (data_batch_1.bin 3, data_batch_2.bin 3" in caplog.text
    assert create_dataset(cfg, source, True).get_dataset_size() == 3
    labels = np.concatenate([b[1] for b in create_dataset(cfg, source, False).create_tuple_iterator(
        output_numpy=True, num_epochs=1)])
    assert labels.tolist() == [0, 1, 2, 3, 4]

    with open(own / "test_batch.bin", "r+b") as fh:
        fh.seek(2 * CIFAR_RECORD)
        fh.write(bytes([12]))
    with pytest.raises(UserError, match=r"test_batch.bin: record 2 has label 12, but there are 10 classes"):
        check_dataset(cfg)
    (own / "test_batch.bin").write_bytes(b"")
    with pytest.raises(UserError, match=r"test_batch.bin has 0 bytes, which is not a whole number"):
        check_dataset(cfg)


def test_predict_preprocesses_images_as_the_checkpoint_was_trained(tmp_path):
    """A CIFAR-10 model records CIFAR-10's normalization and no crop; predict.py reads PNG files through the image
    pipeline and, with the recorded preprocessing, gives what the CIFAR-10 eval pipeline gives (not ImageNet's)."""
    import mindspore.dataset.transforms as transforms
    from PIL import Image

    from src.data.transforms import image_transforms, preprocessing, with_recorded_preprocessing
    from src.deploy.predict import load_images

    cifar = Config(dataset="cifar10", image_size=32)
    recorded = preprocessing(cifar, "cifar10").to_json()  # what a CIFAR-10 run writes into its checkpoints
    image = tmp_path / "a.png"
    write_image(image, size=(32, 32), seed=3)
    want = transforms.Compose(image_transforms(cifar, "cifar10", training=False))(
        np.asarray(Image.open(image).convert("RGB")))
    got = load_images(with_recorded_preprocessing(Config(image_size=32), recorded), [str(image)])[0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(load_images(Config(image_size=32), [str(image)])[0] - want).max() > 0.1  # ImageNet's differ
    bicubic = with_recorded_preprocessing(Config(image_size=32, interpolation="bilinear"),
                                          {"crop_pct": 0.5, "interpolation": "bicubic"})
    assert (bicubic.crop_pct, bicubic.interpolation) == (0.5, "bilinear")  # set keys win over the recorded ones
