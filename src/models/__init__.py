"""Model registry: name -> constructor(num_classes, width, dropout)."""
from __future__ import annotations

from collections.abc import Callable

from src.errors import UserError
from src.models.common import ClassifierNet
from src.models.mobilenetv2 import mobilenetv2
from src.models.mobilenetv3 import mobilenetv3_large, mobilenetv3_small
from src.models.resnet import resnet50, resnet101

MODELS: dict[str, Callable[..., ClassifierNet]] = {
    "mobilenetv2": mobilenetv2,
    "mobilenetv3_large": mobilenetv3_large,
    "mobilenetv3_small": mobilenetv3_small,
    "resnet50": resnet50,
    "resnet101": resnet101,
}


def create_model(name: str, num_classes: int = 1000, width: float = 1.0, dropout: float | None = None
                 ) -> ClassifierNet:
    """The named net; dropout None keeps the net's own default (0.2 for MobileNetV3, 0 for the others)."""
    if name not in MODELS:
        raise UserError(f"unknown model '{name}' (known: {', '.join(MODELS)})")
    extra = {} if dropout is None else {"dropout": dropout}
    return MODELS[name](num_classes=num_classes, width=width, **extra)


def net_from_config(cfg) -> ClassifierNet:
    """The configured net, made a PACT QAT net when cfg.pact_quant is set."""
    net = create_model(cfg.model, cfg.num_classes, cfg.width, cfg.dropout)
    if cfg.pact_quant:
        from src.quant import quantize_net

        quantize_net(net)
    return net


def count_trainable_params(net) -> int:
    return sum(int(p.size) for p in net.trainable_params())
