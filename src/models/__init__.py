"""Model registry: name -> constructor(num_classes, width, dropout)."""
from __future__ import annotations

from collections.abc import Callable

from src.errors import UserError
from src.models.common import ClassifierNet
from src.models.mobilenetv2 import mobilenetv2
from src.models.resnet import resnet50, resnet101

MODELS: dict[str, Callable[..., ClassifierNet]] = {
    "mobilenetv2": mobilenetv2,
    "resnet50": resnet50,
    "resnet101": resnet101,
}


def create_model(name: str, num_classes: int = 1000, width: float = 1.0, dropout: float = 0.0) -> ClassifierNet:
    if name not in MODELS:
        raise UserError(f"unknown model '{name}' (known: {', '.join(MODELS)})")
    return MODELS[name](num_classes=num_classes, width=width, dropout=dropout)


def count_trainable_params(net) -> int:
    return sum(int(p.size) for p in net.trainable_params())
