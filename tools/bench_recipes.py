"""Train one data set with each recipe feature on and off: val top-1 and seconds per epoch, one table.

Every variant is `python train.py <common flags> <its flags>` in a fresh process, one after another (never two at
once), with the same seed, epochs and data; the numbers come from each run's metrics.csv: the best and the last
epoch's val top-1, and the mean epoch time over epochs 2.. (epoch 1 includes the graph compile). One run per
variant: on a small data set, differences of a few points are within the seed-to-seed spread.

    python tools/bench_recipes.py --out /tmp/recipes                       # the built-in demo
    python tools/bench_recipes.py --out /tmp/recipes_photos -- --dataset_path /tmp/photos --num_classes 8 \\
        --image_size 64 --random_flip 0.5                                   # tools/make_photo_folder.py's photos
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "baseline": [],
    "ema": ["--ema", "True"],
    "randaug+re": ["--auto_augment", "randaug-m9-mstd0.5-inc1", "--re_prob", "0.2"],
    "mixup+cutmix": ["--mixup", "0.2", "--cutmix", "1.0"],
    "clip": ["--clip_grad", "True", "--clip_value", "10"],
    "accum2": ["--gradient_accumulation_steps", "2", "--batch_size", "16"],
}


def run(name: str, flags: list[str], common: list[str], out: Path) -> dict:
    folder = out / name
    command = [sys.executable, str(ROOT / "train.py"), "--output_path", str(folder), *common, *flags]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    with open(folder / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    top1 = [float(r["val_top1"]) for r in rows if r["val_top1"]]
    times = [float(r["epoch_time_s"]) for r in rows[1:]]
    return {"variant": name, "flags": " ".join(flags), "best_top1": round(max(top1), 4),
            "last_top1": round(top1[-1], 4), "s_per_epoch": round(statistics.mean(times), 2) if times else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="a folder for the runs' outputs")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"some of {','.join(VARIANTS)}")
    parser.add_argument("common", nargs="*", help="train.py flags for every variant (after --)")
    args = parser.parse_args()
    results = []
    for name in args.variants.split(","):
        results.append(run(name, VARIANTS[name], args.common, Path(args.out)))
        r = results[-1]
        print(f"{r['variant']:>14}  best {r['best_top1']:.4f}  last {r['last_top1']:.4f}  {r['s_per_epoch']} s/epoch"
              f"  {r['flags']}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
