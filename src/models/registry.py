"""Model registry: each net registers its constructor(num_classes, width, dropout) under its name.

The names users may pass are config.MODEL_NAMES (the config is read before MindSpore loads); a test
checks that they equal the registered names.
"""
from __future__ import annotations

from collections.abc import Callable

from src.errors import UserError
from src.models.common import ClassifierNet

_MODELS: dict[str, Callable[..., ClassifierNet]] = {}


def register_model(fn: Callable[..., ClassifierNet]) -> Callable[..., ClassifierNet]:
    """Decorator: make `fn` available to create_model under its function name."""
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return list(_MODELS)


def create_model(name: str, num_classes: int = 1000, width: float = 1.0, dropout: float | None = None,
                 bn_eps: float | None = None, padding: str = "symmetric") -> ClassifierNet:
    """The named net; dropout None keeps the net's own default (0.2 for MobileNetV3, 0 for the others), bn_eps None
    its BatchNorm epsilon (1e-3 for MobileNetV3, 1e-5 for the others); `padding` see config.Config.padding."""
    if name not in _MODELS:
        raise UserError(f"unknown model '{name}' (known: {', '.join(_MODELS)})")
    extra = {} if dropout is None else {"dropout": dropout}
    return _MODELS[name](num_classes=num_classes, width=width, bn_eps=bn_eps, padding=padding, **extra)


def net_from_config(cfg) -> ClassifierNet:
    """The configured net, made a PACT QAT net when cfg.pact_quant is set."""
    net = create_model(cfg.model, cfg.num_classes, cfg.width, cfg.dropout, cfg.bn_eps, cfg.padding)
    if cfg.pact_quant:
        from src.models.quant import quantize_net

        quantize_net(net)
    return net


def count_trainable_params(net) -> int:
    return sum(int(p.size) for p in net.trainable_params())
