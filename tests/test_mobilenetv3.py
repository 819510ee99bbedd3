"""MobileNetV3 through the command line: mixed-precision training, ONNX export and head-only fine-tuning."""
from __future__ import annotations

import re

import pytest
from conftest import make_imagefolder, run_cli

TINY = ["--model", "mobilenetv3_small", "--width", "0.5", "--image_size", "32", "--num_parallel_workers", "1",
        "--batch_size", "4", "--warmup_epochs", "0"]
DIFF = re.compile(r"max abs diff vs the MindSpore net: (\S+)$", re.M)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("v3")
    data = make_imagefolder(root / "data")
    out = root / "out"
    proc = run_cli("train.py", "--dataset_path", str(data), "--output_path", str(out), "--epoch_size", "1",
                   "--num_classes", "2", "--amp_level", "O2", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, data, out


def test_trains_at_o2_and_exports_to_onnx(trained):
    root, data, out = trained
    log = (out / "train.log").read_text()
    assert "mobilenetv3_small on CPU (full net)" in log and "amp O2" in log
    assert re.search(r"^\[Epoch 1\] val top1: \d\.\d{5}", log, re.M)
    proc = run_cli("export.py", "--output_path", str(out), "--file_format", "ONNX", "--num_classes", "2", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(DIFF.search(proc.stdout).group(1)) <= 1e-4
    assert (out / "mobilenetv3_small.onnx").is_file()


def test_head_only_fine_tuning_drops_only_the_class_layer(trained):
    root, _, out = trained
    data3 = make_imagefolder(root / "data3", classes=("a", "b", "c"))
    proc = run_cli("train.py", "--dataset_path", str(data3), "--output_path", str(root / "ft"), "--epoch_size", "2",
                   "--num_classes", "3", "--pretrain_ckpt", str(out / "checkpoint" / "best.ckpt"), "--filter_head",
                   "True", "--freeze_layer", "backbone", "--lr_max", "0.05", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (root / "ft" / "train.log").read_text()
    assert "dropped 2 classifier parameters (classifier.3.bias, classifier.3.weight), 2 left at init" in log
    assert "head only, on cached backbone features" in log
