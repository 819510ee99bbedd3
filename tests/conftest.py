"""Shared fixtures: CPU settings before MindSpore loads, tiny image folders, and a CLI runner."""
from __future__ import annotations

import atexit
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GLOG_v", "3")
# the tests' caches (image checks, compiled graphs) live and die with the test session, not in the user's ~/.cache;
# pytest-xdist's workers inherit the folder of the process that started them and share it (it removes it at the end)
if "CLS_TEST_CACHE_DIR" not in os.environ:
    os.environ["CLS_TEST_CACHE_DIR"] = tempfile.mkdtemp(prefix="cls-cache-")
    atexit.register(shutil.rmtree, os.environ["CLS_TEST_CACHE_DIR"], True)
os.environ["CLS_CACHE_DIR"] = os.environ["CLS_TEST_CACHE_DIR"]

from src.device import prepare_cpu_environment  # noqa: E402

prepare_cpu_environment()


# `pytest -m "not e2e"`: the unit tests alone, in about a minute. A test is end-to-end when it starts another process
# (a command, a launcher, a subprocess), itself or through a `_helper` of its module, or uses the shared training run;
# marked here, so a new test is marked by what it does and no list has to be kept.
E2E_FIXTURES = {"trained", "earlier_run"}
E2E_CALLS = re.compile(r"\b(run_cli|run_sh|_faulty_training|_start_node|subprocess\.(run|Popen|check_output))\(")


def _starts_a_process(function, module, seen: set) -> bool:
    """Whether the function's source, or that of a helper of its module it calls (at any depth), starts a process."""
    import inspect

    if function in seen:
        return False
    seen.add(function)
    source = inspect.getsource(function)
    if E2E_CALLS.search(source):
        return True
    helpers = (getattr(module, name, None) for name in set(re.findall(r"\b(_\w+)\(", source)))
    return any(inspect.isfunction(h) and h.__module__ == module.__name__ and _starts_a_process(h, module, seen)
               for h in helpers)


def pytest_collection_modifyitems(config, items):
    for item in items:
        function = getattr(item, "function", None)
        if E2E_FIXTURES & set(getattr(item, "fixturenames", ())) or (
                function and _starts_a_process(function, item.module, set())):
            item.add_marker(pytest.mark.e2e)


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


def run_sh(script: str, *args: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """A shell launcher of scripts/ run as users run it: `sh scripts/X.sh ARGS` from the package folder."""
    return subprocess.run(["sh", script, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "GLOG_v": "3", **(env or {})})


# The tiny net every end-to-end test uses, and the training flags on top of it.
TINY_NET = ["--width", "0.25", "--image_size", "32", "--num_classes", "2", "--num_parallel_workers", "1"]
TINY_TRAIN = [*TINY_NET, "--batch_size", "4", "--print_freq", "2", "--lr_max", "0.05", "--warmup_epochs", "0"]
# the lines users (and their scripts) read
RESULT_LINE = re.compile(r"^result:\{'acc': (\d\.\d{4}), 'top_5_accuracy': (\d\.\d{4})\} ckpt=(\S+)$", re.M)
DIFF_LINE = re.compile(r"max abs diff vs the MindSpore net: (\S+)$", re.M)
PADDLE_LINE = re.compile(r"^\[Epoch (\d+), iter: (\d+)\] top1: [01]\.\d{5}, top5: [01]\.\d{5}, lr: (\d+\.\d{5}), "
                         r"loss: \d+\.\d{5}, avg_reader_cost: \d+\.\d{5} sec, avg_batch_cost: \d+\.\d{5} sec, "
                         r"avg_samples: 4\.0, avg_ips: \d+\.\d{5} images/sec\.$", re.M)


class TrainedRun(NamedTuple):
    data: Path
    out: Path
    proc: subprocess.CompletedProcess


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> TrainedRun:
    """One real 2-epoch training of a tiny MobileNetV2 (checkpoints after each epoch, curves in TensorBoard and in
    MLflow's default store), shared by every test that
    needs a trained run. Tests read it; whatever a test writes goes to its own tmp_path or next to the run's
    checkpoint folder (exports), never into checkpoint/, metrics.csv, train.log or eval.log."""
    root = tmp_path_factory.mktemp("run")
    data = make_imagefolder(root / "data")
    out = root / "out"
    proc = run_cli("train.py", "--dataset_path", str(data), "--output_path", str(out), "--epoch_size", "2",
                   "--save_checkpoint_epochs", "1", "--keep_checkpoint_max", "5", "--tracker", "tensorboard,mlflow",
                   *TINY_TRAIN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return TrainedRun(data, out, proc)


def with_flags(args: list[str], **values) -> list[str]:
    """`args` with the given flags' values replaced (or appended): with_flags(TINY_NET, image_size=48)."""
    out = list(args)
    for key, value in values.items():
        flag = f"--{key}"
        if flag in out:
            out[out.index(flag) + 1] = str(value)
        else:
            out += [flag, str(value)]
    return out
