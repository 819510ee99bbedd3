"""Models: MobileNetV2, MobileNetV3 Large/Small, ResNet-50/101 (each registers itself), PACT layers, CPU kernels."""
from __future__ import annotations

from src.models import mobilenetv2, mobilenetv3, resnet  # noqa: F401 - importing registers the nets
from src.models.registry import count_trainable_params, create_model, list_models, net_from_config

__all__ = ["count_trainable_params", "create_model", "list_models", "net_from_config"]
