"""MindSpore Hub interface: create_network(name, *args, **kwargs) for every registered net."""
from __future__ import annotations

from src.models import MODELS


def create_network(name: str, *args, **kwargs):
    """Build a net by name, e.g. create_network("mobilenetv2", num_classes=1000, width=1.0).

    Known names: mobilenetv2, mobilenetv3_large, mobilenetv3_small, resnet50, resnet101.
    """
    if name not in MODELS:
        raise ValueError(f"unknown network '{name}' (known: {', '.join(MODELS)})")
    return MODELS[name](*args, **kwargs)
