"""Train an image classifier. `python train.py` trains the built-in demo (UCI digits) on CPU.

Examples:
  python train.py --config_path configs/mobilenetv2_imagenet.yaml --dataset_path /data/imagenet
  python train.py --config_path configs/resnet50_cifar10.yaml --dataset_path /data/cifar10 --amp_level O2
  python train.py --resume_ckpt output/checkpoint/mobilenetv2-10_44.ckpt   # continue a killed run (same config)
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from src.errors import run_cli, stop_if_signalled, stop_on_signals
from src.lifeline import stop_with_launcher

stop_on_signals()  # before the heavy imports: a Ctrl-C inside one would crash MindSpore's initialisation
stop_with_launcher()  # a rank of scripts/run_train.sh ends with its launcher, however the launcher died

from src.config import load_config  # noqa: E402
from src.device import prepare_cpu_threads  # noqa: E402
from src.logs import quiet_mindspore, setup_console_logging  # noqa: E402


def main(argv: Sequence[str]) -> int:
    stop_if_signalled()
    cfg = load_config(argv, description=__doc__)
    log = setup_console_logging()
    quiet_mindspore()
    prepare_cpu_threads(cfg.platform)
    from src.cloud import sync_inputs
    from src.engine.run import train

    result = train(sync_inputs(cfg))
    log.info("done in %.1f s", result.elapsed_s)
    if result.best_ckpt:
        log.info("best val top1: %.4f, checkpoint: %s", result.best_top1, result.best_ckpt)
    if result.last_ckpt:
        log.info("last checkpoint (with optimizer state, for --resume_ckpt): %s", result.last_ckpt)
    if result.log_file and result.log_file.name != "train.log":  # --max_steps ended the run in its first epoch
        log.info("no epoch finished: no metrics, curves or checkpoints were written; log: %s", result.log_file)
    else:
        log.info("metrics: %s  curves: %s  log: %s", result.output_path / "metrics.csv",
                 result.output_path / "curves.png", result.output_path / "train.log")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
