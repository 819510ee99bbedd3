"""Time the image check before training: seconds per 10,000 images, first run and cached run.

Writes N photo-like 500x375 JPEGs (quality 90, ~70 KB, like an average ImageNet image) into a temporary
ImageFolder, then runs the data set check (signatures, end markers, every image decoded) twice, each in a fresh
process with an empty, then a warm, image-check cache. Prints one JSON line. The files are in the page cache
(just written): on a cold disk the first run also waits for the reads.

    python tools/bench_image_check.py --images 2000
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECK = """
import json, sys, time
sys.path.insert(0, {root!r})
from src.config import Config
from src.data.checks import check_dataset
start = time.perf_counter()
source = check_dataset(Config(dataset_path={data!r}, num_classes=4))
print(json.dumps({{"images": source.train.num_images + source.val.num_images, "s": time.perf_counter() - start}}))
"""


def write_images(root: Path, count: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:375, 0:500]
    base = np.stack([(x * 0.5 + y * 0.2) % 256, (y * 0.6) % 256, (x * 0.3 + 50) % 256], -1)
    for i in range(count):
        split = "val" if i % 50 == 0 else "train"
        folder = root / split / f"c{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (base + rng.normal(0, 12, base.shape) + rng.integers(0, 60)).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.jpg", "JPEG", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data, cache = Path(tmp) / "data", Path(tmp) / "cache"
        write_images(data, args.images)
        env = dict(os.environ, CLS_CACHE_DIR=str(cache), GLOG_v="3")
        runs = []
        for _ in ("first", "cached"):
            out = subprocess.run([sys.executable, "-c", CHECK.format(root=str(ROOT), data=str(data))], env=env,
                                 capture_output=True, text=True, check=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
        images = runs[0]["images"]
        print(json.dumps({"images": images, "cpus": os.cpu_count(),
                          "first_s_per_10k": round(runs[0]["s"] / images * 10_000, 2),
                          "cached_s_per_10k": round(runs[1]["s"] / images * 10_000, 2)}))


if __name__ == "__main__":
    main()
