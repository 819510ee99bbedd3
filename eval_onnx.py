"""Evaluate an exported ONNX model with onnxruntime on the same val pipeline as eval.py.

  python eval_onnx.py                                       # the demo's output/mobilenetv2.onnx
  python eval_onnx.py --onnx_file model.onnx --config_path configs/mobilenetv2_imagenet.yaml \
      --dataset_path /data/imagenet --platform CPU
Prints and appends to output_path/eval.log:  result:{'acc': A, 'top_5_accuracy': B} ckpt=FILE
--file_name (export.py's spelling) works too.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from src.config import load_config
from src.errors import run_cli
from src.logs import quiet_mindspore, setup_console_logging


def main(argv: Sequence[str]) -> int:
    cfg = load_config(argv, "eval_onnx", __doc__)
    setup_console_logging()
    quiet_mindspore()
    from src.deploy.onnx_eval import evaluate_onnx
    from src.engine.evaluate import report

    report(evaluate_onnx(cfg), cfg.output_path)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
