"""Shared fixtures: CPU settings before MindSpore loads, tiny image folders, and a CLI runner."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GLOG_v", "3")

from src.device import prepare_cpu_environment  # noqa: E402

prepare_cpu_environment()


def write_image(path: Path, size=(12, 12), mode="RGB", fmt=None, seed=0, value=None) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1, "CMYK": 4, "RGBA": 4}[mode]
    if value is not None:
        arr = np.full((*size, channels), value, np.uint8)
    else:
        arr = rng.integers(0, 256, (*size, channels), dtype=np.uint8)
    img = Image.fromarray(arr[..., 0] if channels == 1 else arr, mode=mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)


def make_imagefolder(root: Path, classes=("cat", "dog"), per_class=(6, 3), size=(12, 12)) -> Path:
    """A tiny ImageFolder whose classes differ in brightness, so a net can learn them."""
    for split, n in zip(("train", "val"), per_class):
        for ci, name in enumerate(classes):
            for i in range(n):
                write_image(root / split / name / f"{i}.png", size=size, seed=ci * 100 + i,
                            value=40 + 170 * ci + (i % 3))
    return root


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    return make_imagefolder(tmp_path / "data")


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, GLOG_v="3", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, *args], cwd=cwd or ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
