"""The shell launchers check their arguments before starting Python."""
from __future__ import annotations

from conftest import run_sh


def test_run_eval_usage_and_checks(tmp_path):
    assert "usage:" in run_sh("scripts/run_eval.sh", "CPU", str(tmp_path)).stderr
    proc = run_sh("scripts/run_eval.sh", "CPU", str(tmp_path), str(tmp_path / "x.ckpt"))
    assert proc.returncode == 2 and "CHECKPOINT_PATH" in proc.stderr and "not found" in proc.stderr


def test_run_export_and_eval_onnx_checks(tmp_path):
    assert "usage: sh scripts/run_export.sh" in run_sh("scripts/run_export.sh", "x.ckpt").stderr
    proc = run_sh("scripts/run_export.sh", str(tmp_path / "x.ckpt"), "PDF")
    assert proc.returncode == 2 and "'PDF' is not one of MINDIR, ONNX, AIR" in proc.stderr
    proc = run_sh("scripts/run_export.sh", str(tmp_path / "x.ckpt"), "ONNX")
    assert proc.returncode == 2 and "CKPT_FILE" in proc.stderr and "not found" in proc.stderr
    assert "usage: sh scripts/run_eval_onnx.sh" in run_sh("scripts/run_eval_onnx.sh", str(tmp_path)).stderr
    proc = run_sh("scripts/run_eval_onnx.sh", str(tmp_path), str(tmp_path / "m.onnx"))
    assert proc.returncode == 2 and "ONNX_FILE" in proc.stderr and "not found" in proc.stderr
