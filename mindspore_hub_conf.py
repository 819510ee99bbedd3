"""MindSpore Hub interface: create_network(name, *args, **kwargs) for every registered net."""
from __future__ import annotations

from src.models import list_models
from src.models.registry import create_model


def create_network(name: str, *args, **kwargs):
    """Build a net by name, e.g. create_network("mobilenetv2", num_classes=1000, width=1.0).

    Known names: src.models.list_models() (mobilenetv2, mobilenetv3_large/small, resnet50/101).
    """
    if name not in list_models():
        raise ValueError(f"unknown network '{name}' (known: {', '.join(list_models())})")
    return create_model(name, *args, **kwargs)
