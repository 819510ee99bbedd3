"""The batched mindspore.dataset pipeline: reader (image folders, label files, CIFAR-10 binaries, MindRecord) ->
transforms -> batches."""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from src.config import Config
from src.data.batch_augment import BatchAugment
from src.data.checks import CIFAR_RECORD, DataSource, Split
from src.data.mixup import MixSettings
from src.data.sampler import BalancedSampler
from src.data.transforms import image_transforms


class CifarRecords:
    """Random access to the records of CIFAR-format binary files, as Cifar10Dataset yields them: an HWC uint8
    image and a uint32 label."""

    def __init__(self, files: tuple[tuple[Path, int], ...]):
        self.records = np.concatenate([np.fromfile(path, dtype=np.uint8).reshape(n, CIFAR_RECORD) for path, n in files])

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        record = self.records[index]
        return record[1:].reshape(3, 32, 32).transpose(1, 2, 0).copy(), np.uint32(record[0])

    def labels(self) -> np.ndarray:
        return self.records[:, 0].astype(np.int64)


class ImageFiles:
    """Random access to (encoded image bytes, label) of a label file's images, as ImageFolderDataset yields them
    with decode=False."""

    def __init__(self, samples: tuple[tuple[Path, int], ...]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        return np.fromfile(path, dtype=np.uint8), np.int32(label)

    def labels(self) -> np.ndarray:
        return np.array([label for _, label in self.samples], dtype=np.int64)


def random_access(source: DataSource, split: Split) -> ImageFiles | CifarRecords:
    """The split as a random-access source (GeneratorDataset's): a label file's or a class folder's images in the
    order ImageFolderDataset reads them (class by class, files by name), or the CIFAR records."""
    if source.kind == "cifar10":
        return CifarRecords(split.cifar_files)
    if split.samples:
        return ImageFiles(split.samples)
    samples = []
    for label, name in enumerate(source.class_names):
        folder = split.path / name
        if folder.is_dir():
            samples += [(folder / entry.name, label) for entry in sorted(os.scandir(folder), key=lambda e: e.name)
                        if entry.is_file() and os.path.splitext(entry.name)[1] in split.extensions]
    return ImageFiles(tuple(samples))


def create_dataset(cfg: Config, source: DataSource, training: bool, batch_size: int | None = None,
                   num_shards: int | None = None, shard_id: int | None = None, split: str | None = None):
    """A batched mindspore.dataset pipeline; training shuffles, augments and drops the remainder.

    `split` ("train"/"val") defaults to the train split when training and to val otherwise. With mixup/cutmix the
    training batches carry soft targets (float32, batch x classes) instead of int labels; random erasing and the
    mixing run in the batch op (BatchAugment). A resumed run positions the pipeline with `resume_at`.
    """
    import mindspore as ms
    import mindspore.dataset as ds
    import mindspore.dataset.transforms as transforms

    split_name = split or ("train" if training else "val")
    split = source.train if split_name == "train" else source.val
    workers = min(cfg.num_parallel_workers, os.cpu_count() or 1)
    common = {"num_parallel_workers": workers, "shuffle": training, "num_shards": num_shards,
              "shard_id": shard_id}
    balanced = training and cfg.sampler == "balanced"
    if balanced:  # the package's own sampler picks the images and shards them: MindSpore takes one or the other
        records = random_access(source, split)
        common = {"num_parallel_workers": workers,
                  "sampler": BalancedSampler(records.labels(), cfg.seed, shard_id or 0, num_shards or 1)}
        data = ds.GeneratorDataset(records, column_names=["image", "label"], python_multiprocessing=False, **common)
    elif source.kind == "cifar10" and split.standard_cifar:
        data = ds.Cifar10Dataset(str(split.path), usage="train" if split_name == "train" else "test", **common)
    elif source.kind in ("cifar10", "list", "csv"):  # CIFAR: files of other sizes, which Cifar10Dataset refuses
        data = ds.GeneratorDataset(random_access(source, split), column_names=["image", "label"],
                                   python_multiprocessing=False, **common)
    elif source.kind == "mindrecord":
        data = ds.MindDataset([str(p) for p in split.shards], columns_list=["image", "label"], **common)
    else:
        class_indexing = {name: i for i, name in enumerate(source.class_names)}
        data = ds.ImageFolderDataset(str(split.path), extensions=sorted(split.extensions),
                                     class_indexing=class_indexing, decode=False, **common)
    data = data.map(operations=image_transforms(cfg, source.kind, training), input_columns="image",
                    num_parallel_workers=workers)
    data = data.map(operations=transforms.TypeCast(ms.int32), input_columns="label",
                    num_parallel_workers=1)
    mixing = MixSettings.from_config(cfg) if training else None
    if mixing is None and not (training and cfg.re_prob > 0):
        return data.batch(batch_size or cfg.batch_size, drop_remainder=training, num_parallel_workers=workers)
    augment = BatchAugment(cfg.re_prob, mixing, cfg.seed, shard_id or 0)
    return data.batch(batch_size or cfg.batch_size, drop_remainder=True, num_parallel_workers=workers,
                      per_batch_map=augment, input_columns=["image", "label"])


def resume_at(data, epochs_done: int, exact: bool) -> None:
    """Position a resumed run's train pipeline after the epochs it has done, as MindSpore's failover does
    (`Dataset.set_init_step`): the samplers, the batch op's epoch and every per-epoch draw continue where the
    uninterrupted run would be, so the following epochs read the images in its order. The image transforms' own
    random draws (crops, flips) are new, unless `exact`: then MindSpore replays the pipeline over the epochs done
    (it reads and transforms their images again, costing about their data time) and the run is bit-identical."""
    import mindspore.dataset as ds

    ds.config.set_fast_recovery(not exact)
    data.set_init_step(epochs_done * data.get_dataset_size())


def pipeline_error(exc: Exception, epoch: int, step: int, kind: str = "imagefolder") -> str:
    """One line for a mindspore.dataset failure during training, naming the file when MindSpore does."""
    text = " ".join(line.strip() for line in str(exc).splitlines())
    found = re.search(r"\[ERROR\] (.+?\.)(?:\s|$)", text)
    detail = (found.group(1) if found else text)[:300].strip()
    if kind == "mindrecord":
        return (f"a record of the MindRecord shards cannot be read at epoch {epoch} step {step}: {detail} (a shard was "
                "damaged after its conversion: convert the data again; --debug shows MindSpore's message)")
    found = re.search(r"The corresponding data file is: (.+?)\. (.+?\.)(?:\s|$)", text)
    if found:
        return (f"{found.group(1)} cannot be read by MindSpore ({found.group(2).strip().rstrip('.')}), found at epoch "
                f"{epoch} step {step} although the check before training decoded every image (was the file changed? "
                "delete or re-encode it and train again)")
    return f"the data pipeline failed at epoch {epoch} step {step}: {detail} (run with --debug for MindSpore's message)"
