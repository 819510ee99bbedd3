"""benchmark.py's output format (not its speed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, make_imagefolder, run_cli

from benchmark import THREAD_VARIABLES

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


# A stand-in for shared/bench/torch_reference.py with its output format (CI has no PyTorch) that also writes down
# the threading variables it was started with, as Python and as a shell (the C-level environment) see them.
FAKE_REFERENCE = """import json, os, pathlib, subprocess, sys
shell = subprocess.run(["sh", "-c", "echo ${OMP_NUM_THREADS:-unset} ${OMP_WAIT_POLICY:-unset}"],
                       capture_output=True, text=True).stdout.split()
seen = {"python": [os.environ.get("OMP_NUM_THREADS", "unset"), os.environ.get("OMP_WAIT_POLICY", "unset")],
        "shell": shell}
with open(pathlib.Path(__file__).with_suffix(".seen"), "a") as f:
    f.write(json.dumps(seen) + "\\n")
print(json.dumps({"img_per_s": 100.0, "torch": "x", "layout": "nchw", "threads": 2}))
"""


@pytest.mark.parametrize("mode, users_threads", [("train", None), ("infer", "2")])
def test_rounds_alternate_with_a_reference_that_sees_only_the_users_environment(tmp_path, mode, users_threads):
    """MindSpore puts OMP_NUM_THREADS=1 into its process's C environment and this package sets OMP_WAIT_POLICY;
    a reference started from there ran PyTorch on one thread. It must see what the user started with."""
    fake = tmp_path / "reference.py"
    fake.write_text(FAKE_REFERENCE)
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    if users_threads:
        env["OMP_NUM_THREADS"] = users_threads
    proc = subprocess.run([sys.executable, "benchmark.py", "--model", "mobilenetv2", "--mode", mode,
                           "--torch_reference", str(fake), "--rounds", "3", *SMALL], cwd=ROOT,
                          env={**env, "GLOG_v": "3"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result["ratios"]) == 3 and result["torch_img_per_s"] == 100.0
    assert result["ratio_vs_torch"] == sorted(result["ratios"])[1]
    assert proc.stdout.count("PyTorch x eager (nchw, 2 threads): 100.00 images/s; this project ") == 3
    assert "median ratio over 3 alternating rounds: " in proc.stdout
    seen = [json.loads(line) for line in fake.with_suffix(".seen").read_text().splitlines()]
    expected = [users_threads or "unset", "unset"]
    assert seen == [{"python": expected, "shell": expected}] * 3
    assert result["torch_env"] == ({"OMP_NUM_THREADS": users_threads} if users_threads else {})
    # this project's side sets its own (in its own process) and says so, with its thread counts
    assert result["env"]["OMP_WAIT_POLICY"] == "PASSIVE"
    assert result["env"]["OMP_NUM_THREADS"] == (users_threads or "1")  # MindSpore's 1 unless the user chose
    assert result["threads"]["process"] > 1 and result["threads"]["mindspore_runtime"] >= 1
    # the C++ kernels run on every core (libgomp read its settings before MindSpore's setenv), or the user's count
    cores = int(users_threads) if users_threads else len(os.sched_getaffinity(0))
    assert result["threads"]["cpp_kernels_openmp"] == cores
    assert f"C++ kernels {result['threads']['cpp_kernels_openmp']} OpenMP" in proc.stdout
    assert 0 <= result["idle_worker_cpu_s"] < 5


def test_rounds_need_the_reference():
    proc = run_cli("benchmark.py", "--mode", "infer", "--rounds", "3", *SMALL)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --rounds needs --torch_reference")


def test_a_missing_reference_is_refused_before_anything_runs(tmp_path):
    proc = run_cli("benchmark.py", "--mode", "infer", "--torch_reference", str(tmp_path / "nope.py"), *SMALL)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: --torch_reference {tmp_path / 'nope.py'} is not")
    assert "images/s" not in proc.stdout  # refused before the worker started


def test_a_killed_timing_process_ends_the_benchmark_with_one_line(tmp_path):
    # the stand-in reference kills this project's timing process (its sibling) in the first round, as the OOM
    # killer would
    fake = tmp_path / "reference.py"
    fake.write_text("""import json, os, signal
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        cmdline = open(f"/proc/{pid}/cmdline").read()
    except OSError:
        continue
    if int(stat[1]) == os.getppid() and "--worker" in cmdline:
        os.kill(int(pid), signal.SIGKILL)
print(json.dumps({"img_per_s": 100.0, "torch": "x", "layout": "nchw", "threads": 2}))
""")
    proc = run_cli("benchmark.py", "--model", "mobilenetv2", "--mode", "infer", "--torch_reference", str(fake),
                   "--rounds", "2", *SMALL)
    assert proc.returncode == 128 + 9, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == ("error: this project's timing process was killed by SIGKILL (out "
                                                    "of memory? see dmesg; then run the benchmark again)")
    assert not proc.stdout.strip().splitlines()[-1].startswith("{")  # no result line


def test_mindcv_reference_runs_mindcvs_net_with_this_packages_cpu_settings():
    """mindcv 0.3.0, MindSpore's own model library, timed in its own process each round; it gets the CPU settings
    this package's side ran with (ONEDNN_MAX_CPU_ISA on an AVX-512 CPU, OMP_WAIT_POLICY), so the two MindSpore sides
    differ in the net and the step only."""
    proc = run_cli("benchmark.py", "--model", "mobilenetv2", "--mode", "infer", "--mindcv_reference", "True",
                   "--rounds", "2", *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.stdout.count("mindcv 0.3.0 mobilenet_v2_100 (first step ") == 2
    assert len(result["mindcv_ratios"]) == 2 and result["mindcv_img_per_s"] > 0
    assert result["ratio_vs_mindcv"] == pytest.approx(sum(result["mindcv_ratios"]) / 2)  # the median of two
    assert result["mindcv_env"] == {k: result["env"][k] for k in ("ONEDNN_MAX_CPU_ISA", "OMP_WAIT_POLICY")
                                    if k in result["env"]}
    assert "ratio_vs_torch" not in result


def test_mindcv_reference_is_refused_for_the_data_mode():
    proc = run_cli("benchmark.py", "--mode", "data", "--dataset_path", "x", "--mindcv_reference", "True")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --mindcv_reference times a net")
