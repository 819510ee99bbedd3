"""Convert an image data set into MindRecord shards, once: the train and val splits, their images checked.

    python tools/convert_to_mindrecord.py --dataset_path /data/imagenet --output_dir /data/imagenet_mr \
        --num_classes 1000
    python tools/convert_to_mindrecord.py --dataset list --dataset_path /data/ILSVRC2012 --output_dir /data/mr \
        --num_classes 1000 --shard_size 50000
    python train.py --dataset mindrecord --dataset_path /data/imagenet_mr --num_classes 1000 ...

The source is read as train.py reads it (--dataset imagefolder, list or csv and their keys; cifar10 is already a
few large files), every image checked and decoded once; each record holds the encoded image as stored (no
re-encoding: the pixels are the source's), its label and its source path. OUT/train and OUT/val each get one shard
set (`--shard_size` images per shard; default about 1 GiB per shard) whose header holds the class names and the
images per class. `--run_eval False` converts train only (an earlier conversion's val/ is removed with its train/).
Both splits are written into hidden folders and renamed into place when complete: an interrupted conversion leaves
an earlier one as it was, and a folder that is not a shard set of this tool is never replaced.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.config import parse_command_line  # noqa: E402
from src.errors import UserError, run_cli, stop_on_signals, writable_folder  # noqa: E402
from src.logs import quiet_mindspore, setup_console_logging  # noqa: E402

log = logging.getLogger("train")


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", required=True, help="folder for train/ and val/ shard sets")
    parser.add_argument("--shard_size", type=int, default=None,
                        help="images per shard (default: shards of about 1 GiB)")


def main(argv) -> int:
    cfg, args = parse_command_line(argv, "convert", __doc__, _arguments)
    stop_on_signals()  # Ctrl-C and SIGTERM stop at a safe point: never inside the swap of the folders
    setup_console_logging()
    quiet_mindspore()
    if cfg.dataset in ("mindrecord", "cifar10"):
        raise UserError(f"--dataset {cfg.dataset} needs no conversion (convert imagefolder, list or csv data)")
    if args.shard_size is not None and args.shard_size < 1:
        raise UserError(f"--shard_size got {args.shard_size} (images per shard: 1 or more)")
    out = Path(args.output_dir).expanduser()
    source_root = cfg.resolved_dataset_path().resolve()
    if out.resolve() == source_root or source_root in out.resolve().parents and out.name in ("train", "val"):
        raise UserError(f"--output_dir {out} would overwrite the source's folders (choose another folder)")
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file (pass a folder for train/ and val/)")
    out.mkdir(parents=True, exist_ok=True)
    writable_folder(out, "the MindRecord shards", "--output_dir")
    from src.data.checks import check_dataset
    from src.data.mindrecord import refuse_foreign, write_dataset
    from src.data.pipeline import random_access

    refuse_foreign(out)  # before an hour of image checks

    source = check_dataset(cfg, need_train=True, need_val=cfg.run_eval)
    start = time.perf_counter()
    splits = {name: list(random_access(source, split).samples)
              for name, split in (("train", source.train), ("val", source.val if cfg.run_eval else None)) if split}
    written = write_dataset(out, splits, source.class_names, args.shard_size, str(source.train.path), source.named)
    for name, files in written.items():
        log.info("%s: %d images in %d shards, %.1f MB -> %s", name, len(splits[name]),
                 sum(1 for p in files if not p.name.endswith(".db")), sum(p.stat().st_size for p in files) / 1e6,
                 out / name)
    log.info("converted in %.1f s", time.perf_counter() - start)
    print(f"converted: python train.py --dataset mindrecord --dataset_path {out} --num_classes {cfg.num_classes}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
