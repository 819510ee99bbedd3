"""Models: one package per net family (its card in __init__.py, its cells in net.py), the registry, PACT layers,
CPU kernels. Importing this package loads no MindSpore; building a net does."""
from __future__ import annotations

from src.models.registry import count_trainable_params, create_model, list_models, net_from_config

__all__ = ["count_trainable_params", "create_model", "list_models", "net_from_config"]
