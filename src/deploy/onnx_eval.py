"""Evaluate an exported ONNX model with onnxruntime on the same val pipeline as eval.py."""
from __future__ import annotations

from pathlib import Path

from src.config import Config
from src.data.checks import check_dataset
from src.data.pipeline import create_dataset
from src.deploy.onnx_model import load_onnx
from src.engine.evaluate import EvalResult
from src.engine.metrics import accuracy_metrics


def onnx_path(cfg: Config) -> Path:
    """--onnx_file (or --file_name, or the YAML's file_name), with .onnx added when the name has no such file;
    default output_path/<model>.onnx."""
    name = cfg.onnx_file or cfg.file_name
    path = Path(name) if name else Path(cfg.output_path) / f"{cfg.model}.onnx"
    if path.suffix != ".onnx" and not path.exists():
        path = path.with_name(path.name + ".onnx")
    return path


def evaluate_onnx(cfg: Config) -> EvalResult:
    path = onnx_path(cfg)
    model = load_onnx(path)
    model.check(cfg.image_size, cfg.num_classes)
    source = check_dataset(cfg, need_train=False, need_val=True)
    metrics = accuracy_metrics()
    for images, labels in create_dataset(cfg, source, training=False).create_tuple_iterator(output_numpy=True,
                                                                                             num_epochs=1):
        logits = model(images)
        for metric in metrics.values():
            metric.update(logits, labels)
    return EvalResult(metrics["acc"].eval(), metrics["top_5_accuracy"].eval(), path, source.val.num_images)
