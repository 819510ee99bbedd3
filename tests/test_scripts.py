"""The shell launchers check their arguments before starting Python."""
from __future__ import annotations

import subprocess

from conftest import ROOT


def _sh(*args):
    return subprocess.run(["sh", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_run_train_usage_and_checks(tmp_path):
    assert _sh("scripts/run_train.sh").returncode == 2
    assert "usage: sh scripts/run_train.sh CPU DATASET_PATH" in _sh("scripts/run_train.sh", "CPU").stderr
    proc = _sh("scripts/run_train.sh", "CPU", str(tmp_path / "missing"))
    assert proc.returncode == 2 and "DATASET_PATH" in proc.stderr and "does not exist" in proc.stderr
    proc = _sh("scripts/run_train.sh", "TPU", str(tmp_path))
    assert proc.returncode == 2 and "platform 'TPU'" in proc.stderr


def test_run_eval_usage_and_checks(tmp_path):
    assert "usage:" in _sh("scripts/run_eval.sh", "CPU", str(tmp_path)).stderr
    proc = _sh("scripts/run_eval.sh", "CPU", str(tmp_path), str(tmp_path / "x.ckpt"))
    assert proc.returncode == 2 and "CHECKPOINT_PATH" in proc.stderr and "not found" in proc.stderr


def test_run_train_passes_overrides_to_train_py(tmp_path):
    # a bad override reaches train.py, which refuses it with its own one-line error
    proc = _sh("scripts/run_train.sh", "CPU", str(tmp_path), "--epoch_size", "zero")
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --epoch_size got 'zero' (use an integer)"


def test_run_export_and_eval_onnx_checks(tmp_path):
    assert "usage: sh scripts/run_export.sh" in _sh("scripts/run_export.sh", "x.ckpt").stderr
    proc = _sh("scripts/run_export.sh", str(tmp_path / "x.ckpt"), "PDF")
    assert proc.returncode == 2 and "'PDF' is not one of MINDIR, ONNX, AIR" in proc.stderr
    proc = _sh("scripts/run_export.sh", str(tmp_path / "x.ckpt"), "ONNX")
    assert proc.returncode == 2 and "CKPT_FILE" in proc.stderr and "not found" in proc.stderr
    assert "usage: sh scripts/run_eval_onnx.sh" in _sh("scripts/run_eval_onnx.sh", str(tmp_path)).stderr
    proc = _sh("scripts/run_eval_onnx.sh", str(tmp_path), str(tmp_path / "m.onnx"))
    assert proc.returncode == 2 and "ONNX_FILE" in proc.stderr and "not found" in proc.stderr
