"""Train and eval preprocessing on mindspore.dataset.vision (ImageNet-style crops for image files, CIFAR crops)."""
from __future__ import annotations

import json
from dataclasses import dataclass

from src.config import Config, channel_values
from src.data.augment import parse_policy, policy_transform

DEFAULT_CROP_PCT = 0.875  # 224 / 256, the ImageNet eval crop of torchvision, mindcv and the ModelZoo

IMAGENET_MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
IMAGENET_STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]
CIFAR_MEAN = [0.4914 * 255, 0.4822 * 255, 0.4465 * 255]
CIFAR_STD = [0.2023 * 255, 0.1994 * 255, 0.2010 * 255]


def normalization(kind: str) -> tuple[list[float], list[float]]:
    """(mean, std) in 0..255 pixel units for a data set kind (imagefolder or cifar10)."""
    return (CIFAR_MEAN, CIFAR_STD) if kind == "cifar10" else (IMAGENET_MEAN, IMAGENET_STD)


@dataclass(frozen=True)
class Preprocessing:
    """What a model expects of its input, recorded in every checkpoint and ONNX file (as timm's pretrained_cfg):
    normalization (0..1 units), the eval crop (resize to size / crop_pct, center crop) and the interpolation."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float
    interpolation: str

    def to_json(self) -> str:
        return json.dumps({"mean": [round(v, 6) for v in self.mean], "std": [round(v, 6) for v in self.std],
                           "crop_pct": self.crop_pct, "interpolation": self.interpolation})


def preprocessing(cfg: Config, kind: str) -> Preprocessing:
    """The config's preprocessing; the keys it leaves unset (None) take the data set kind's defaults."""
    mean, std = normalization(kind)
    return Preprocessing(tuple(channel_values(cfg.mean, "mean") if cfg.mean else (v / 255 for v in mean)),
                         tuple(channel_values(cfg.std, "std") if cfg.std else (v / 255 for v in std)),
                         cfg.crop_pct or (1.0 if kind == "cifar10" else DEFAULT_CROP_PCT),
                         cfg.interpolation or "bilinear")


def with_recorded_preprocessing(cfg: Config, recorded: str | dict | None,
                                keys: tuple[str, ...] = ("mean", "std", "crop_pct", "interpolation")) -> Config:
    """The config with a checkpoint's or ONNX file's recorded preprocessing for the `keys` it leaves unset."""
    taken = {k: v for k, v in preprocessing_settings(recorded).items() if k in keys and getattr(cfg, k) is None}
    return cfg.replace(**taken) if taken else cfg


IMAGENET_PREPROCESSING = Preprocessing((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), DEFAULT_CROP_PCT, "bilinear")


def preprocessing_settings(recorded: str | dict | None) -> dict:
    """Config values from a checkpoint's or ONNX file's recorded preprocessing (JSON), for the keys it has."""
    if not recorded:
        return {}
    data = json.loads(recorded) if isinstance(recorded, str) else recorded
    out = {}
    for key in ("mean", "std"):
        if key in data:
            out[key] = ",".join(f"{v:.6g}" for v in data[key])
    if data.get("crop_pct"):
        out["crop_pct"] = float(data["crop_pct"])
    if data.get("interpolation") in ("bilinear", "bicubic"):
        out["interpolation"] = data["interpolation"]
    return out


def eval_transforms(cfg: Config, kind: str) -> list:
    """The val preprocessing (decode for image files), also used by predict.py."""
    return image_transforms(cfg, kind, training=False)


def image_transforms(cfg: Config, kind: str, training: bool) -> list:
    import mindspore.dataset.vision as vision

    size = cfg.image_size
    pre = preprocessing(cfg, kind)
    inter = vision.Inter.BICUBIC if pre.interpolation == "bicubic" else vision.Inter.BILINEAR
    ops = []
    if kind == "cifar10":
        if training:
            ops += [vision.RandomCrop((32, 32), (4, 4, 4, 4))]
        if size != 32:
            ops += [vision.Resize((size, size), inter)]
    else:
        if training:
            ops += [vision.RandomCropDecodeResize(size, scale=(cfg.crop_scale_min, 1.0), ratio=(3 / 4, 4 / 3),
                                                  interpolation=inter)]
        else:
            ops += [vision.Decode(), vision.Resize(int(round(size / pre.crop_pct)), inter), vision.CenterCrop(size)]
    if training and cfg.random_flip > 0:
        ops += [vision.RandomHorizontalFlip(prob=cfg.random_flip)]
    if training and cfg.auto_augment:  # instead of colour jitter, as timm and mindcv
        ops += [policy_transform(parse_policy(cfg.auto_augment))]
    elif training and cfg.color_jitter > 0:
        j = cfg.color_jitter
        ops += [vision.RandomColorAdjust(brightness=j, contrast=j, saturation=j)]
    ops += [vision.Normalize(mean=[v * 255 for v in pre.mean], std=[v * 255 for v in pre.std]), vision.HWC2CHW()]
    return ops  # random erasing (re_prob) follows in the batch op: src/data/batch_augment.py
