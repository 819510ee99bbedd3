"""Rebuild the built-in demo data set (data/digits) from the UCI handwritten digits.

The images are the 1,797 8x8 grey-level digits of the UCI "Optical Recognition of Handwritten
Digits" test set (CC BY 4.0), as bundled with scikit-learn. They are written as PNG files in an
ImageFolder layout with a fixed, stratified 80/20 train/val split, so the demo runs through the same
reader as any user's folder. Needs scikit-learn (not a runtime dependency): pip install scikit-learn
"""
import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "data" / "digits"))
    parser.add_argument("--val_fraction", type=float, default=0.2)
    args = parser.parse_args()
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    rng = np.random.default_rng(0)
    out = Path(args.out)
    for label in range(10):
        index = np.flatnonzero(digits.target == label)
        rng.shuffle(index)
        n_val = int(round(len(index) * args.val_fraction))
        for split, part in (("val", index[:n_val]), ("train", index[n_val:])):
            folder = out / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in sorted(part):
                Image.fromarray(images[i], mode="L").save(folder / f"{i:04d}.png", optimize=True)
    print(f"wrote {len(images)} images to {out}")


if __name__ == "__main__":
    main()
