"""Train and eval preprocessing on mindspore.dataset.vision (ImageNet-style crops for image files, CIFAR crops)."""
from __future__ import annotations

from src.config import Config

IMAGENET_MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
IMAGENET_STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]
CIFAR_MEAN = [0.4914 * 255, 0.4822 * 255, 0.4465 * 255]
CIFAR_STD = [0.2023 * 255, 0.1994 * 255, 0.2010 * 255]


def normalization(kind: str) -> tuple[list[float], list[float]]:
    """(mean, std) in 0..255 pixel units for a data set kind (imagefolder or cifar10)."""
    return (CIFAR_MEAN, CIFAR_STD) if kind == "cifar10" else (IMAGENET_MEAN, IMAGENET_STD)


def eval_transforms(cfg: Config, kind: str) -> list:
    """The val preprocessing (decode for image files), also used by predict.py."""
    return image_transforms(cfg, kind, training=False)


def image_transforms(cfg: Config, kind: str, training: bool) -> list:
    import mindspore.dataset.vision as vision

    size = cfg.image_size
    ops = []
    if kind == "cifar10":
        if training:
            ops += [vision.RandomCrop((32, 32), (4, 4, 4, 4))]
        if size != 32:
            ops += [vision.Resize((size, size))]
    else:
        if training:
            ops += [vision.RandomCropDecodeResize(size, scale=(cfg.crop_scale_min, 1.0), ratio=(3 / 4, 4 / 3))]
        else:
            ops += [vision.Decode(), vision.Resize(int(round(size * 256 / 224))), vision.CenterCrop(size)]
    if training and cfg.random_flip > 0:
        ops += [vision.RandomHorizontalFlip(prob=cfg.random_flip)]
    if training and cfg.color_jitter > 0:
        j = cfg.color_jitter
        ops += [vision.RandomColorAdjust(brightness=j, contrast=j, saturation=j)]
    mean, std = normalization(kind)
    ops += [vision.Normalize(mean=mean, std=std), vision.HWC2CHW()]
    return ops
