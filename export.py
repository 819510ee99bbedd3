"""Export a checkpoint to MINDIR, ONNX or AIR (Ascend only) and check the file reproduces the net.

  python export.py --ckpt_file output/checkpoint/best.ckpt --file_format ONNX
  python export.py --config_path configs/mobilenetv2_imagenet.yaml --ckpt_file best.ckpt --file_format MINDIR \
      --file_name deploy/mbv2 --platform CPU

The model settings (model, num_classes, width, image_size) come from the config; --batch_size defaults
to 1 here. The file goes to --file_name (default output_path/<model>) plus the format's extension.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from src.config import load_config
from src.errors import run_cli
from src.logs import quiet_mindspore, setup_console_logging


def main(argv: Sequence[str]) -> int:
    cfg = load_config(argv, "export", __doc__)
    setup_console_logging()
    quiet_mindspore()
    from src.cloud import upload_outputs
    from src.deploy.export import export_model

    export_model(cfg)
    upload_outputs(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
