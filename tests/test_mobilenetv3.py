"""MobileNetV3 through the command line: mixed-precision training, ONNX export and head-only fine-tuning."""
from __future__ import annotations

import re

import pytest
from conftest import DIFF_LINE, TINY_NET, make_imagefolder, run_cli, with_flags

TINY = with_flags(TINY_NET, model="mobilenetv3_small", width=0.5, batch_size=4, warmup_epochs=0)


@pytest.fixture(scope="module")
def trained_v3(tmp_path_factory):
    root = tmp_path_factory.mktemp("v3")
    data = make_imagefolder(root / "data")
    out = root / "out"
    proc = run_cli("train.py", "--dataset_path", str(data), "--output_path", str(out), "--epoch_size", "1",
                   "--amp_level", "O2", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, data, out


def test_trains_at_o2_and_exports_to_onnx(trained_v3):
    root, data, out = trained_v3
    log = (out / "train.log").read_text()
    assert "mobilenetv3_small on CPU (full net)" in log and "amp O2" in log
    # O2 trains on CPU, with Paddle's warning that it is no faster there
    assert "warning: AMP O2 brings no speed-up on CPU" in log
    assert re.search(r"^\[Epoch 1\] val top1: \d\.\d{5}", log, re.M)
    proc = run_cli("export.py", "--output_path", str(out), "--file_format", "ONNX", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(DIFF_LINE.search(proc.stdout).group(1)) <= 1e-4
    assert (out / "mobilenetv3_small.onnx").is_file()


def test_head_only_fine_tuning_drops_only_the_class_layer(trained_v3):
    root, _, out = trained_v3
    data3 = make_imagefolder(root / "data3", classes=("a", "b", "c"))
    proc = run_cli("train.py", "--dataset_path", str(data3), "--output_path", str(root / "ft"), "--epoch_size", "2",
                   "--pretrain_ckpt", str(out / "checkpoint" / "best.ckpt"), "--filter_head", "True",
                   "--freeze_layer", "backbone", "--lr_max", "0.05", *with_flags(TINY, num_classes=3))
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (root / "ft" / "train.log").read_text()
    assert "dropped 2 classifier parameters (classifier.3.bias, classifier.3.weight), 2 left at init" in log
    assert "head only, on cached backbone features" in log
