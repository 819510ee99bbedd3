"""scripts/run_train.sh: argument checks, dry runs for Ascend/GPU, rank supervision, and a real 2-worker CPU run."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, make_imagefolder

from src.errors import UserError
from src.launch import Plan, Rank, _run_ranks, parse_devices


def _sh(*args, env=None, timeout=120):
    import os

    return subprocess.run(["sh", "scripts/run_train.sh", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "GLOG_v": "3", **(env or {})})


def _rank_table(path: Path, n: int) -> Path:
    devices = [{"device_id": str(i), "device_ip": f"192.98.92.{100 + i}", "rank_id": str(i)} for i in range(n)]
    path.write_text(json.dumps({"version": "1.0", "server_count": "1", "status": "completed",
                                "server_list": [{"server_id": "10.155.111.140", "device": devices}]}))
    return path


def test_parse_devices():
    assert parse_devices("0-7") == list(range(8))
    assert parse_devices("0,2,4,6") == [0, 2, 4, 6]
    assert parse_devices("0-1,4") == [0, 1, 4]
    for bad in ("a", "3-1", "0,0", "8", ""):
        with pytest.raises(UserError):
            parse_devices(bad)


def test_ascend_8p_dry_run(tmp_path):
    table = _rank_table(tmp_path / "hccl_8p.json", 8)
    proc = _sh("Ascend", "8", "0-7", str(table), str(tmp_path), "--epoch_size", "3", "--output_path",
               str(tmp_path / "out"), env={"DRY_RUN": "1"})
    assert proc.returncode == 0, proc.stderr
    for i in range(8):
        assert f"rank {i}: DEVICE_ID={i} RANK_ID={i} RANK_SIZE=8 RANK_TABLE_FILE={table} HCCL_CONNECT_TIMEOUT=600" \
            in proc.stdout
        assert f"cd {tmp_path / 'out' / f'rank_{i}'} && " in proc.stdout
        assert f"> {tmp_path / 'out' / f'rank_{i}' / 'log.txt'} 2>&1" in proc.stdout
    commands = [line for line in proc.stdout.splitlines() if line.startswith("  cd ")]
    assert len(commands) == 8
    assert all("train.py --platform Ascend" in c and "--run_distribute True --epoch_size 3" in c for c in commands)
    assert not (tmp_path / "out").exists()  # a dry run launches and writes nothing


def test_gpu_4p_dry_run(tmp_path):
    proc = _sh("GPU", "4", "0,2,4,6", str(tmp_path), "--config_path", "configs/resnet50_imagenet.yaml",
               env={"DRY_RUN": "1"})
    assert proc.returncode == 0, proc.stderr
    for i in range(4):
        assert f"rank {i}: CUDA_VISIBLE_DEVICES=0,2,4,6 RANK_ID={i} RANK_SIZE=4 (msrun worker {i})" in proc.stdout
    command = re.search(r"^command: CUDA_VISIBLE_DEVICES=0,2,4,6 msrun (.*)$", proc.stdout, re.M).group(1)
    assert "--worker_num=4 --local_worker_num=4" in command and "--join=True" in command
    assert "--platform GPU" in command and "--config_path configs/resnet50_imagenet.yaml" in command


def test_fine_tune_arguments_reach_train_py(tmp_path):
    ckpt = tmp_path / "m.ckpt"
    ckpt.write_bytes(b"x")
    proc = _sh("CPU", str(tmp_path), str(ckpt), "backbone", "True", env={"DRY_RUN": "1"})
    assert proc.returncode == 0, proc.stderr
    assert f"--pretrain_ckpt {ckpt} --freeze_layer backbone --filter_head True" in proc.stdout
    assert "--run_distribute" not in proc.stdout


@pytest.mark.parametrize("args,message", [
    ([], "no platform given"),
    (["TPU", "x"], "platform 'TPU' is not one of Ascend, GPU, CPU"),
    (["GPU", "4", "0-3"], "GPU needs 3 arguments"),
    (["CPU"], "DATASET_PATH is missing"),
    (["CPU", "{data}", "{ckpt}"], "CKPT_PATH needs FREEZE_LAYER after it"),
])
def test_usage_errors_print_the_usage(tmp_path, args, message):
    ckpt = tmp_path / "m.ckpt"
    ckpt.write_bytes(b"x")
    proc = _sh(*[a.format(data=tmp_path, ckpt=ckpt) for a in args])
    assert proc.returncode == 2 and message in proc.stderr
    assert "usage:\n  sh scripts/run_train.sh Ascend DEVICE_NUM VISIBLE_DEVICES RANK_TABLE_FILE" in proc.stderr


@pytest.mark.parametrize("args,message", [
    (["GPU", "9", "0-8", "{data}"], "DEVICE_NUM '9' must be 1..8 per node"),
    (["GPU", "4", "0-2", "{data}"], "VISIBLE_DEVICES '0-2' names 3 devices but DEVICE_NUM is 4"),
    (["Ascend", "2", "0,1", "{missing}", "{data}"], "RANK_TABLE_FILE {missing} not found"),
    (["Ascend", "2", "0,1", "{bad_json}", "{data}"], "is not an HCCL rank table"),
    (["Ascend", "8", "0-7", "{table2}", "{data}"], "lists 2 devices but DEVICE_NUM is 8"),
    (["CPU", "2", "{missing}"], "DATASET_PATH {missing} does not exist"),
    (["CPU", "{data}", "{missing}", "none"], "CKPT_PATH {missing} not found"),
    (["CPU", "{data}", "{ckpt}", "head"], "FREEZE_LAYER 'head' is not none or backbone"),
    (["CPU", "{data}", "--epoch_size", "zero"], "--epoch_size got 'zero' (use an integer)"),
])
def test_invalid_calls_are_refused(tmp_path, args, message):
    names = {"data": tmp_path, "missing": tmp_path / "missing", "ckpt": tmp_path / "m.ckpt",
             "bad_json": tmp_path / "bad.json", "table2": _rank_table(tmp_path / "t2.json", 2)}
    names["ckpt"].write_bytes(b"x")
    names["bad_json"].write_text("{not json")
    proc = _sh(*[a.format(**names) for a in args], env={"DRY_RUN": "1"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ") and message.format(**names) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_failing_rank_stops_the_others(tmp_path):
    sleeper = Rank(0, {}, [sys.executable, "-c", "import time; time.sleep(120)"], tmp_path / "r0", tmp_path / "r0.log")
    failer = Rank(1, {}, [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], tmp_path / "r1",
                  tmp_path / "r1.log")
    plan = Plan("Ascend", 2, [0, 1], None, [], tmp_path, ranks=[sleeper, failer])
    code = _run_ranks(plan)
    assert code == 1 and (tmp_path / "r1.log").read_text().strip() == "boom"


def test_two_cpu_workers_train_data_parallel(tmp_path):
    """A real msrun run: both ranks end with identical weights, each having read a different shard."""
    data = make_imagefolder(tmp_path / "data", per_class=(8, 2))
    out = tmp_path / "out"
    proc = _sh("CPU", "2", str(data), "--output_path", str(out), "--epoch_size", "2", "--batch_size", "4",
               "--width", "0.25", "--image_size", "32", "--num_classes", "2", "--warmup_epochs", "0",
               "--num_parallel_workers", "1", "--fingerprint_data", "True", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summaries = {}
    for rank in (0, 1):
        log = (out / "logs" / f"worker_{rank}.log").read_text()
        m = re.search(rf"rank {rank} of 2: trained on data sha256 (\w+); final weights sha256 (\w+)", log)
        assert m, log[-2000:]
        summaries[rank] = m.groups()
        assert re.search(r"^epoch: 2 step: 2, loss is", log, re.M)  # 16 images / 2 ranks / batch 4
    assert summaries[0][1] == summaries[1][1]  # identical weights
    assert summaries[0][0] != summaries[1][0]  # different shards
    # only rank 0 writes outputs (demo.yaml saves every 5th and the last epoch)
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == ["best.ckpt", "mobilenetv2-2_2.ckpt"]
    assert len(list((out / "metrics.csv").read_text().splitlines())) == 3
    assert f"all 2 ranks finished; outputs in {out}" in proc.stdout and "error:" not in proc.stderr
