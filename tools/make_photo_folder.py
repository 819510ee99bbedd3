"""Cut scikit-image's bundled colour photographs into an ImageFolder: one class per photograph.

Each class is a photograph (astronaut, cat, coffee cup, rocket, retina, Hubble deep field, stained tissue,
motorcycle); its images are square crops of 20-30% of the photo's shorter side at random places, resized to
--size px JPEGs (quality 90). Train crops come from the left 70% of the photo and val crops from the right 30%,
so no val pixel was seen in training: the task is to recognise a photo's content and texture in a part never seen.
Needs scikit-image (not a runtime dependency): pip install scikit-image==0.24.0 -c <numpy==1.26.4 constraints>

    python tools/make_photo_folder.py --out /tmp/photos --train 64 --val 24 --size 96
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "retina", "hubble_deep_field", "immunohistochemistry",
          "motorcycle_left")
TRAIN_PART = 0.7  # of the width


def load(name: str) -> np.ndarray:
    import skimage.data
    import skimage.io

    if hasattr(skimage.data, name):
        return np.asarray(getattr(skimage.data, name)())[..., :3]
    return np.asarray(skimage.io.imread(Path(skimage.data.__file__).parent / f"{name}.png"))[..., :3]


def crops(photo: np.ndarray, count: int, x_range: tuple[float, float], size: int, rng: np.random.Generator):
    height, width = photo.shape[:2]
    short = min(height, width)
    x0, x1 = int(x_range[0] * width), int(x_range[1] * width)
    for _ in range(count):
        side = int(short * rng.uniform(0.2, 0.3))
        side = min(side, x1 - x0, height)
        x = int(rng.integers(x0, x1 - side + 1))
        y = int(rng.integers(0, height - side + 1))
        yield Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size), Image.BILINEAR)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--train", type=int, default=64, help="train images per class")
    parser.add_argument("--val", type=int, default=24, help="val images per class")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    for name in PHOTOS:
        photo = load(name)
        for split, count, part in (("train", args.train, (0.0, TRAIN_PART)), ("val", args.val, (TRAIN_PART, 1.0))):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(crops(photo, count, part, args.size, rng)):
                image.save(folder / f"{i:04d}.jpg", quality=90)
    print(f"{out}: {len(PHOTOS)} classes, {args.train} train and {args.val} val images each, {args.size} px")


if __name__ == "__main__":
    main()
