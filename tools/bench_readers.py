"""Time each reader on the same images: image folder, label list, CSV and MindRecord shards.

Writes N photo-like 500x375 JPEGs (~70 KB, as tools/bench_image_check.py) as an ImageFolder, the same images'
train_list.txt and train.csv, and their MindRecord shards (tools/convert_to_mindrecord.py's writer). Then, in
--rounds alternating rounds, runs `benchmark.py --mode data` once per reader, each in a fresh process with an empty
image-check cache (a new machine's first run, as a ModelArts job has every time): the data set check before
training (image files: every image decoded once; MindRecord: the shard headers) and the train pipeline's
images/s (decode + random resized crop + flip + normalize, batched). Prints one JSON line of medians.

    python tools/bench_readers.py --images 2000 --rounds 3
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

READERS = ("imagefolder", "list", "csv", "mindrecord")


def build(root: Path, images: int) -> None:
    from bench_image_check import write_images

    from src.data.mindrecord import write_dataset

    write_images(root, images)
    names = sorted(c.name for c in (root / "train").iterdir())
    splits = {}
    for split in ("train", "val"):
        rows = [(f"{split}/{name}/{f.name}", label) for label, name in enumerate(names)
                if (root / split / name).is_dir() for f in sorted((root / split / name).iterdir())]
        (root / f"{split}_list.txt").write_text("".join(f"{p} {label}\n" for p, label in rows))
        with open(root / f"{split}.csv", "w", newline="") as fh:
            csv.writer(fh).writerows([("file_name", "label"), *rows])
        splits[split] = [(root / p, label) for p, label in rows]
    write_dataset(root / "mr", splits, names, None, str(root))


def run(root: Path, reader: str, cache: Path, args: argparse.Namespace) -> dict:
    path = root / "mr" if reader == "mindrecord" else root
    env = dict(os.environ, CLS_CACHE_DIR=str(cache), GLOG_v="3")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), "--mode", "data", "--dataset", reader,
                           "--dataset_path", str(path), "--num_classes", "4", "--batch_size", "32", "--image_size",
                           "224", "--steps", str(args.steps), "--num_parallel_workers", str(args.workers),
                           "--json", "True"], env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"error: benchmark.py --dataset {reader} failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        build(root, args.images)
        results: dict[str, list[dict]] = {r: [] for r in READERS}
        for i in range(args.rounds):
            for reader in READERS:
                results[reader].append(run(root, reader, Path(tmp) / f"cache-{reader}-{i}", args))
        out = {"images": sum(1 for _ in (root / "train").rglob("*.jpg")), "cpus": os.cpu_count(),
               "workers": args.workers, "rounds": args.rounds}
        for reader, runs in results.items():
            out[reader] = {"img_per_s": round(statistics.median(r["img_per_s"] for r in runs), 1),
                           "check_s": round(statistics.median(r["check_s"] for r in runs), 3),
                           "first_batch_s": round(statistics.median(r["compile_s"] for r in runs), 3)}
        print(json.dumps(out))


if __name__ == "__main__":
    main()
