"""Evaluate an exported ONNX model with onnxruntime on the same val pipeline as eval.py.

  python eval_onnx.py                                       # the demo's output/mobilenetv2.onnx
  python eval_onnx.py --onnx_file model.onnx --config_path configs/mobilenetv2_imagenet.yaml \
      --dataset_path /data/imagenet --platform CPU
Prints and appends to output_path/eval.log:  result:{'acc': A, 'top_5_accuracy': B} ckpt=FILE
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from src.config import load_config
from src.errors import run_cli
from src.logs import quiet_mindspore, setup_console_logging


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--onnx_file", default=None,
                        help="the ONNX model to evaluate (as in predict.py; --file_name works too; "
                             "default: output_path/<model>.onnx)")


def main(argv: Sequence[str]) -> int:
    cfg, args = load_config(argv, description=__doc__, add_arguments=_arguments)
    setup_console_logging()
    quiet_mindspore()
    from src.dataset import check_dataset, create_dataset
    from src.evaluate import EvalResult, report
    from src.metrics import accuracy_metrics
    from src.onnx_runtime import load_onnx

    name = args.onnx_file or cfg.file_name
    path = Path(name) if name else Path(cfg.output_path) / f"{cfg.model}.onnx"
    if path.suffix != ".onnx" and not path.exists():
        path = path.with_name(path.name + ".onnx")
    model = load_onnx(path)
    model.check(cfg.image_size, cfg.num_classes)
    source = check_dataset(cfg, need_train=False, need_val=True)
    metrics = accuracy_metrics()
    for images, labels in create_dataset(cfg, source, training=False).create_tuple_iterator(output_numpy=True,
                                                                                             num_epochs=1):
        logits = model(images)
        for metric in metrics.values():
            metric.update(logits, labels)
    result = EvalResult(metrics["acc"].eval(), metrics["top_5_accuracy"].eval(), path, source.val.num_images)
    report(result, cfg.output_path)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
