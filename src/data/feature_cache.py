"""Head-only fine-tuning data: pooled backbone features, computed once and cached.

With `--freeze_layer backbone` the backbone runs once over the train and val images (eval transforms)
and the pooled features are cached under output_path/feature_cache/, keyed by the backbone's weights,
the data files (names, sizes, mtimes) and the preprocessing settings, so a changed checkpoint or
data set is never served stale features. The head then trains on those features with the same
trainer, logs and checkpoints as any other run.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import mindspore.dataset as ds
import numpy as np

from src.config import Config
from src.data.checks import DataSource
from src.data.pipeline import create_dataset
from src.data.sampler import BalancedSampler
from src.data.transforms import preprocessing
from src.errors import stop_if_signalled
from src.files import write_atomically
from src.models.common import ClassifierNet, PooledFeatures

log = logging.getLogger("train")
CACHE_VERSION = 1


def cache_key(cfg: Config, source: DataSource, net: ClassifierNet) -> str:
    """Fingerprint of everything the cached features depend on."""
    digest = hashlib.sha256()
    settings = {"version": CACHE_VERSION, "model": cfg.model, "width": cfg.width, "image_size": cfg.image_size,
                "bn_eps": cfg.bn_eps, "padding": cfg.padding, "preprocess": preprocessing(cfg, source.kind).to_json(),
                "dataset": source.kind, "classes": source.class_names,
                "train": source.train.fingerprint, "val": source.val.fingerprint if source.val else None}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for param in net.backbone.get_parameters():
        digest.update(param.name.encode())
        digest.update(param.asnumpy().tobytes())
    return digest.hexdigest()[:20]


def _extract(extractor: PooledFeatures, dataset) -> tuple[np.ndarray, np.ndarray]:
    feats, labels = [], []
    for image, label in dataset.create_tuple_iterator(num_epochs=1):
        stop_if_signalled()
        feats.append(extractor(image).asnumpy())
        labels.append(label.asnumpy())
    return np.concatenate(feats).astype(np.float32), np.concatenate(labels).astype(np.int32)


def cached_features(cfg: Config, source: DataSource, net: ClassifierNet) -> dict[str, np.ndarray]:
    """Pooled backbone features of the train and val splits (eval transforms), from the cache or computed once."""
    folder = Path(cfg.output_path) / "feature_cache"
    path = folder / f"{cfg.model}-{cache_key(cfg, source, net)}.npz"
    if path.is_file():
        with np.load(path) as data:
            feats = {k: data[k] for k in data.files}
        log.info("feature cache hit: %s (%d train, %d val features)", path, len(feats["train_y"]),
                 len(feats.get("val_y", [])))
        return feats
    start = time.perf_counter()
    log.info("feature cache miss: running the frozen backbone once over %d train + %d val images",
             source.train.num_images, source.val.num_images if source.val else 0)
    extractor = PooledFeatures(net)
    extractor.set_train(False)
    feats = {}
    splits = [("train", source.train)] + ([("val", source.val)] if source.val else [])
    for name, _ in splits:
        data = create_dataset(cfg, source, training=False, split=name)
        feats[f"{name}_x"], feats[f"{name}_y"] = _extract(extractor, data)
    folder.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.savez would add .npz to a path
            np.savez(fh, **feats)

    write_atomically(path, write)
    log.info("feature cache written: %s (%.1f s)", path, time.perf_counter() - start)
    return feats


def feature_datasets(cfg: Config, feats: dict[str, np.ndarray], num_shards: int | None = None,
                     shard_id: int | None = None):
    """Batched (feature, label) datasets for head-only training and evaluation."""
    order = {"shuffle": True, "num_shards": num_shards, "shard_id": shard_id} if cfg.sampler != "balanced" else \
        {"sampler": BalancedSampler(feats["train_y"], cfg.seed, shard_id or 0, num_shards or 1)}
    train = ds.NumpySlicesDataset((feats["train_x"], feats["train_y"]), column_names=["image", "label"], **order)
    train = train.batch(cfg.batch_size, drop_remainder=True)
    val = None
    if "val_x" in feats:
        val = ds.NumpySlicesDataset((feats["val_x"], feats["val_y"]), column_names=["image", "label"],
                                    shuffle=False).batch(cfg.batch_size)
    return train, val

