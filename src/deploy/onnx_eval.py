"""Evaluate an exported ONNX model with onnxruntime on the same val pipeline as eval.py."""
from __future__ import annotations

from pathlib import Path

from src.config import Config
from src.data.checks import check_dataset
from src.data.pipeline import create_dataset
from src.deploy.onnx_model import load_onnx
from src.engine.evaluate import EvalResult
from src.engine.metrics import accuracy_metrics
from src.errors import UserError


def onnx_path(cfg: Config) -> Path:
    """--onnx_file (or --file_name, or the YAML's file_name), with .onnx added when the name has no such file;
    default output_path/<model>.onnx, or the one .onnx file in output_path (export.py names the file after the
    checkpoint's model, which the config need not name)."""
    name = cfg.onnx_file or cfg.file_name
    if not name:
        path = Path(cfg.output_path) / f"{cfg.model}.onnx"
        found = [] if path.exists() else sorted(f for f in Path(cfg.output_path).glob("*.onnx")
                                                 if not f.name.startswith("."))  # not an export being written
        if len(found) > 1:
            raise UserError(f"{path} not found, and {cfg.output_path} holds {len(found)} ONNX files: "
                            f"{', '.join(f.name for f in found)} (pass --onnx_file with the one to evaluate)")
        return found[0] if found else path
    path = Path(name)
    if path.suffix != ".onnx" and not path.exists():
        path = path.with_name(path.name + ".onnx")
    return path


def evaluate_onnx(cfg: Config) -> EvalResult:
    path = onnx_path(cfg)
    model = load_onnx(path)
    cfg = model.settings(cfg)
    source = check_dataset(cfg, need_train=False, need_val=True)
    metrics = accuracy_metrics()
    for images, labels in create_dataset(cfg, source, training=False).create_tuple_iterator(output_numpy=True,
                                                                                             num_epochs=1):
        logits = model(images)
        for metric in metrics.values():
            metric.update(logits, labels)
    return EvalResult(metrics["acc"].eval(), metrics["top_5_accuracy"].eval(), path, source.val.num_images)
