"""Evaluate a checkpoint on the val split. `python eval.py` evaluates the demo's best checkpoint.

Prints and appends to output_path/eval.log:  result:{'acc': A, 'top_5_accuracy': B} ckpt=PATH
Example:
  python eval.py --config_path configs/mobilenetv2_imagenet.yaml --dataset_path /data/imagenet \
      --pretrain_ckpt output/checkpoint/best.ckpt
--ckpt_file (export.py's and predict.py's spelling) works too.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from src.config import load_config
from src.device import prepare_cpu_threads
from src.errors import run_cli
from src.logs import quiet_mindspore, setup_console_logging


def main(argv: Sequence[str]) -> int:
    cfg = load_config(argv, "eval", __doc__)
    setup_console_logging()
    quiet_mindspore()
    prepare_cpu_threads(cfg.platform)
    from src.engine.evaluate import evaluate, report

    result = evaluate(cfg)
    report(result, cfg.output_path)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
