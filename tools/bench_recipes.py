"""Train one data set with each recipe feature on and off, or with each optimizer: val top-1 and s/epoch, one table.

Every variant is `python train.py <common flags> <its flags>` in a fresh process, one after another (never two at
once), with the same seed, epochs and data; the numbers come from each run's metrics.csv: the best and the last
epoch's val top-1, and the mean epoch time over epochs 2.. (epoch 1 includes the graph compile). One run per
variant: on a small data set, differences of a few points are within the seed-to-seed spread.

    python tools/bench_recipes.py --out /tmp/recipes                       # the built-in demo
    python tools/bench_recipes.py --suite optimizers --out /tmp/opts       # each optimizer at its usual LR
    python tools/bench_recipes.py --suite optimizers --variants momentum --seeds 1,2,3 --out /tmp/seeds
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
# each optimizer at the LR its users start from for a batch of 32 (the demo's; momentum is the demo's own 0.02), with
# the epsilon its MobileNetV3 recipes use (torchvision's rmsprop 0.0316, timm's rmsproptf 1e-3) and AdamW's usual
# weight decay; every other key is the demo's (cosine, 2 warmup epochs, 15 epochs, batch 32)
OPTIMIZERS = {
    "momentum": [],
    "sgd": ["--opt", "sgd"],
    "nesterov": ["--opt", "nesterov"],
    "rmsprop": ["--opt", "rmsprop", "--eps", "0.0316", "--lr_max", "0.002"],
    "rmsproptf": ["--opt", "rmsproptf", "--eps", "0.001", "--lr_max", "0.002"],
    "adam": ["--opt", "adam", "--lr_max", "0.001"],
    "adamw": ["--opt", "adamw", "--lr_max", "0.001", "--weight_decay", "0.05"],
    "lamb": ["--opt", "lamb", "--lr_max", "0.005", "--weight_decay", "0.02"],
}
SUITES = {"features": VARIANTS, "optimizers": OPTIMIZERS}


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
    parser.add_argument("--suite", default="features", choices=tuple(SUITES), help="recipe features or optimizers")
    parser.add_argument("--variants", default=None, help="some of the suite's variants, comma-separated (default: all)")
    parser.add_argument("--seeds", default="1", help="train every variant with each of these seeds, e.g. 1,2,3")
    parser.add_argument("common", nargs="*", help="train.py flags for every variant (after --)")
    args = parser.parse_args()
    suite = SUITES[args.suite]
    results = []
    for name in (args.variants.split(",") if args.variants else suite):
        for seed in args.seeds.split(","):
            label = name if args.seeds == "1" else f"{name}-seed{seed}"
            results.append(run(label, [*suite[name], "--seed", seed], args.common, Path(args.out)))
            r = results[-1]
            print(f"{r['variant']:>14}  best {r['best_top1']:.4f}  last {r['last_top1']:.4f}  {r['s_per_epoch']} "
                  f"s/epoch  {r['flags']}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
