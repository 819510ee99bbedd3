"""benchmark.py's output format (not its speed)."""
from __future__ import annotations

import json

import pytest
from conftest import make_imagefolder, run_cli

SMALL = ["--width", "0.25", "--image_size", "32", "--batch_size", "2", "--num_classes", "10", "--steps", "2",
         "--warmup", "1", "--json", "True"]


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_train_and_infer_report_json(mode):
    proc = run_cli("benchmark.py", "--model", "mobilenetv2", "--mode", mode, *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    for key in ("img_per_s", "median_step_s", "compile_s", "peak_rss_mb"):
        assert isinstance(result[key], float) and result[key] > 0, key
    assert result["mode"] == mode and result["batch_size"] == 2 and result["image_size"] == 32
    assert lines[0].startswith(f"{mode} mobilenetv2: ") and " images/s, median step " in lines[0]


def test_data_mode_reports_the_cost_per_image(tmp_path):
    data = make_imagefolder(tmp_path / "d", per_class=(6, 1), size=(48, 40))
    proc = run_cli("benchmark.py", "--mode", "data", "--dataset_path", str(data), "--num_classes", "2",
                   "--num_parallel_workers", "1", *SMALL[2:6], *SMALL[8:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["per_image_ms"] > 0 and result["img_per_s"] > 0 and result["workers"] == 1
    assert "ms of CPU per image (1 workers)" in proc.stdout


def test_data_mode_needs_a_dataset():
    proc = run_cli("benchmark.py", "--mode", "data")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --mode data needs --dataset_path")


def test_json_off_prints_no_json():
    proc = run_cli("benchmark.py", "--mode", "infer", *SMALL[:-2])
    assert proc.returncode == 0 and not proc.stdout.strip().splitlines()[-1].startswith("{")


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_rounds_alternate_with_the_reference_and_report_the_median_ratio(tmp_path, mode):
    # a stand-in for shared/bench/torch_reference.py with its output format (CI has no PyTorch)
    fake = tmp_path / "reference.py"
    fake.write_text('import json\nprint(json.dumps({"img_per_s": 100.0, "torch": "x", "layout": "nchw"}))\n')
    proc = run_cli("benchmark.py", "--model", "mobilenetv2", "--mode", mode, "--torch_reference", str(fake),
                   "--rounds", "3", *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result["ratios"]) == 3 and result["torch_img_per_s"] == 100.0
    assert result["ratio_vs_torch"] == sorted(result["ratios"])[1]
    assert proc.stdout.count("PyTorch x eager (nchw): 100.00 images/s; this project ") == 3
    assert "median ratio over 3 alternating rounds: " in proc.stdout


def test_rounds_need_the_reference():
    proc = run_cli("benchmark.py", "--mode", "infer", "--rounds", "3", *SMALL)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --rounds needs --torch_reference")
