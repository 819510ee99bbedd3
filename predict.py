"""Top-5 classes of images, with a checkpoint (MindSpore) or an exported ONNX model (onnxruntime).

  python predict.py --ckpt_file output/checkpoint/best.ckpt img1.jpg img2.png
  python predict.py --onnx_file output/mobilenetv2.onnx img1.jpg
Class names come from the checkpoint or the ONNX file (saved there by train.py / export.py).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from src.config import parse_command_line
from src.errors import UserError, run_cli
from src.logs import quiet_mindspore, setup_console_logging


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="*", help="image files (JPEG, PNG, BMP)")


def main(argv: Sequence[str]) -> int:
    cfg, args = parse_command_line(argv, "predict", __doc__, add_arguments=_arguments)
    if not args.images:
        raise UserError("no images given (python predict.py --ckpt_file CKPT image1.jpg [image2.png ...])")
    setup_console_logging()
    quiet_mindspore()
    from src.deploy.predict import predict_images

    for path, top in predict_images(cfg, args.images):
        print(path)
        for rank, (name, prob) in enumerate(top, 1):
            print(f"  {rank}. {name:<24} {prob:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
