"""scripts/run_train.sh: argument checks, dry runs for Ascend/GPU, rank supervision, and a real 2-worker CPU run."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, make_imagefolder, run_sh

from src.errors import UserError
from src.launch import Plan, Rank, _free_port, _run_ranks, parse_devices

TRAIN = "scripts/run_train.sh"


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
    proc = run_sh(TRAIN, "Ascend", "8", "0-7", str(table), str(tmp_path), "--epoch_size", "3", "--output_path",
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
    proc = run_sh(TRAIN, "GPU", "4", "0,2,4,6", str(tmp_path), "--config_path", "configs/resnet50_imagenet.yaml",
                  env={"DRY_RUN": "1"})
    assert proc.returncode == 0, proc.stderr
    for i in range(4):
        assert f"rank {i}: CUDA_VISIBLE_DEVICES=0,2,4,6 RANK_ID={i} RANK_SIZE=4 (msrun worker {i})" in proc.stdout
    command = re.search(r"^command: CUDA_VISIBLE_DEVICES=0,2,4,6 msrun (.*)$", proc.stdout, re.M).group(1)
    assert "--worker_num=4 --local_worker_num=4" in command and "--join=True" in command
    assert "--platform GPU" in command and "--config_path configs/resnet50_imagenet.yaml" in command
    # the recipe sinks on GPU, one sink per epoch
    assert "every rank: Model.train(..., dataset_sink_mode=True, sink_size=-1): one sink per epoch" in proc.stdout


def _two_server_table(path: Path, ranks=None) -> Path:
    """An HCCL rank table for 2 servers x 8 devices (ranks 0..7 on 10.0.0.1, 8..15 on 10.0.0.2)."""
    ranks = ranks or list(range(16))
    servers = [{"server_id": f"10.0.0.{s + 1}", "container_ip": f"10.0.0.{s + 1}", "host_nic_ip": "reserve",
                "device": [{"device_id": str(d), "device_ip": f"192.98.{s}.{d}", "rank_id": str(ranks[s * 8 + d])}
                           for d in range(8)]} for s in range(2)]
    path.write_text(json.dumps({"version": "1.0", "server_count": "2", "status": "completed",
                                "server_list": servers}))
    return path


@pytest.mark.parametrize("server_id", ["10.0.0.2", "1"])
def test_ascend_two_servers_dry_run(tmp_path, server_id):
    """The second server of a 16-device job runs ranks 8..15 with RANK_SIZE 16, found by SERVER_ID."""
    table = _two_server_table(tmp_path / "hccl_16p.json")
    proc = run_sh(TRAIN, "Ascend", "8", "0-7", str(table), str(tmp_path), "--output_path", str(tmp_path / "out"),
                  "--dataset_sink_mode", "True", "--sink_size", "100", env={"DRY_RUN": "1", "SERVER_ID": server_id})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("node 1 of 2: ranks 8..15 of 16\n")
    for d in range(8):
        assert f"rank {8 + d}: DEVICE_ID={d} RANK_ID={8 + d} RANK_SIZE=16 RANK_TABLE_FILE={table} " \
               "HCCL_CONNECT_TIMEOUT=600" in proc.stdout
        assert f"> {tmp_path / 'out' / f'rank_{8 + d}' / 'log.txt'} 2>&1" in proc.stdout
    assert proc.stdout.count("--run_distribute True") == 8 and not (tmp_path / "out").exists()
    assert proc.stdout.endswith("every rank: Model.train(..., dataset_sink_mode=True, sink_size=100): sinks of 100 "
                                "steps, a log line and train top-1/top-5 per sink\n")


def test_gpu_two_nodes_dry_run(tmp_path):
    env = {"DRY_RUN": "1", "NODE_NUM": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "CLUSTER_TIMEOUT": "900"}
    proc = run_sh(TRAIN, "GPU", "4", "0-3", str(tmp_path), env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("node 1 of 2: ranks 4..7 of 8, master 10.0.0.1:8118\n")
    for i in range(4):
        assert f"rank {4 + i}: CUDA_VISIBLE_DEVICES=0,1,2,3 RANK_ID={4 + i} RANK_SIZE=8 (msrun worker {4 + i})" \
            in proc.stdout
    command = re.search(r"^command: CUDA_VISIBLE_DEVICES=0,1,2,3 msrun (.*)$", proc.stdout, re.M).group(1)
    assert command.startswith("--worker_num=8 --local_worker_num=4 --node_rank=1 --master_addr=10.0.0.1 "
                              "--master_port=8118 ")
    assert "--join=True --cluster_time_out=900 " in command and "--run_distribute True" in command


@pytest.mark.parametrize("args,env,message", [
    (["Ascend", "8", "0-7", "{table16}", "{data}"], {"SERVER_ID": "10.0.0.9"},
     "SERVER_ID '10.0.0.9' is neither a server_id of RANK_TABLE_FILE {table16} (10.0.0.1, 10.0.0.2) nor an index"),
    (["Ascend", "8", "0-7", "{table16}", "{data}"], {},
     "lists servers 10.0.0.1, 10.0.0.2 and none is an address of this machine (export SERVER_ID="),
    (["Ascend", "8", "0-7", "{bad_ranks}", "{data}"], {"SERVER_ID": "1"},
     "has rank_ids [0, 1, 2, 3, 4, 5, 6, 7, ... 16] across its servers, not 0..15 each once"),
    (["Ascend", "4", "0-3", "{table16}", "{data}"], {"SERVER_ID": "1"},
     "lists 8 devices for server 10.0.0.2 but DEVICE_NUM is 4"),
    (["Ascend", "8", "0-7", "{table16}", "{data}"], {"SERVER_ID": "1", "NODE_NUM": "3"},
     "NODE_NUM is 3 but RANK_TABLE_FILE {table16} lists 2 servers"),
    (["GPU", "4", "0-3", "{data}"], {"NODE_NUM": "2", "NODE_RANK": "2", "MASTER_ADDR": "10.0.0.1"},
     "NODE_RANK 2 is out of range for NODE_NUM 2 (use 0..1"),
    (["GPU", "4", "0-3", "{data}"], {"NODE_NUM": "2", "NODE_RANK": "1"},
     "MASTER_ADDR is not set but NODE_NUM is 2 (export MASTER_ADDR=<node 0's IP address> on every node)"),
    (["CPU", "{data}"], {"NODE_NUM": "2", "MASTER_ADDR": "no-such-host.invalid"},
     "MASTER_ADDR 'no-such-host.invalid' is not an IP address or a known host name"),
    (["CPU", "{data}"], {"NODE_NUM": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "80"},
     "MASTER_PORT '80' must be 1024..65535"),
    (["CPU", "{data}"], {"NODE_NUM": "0"}, "NODE_NUM '0' must be 1..4096"),
    (["CPU", "{data}"], {"NODE_NUM": "2", "MASTER_ADDR": "10.0.0.1"},
     "NODE_RANK is 0 but MASTER_ADDR 10.0.0.1 is not an address of this machine (node 0 runs the scheduler"),
    (["CPU", "{data}"], {"NODE_NUM": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "CLUSTER_TIMEOUT": "1e9"},
     "CLUSTER_TIMEOUT '1e9' must be 1..86400"),
    (["Ascend", "8", "0-7", "{table16}", "{data}"], {"NODE_RANK": "0", "SERVER_ID": "1"},
     "NODE_RANK 0 but SERVER_ID '1' is server 1 of RANK_TABLE_FILE {table16}"),
    (["Ascend", "4", "0-3", "{uneven}", "{data}"], {"SERVER_ID": "1"},
     "RANK_TABLE_FILE {uneven} lists 8 on 10.0.0.1, 4 on 10.0.0.2 (every server of a job runs DEVICE_NUM devices"),
])
def test_inconsistent_clusters_are_refused(tmp_path, args, env, message):
    names = {"data": tmp_path, "table16": _two_server_table(tmp_path / "t16.json"),
             "bad_ranks": _two_server_table(tmp_path / "bad.json", ranks=[*range(15), 16]),
             "uneven": _two_server_table(tmp_path / "uneven.json")}
    table = json.loads(names["uneven"].read_text())
    table["server_list"][1]["device"] = table["server_list"][1]["device"][:4]
    names["uneven"].write_text(json.dumps(table))
    proc = run_sh(TRAIN, *[a.format(**names) for a in args], env={"DRY_RUN": "1", **env})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ") and message.format(**names) in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not proc.stdout


def test_fine_tune_arguments_reach_train_py(tmp_path):
    ckpt = tmp_path / "m.ckpt"
    ckpt.write_bytes(b"x")
    proc = run_sh(TRAIN, "CPU", str(tmp_path), str(ckpt), "backbone", "True", env={"DRY_RUN": "1"})
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
    proc = run_sh(TRAIN, *[a.format(data=tmp_path, ckpt=ckpt) for a in args])
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
    proc = run_sh(TRAIN, *[a.format(**names) for a in args], env={"DRY_RUN": "1"})
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


def test_two_cpu_workers_train_data_parallel_and_resume(tmp_path):
    """A real msrun run, reading MindRecord shards: both ranks end with identical weights, each having read a
    different half; resuming it from rank 0's periodic checkpoint, on the image folder the shards were made from,
    restores both ranks identically."""
    from src.data.mindrecord import write_dataset

    data = make_imagefolder(tmp_path / "data", per_class=(8, 2))
    splits = {split: [(p, label) for label, name in enumerate(("cat", "dog"))
                      for p in sorted((data / split / name).iterdir())] for split in ("train", "val")}
    write_dataset(tmp_path / "shards", splits, ["cat", "dog"], 4, "test")  # train: 4 shards of 4 images
    out = tmp_path / "out"
    common = ["--batch_size", "4", "--width", "0.25", "--image_size", "32", "--num_classes", "2", "--warmup_epochs",
              "0", "--num_parallel_workers", "1", "--epoch_size", "3"]
    proc = run_sh(TRAIN, "CPU", "2", str(tmp_path / "shards"), "--dataset", "mindrecord", "--output_path", str(out),
                  *common, "--save_checkpoint_epochs", "2", "--fingerprint_data", "True", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summaries = {}
    for rank in (0, 1):
        log = (out / "logs" / f"worker_{rank}.log").read_text()
        m = re.search(rf"rank {rank} of 2: trained on data sha256 (\w+); final weights sha256 (\w+)", log)
        assert m, log[-2000:]
        summaries[rank] = m.groups()
        assert re.search(r"^epoch: 3 step: 2, loss is", log, re.M)  # 16 images / 2 ranks / batch 4
    assert summaries[0][1] == summaries[1][1]  # identical weights
    assert summaries[0][0] != summaries[1][0]  # different shards
    # only rank 0 writes outputs (every 2nd and the last epoch)
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == ["best.ckpt", "mobilenetv2-2_2.ckpt",
                                                                      "mobilenetv2-3_2.ckpt"]
    assert len(list((out / "metrics.csv").read_text().splitlines())) == 4
    assert f"all 2 ranks finished; outputs in {out}" in proc.stdout and "error:" not in proc.stderr

    # resume epoch 3 from rank 0's checkpoint of epoch 2, in another folder: both ranks restore the same state
    resumed_out = tmp_path / "resumed"
    proc = run_sh(TRAIN, "CPU", "2", str(data), "--output_path", str(resumed_out), *common,
                  "--resume_ckpt", str(out / "checkpoint" / "mobilenetv2-2_2.ckpt"), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    resumed = {}
    for rank in (0, 1):
        log = (resumed_out / "logs" / f"worker_{rank}.log").read_text()
        assert "from epoch 2 (global step 4)" in log and not re.search(r"^epoch: [12] step", log, re.M)
        resumed[rank] = re.search(rf"rank {rank} of 2: final weights sha256 (\w+)", log).group(1)
    assert resumed[0] == resumed[1]


def _start_node(rank: int, port: int, data: Path, out: Path, *extra: str, timeout: int = 60,
                extra_env: dict | None = None) -> subprocess.Popen:
    """One node of a two-node CPU job on this machine, as a user starts it on each server."""
    import os

    env = {**os.environ, "GLOG_v": "3", "NODE_NUM": "2", "NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "CLUSTER_TIMEOUT": str(timeout), **(extra_env or {})}
    return subprocess.Popen(["sh", "scripts/run_train.sh", "CPU", str(data), "--output_path", str(out),
                             "--batch_size", "4", "--width", "0.25", "--image_size", "32", "--num_classes", "2",
                             "--warmup_epochs", "0", "--num_parallel_workers", "1", *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def test_two_nodes_of_one_cpu_worker_train_together(tmp_path):
    data = make_imagefolder(tmp_path / "data", per_class=(8, 2))
    out, port = tmp_path / "out", _free_port()
    nodes = [_start_node(rank, port, data, out, "--epoch_size", "2") for rank in (0, 1)]
    results = [node.communicate(timeout=900) for node in nodes]
    for node, (stdout, stderr) in zip(nodes, results):
        assert node.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert f"all 1 ranks of node 0 finished; outputs in {out}" in results[0][0]
    assert "all 1 ranks of node 1 finished; rank 0 on node 0 wrote the outputs" in results[1][0]
    digests = {}
    for rank in (0, 1):
        log = (out / "logs" / f"worker_{rank}.log").read_text()
        digests[rank] = re.search(rf"rank {rank} of 2: final weights sha256 (\w+)", log).group(1)
        assert re.search(r"^epoch: 2 step: 2, loss is", log, re.M)  # 16 images / 2 ranks / batch 4
    assert digests[0] == digests[1]
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == ["best.ckpt", "mobilenetv2-2_2.ckpt"]


def _process_tree(pid: int) -> set[int]:
    """pid and every process below it (from /proc), e.g. a node's launcher, msrun, its scheduler and workers."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = set(), [pid]
    while todo:
        p = todo.pop()
        tree.add(p)
        todo += children.get(p, [])
    return tree


def _alive(pids: set[int]) -> set[int]:
    import os

    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
        else:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
    return alive


def test_a_node_that_dies_ends_the_other_node(tmp_path):
    """Node 1's server dies mid-run (all its processes killed): node 0 exits non-zero in time, nothing left running."""
    import os
    import signal
    import time

    data = make_imagefolder(tmp_path / "data", per_class=(8, 2))
    out, port = tmp_path / "out", _free_port()
    # MS_NODE_TIMEOUT: how long MindSpore's scheduler waits for a silent node (node 0 ended 38 s after the kill
    # without it, 19 s with 10): the same path, sooner
    nodes = [_start_node(rank, port, data, out, "--epoch_size", "500", timeout=30,
                         extra_env={"MS_NODE_TIMEOUT": "10"})
             for rank in (0, 1)]
    try:
        log1 = out / "logs" / "worker_1.log"
        deadline = time.monotonic() + 300
        while not (log1.is_file() and "epoch: 1 step: 2" in log1.read_text()):
            assert time.monotonic() < deadline and nodes[1].poll() is None, nodes[1].communicate()
            time.sleep(1)
        tree0 = _process_tree(nodes[0].pid)
        killed_at = time.monotonic()
        for pid in _process_tree(nodes[1].pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stdout, stderr = nodes[0].communicate(timeout=180)
        took = time.monotonic() - killed_at
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    assert nodes[0].returncode == 1, stdout[-2000:] + stderr[-2000:]
    assert "error: lost rank 1 of 2: stopped responding to the scheduler" in stderr
    assert took < 120, took
    time.sleep(2)
    assert not _alive(tree0 - {nodes[0].pid}), "node 0 left processes behind"
    from src.engine.checkpoint import read_checkpoint

    for ckpt in (out / "checkpoint").glob("*.ckpt"):  # what rank 0 wrote before the loss is whole
        assert read_checkpoint(ckpt, ckpt.name)[1].epoch_num >= 1
    print(f"node 0 ended {took:.0f} s after node 1 died: {stderr.strip().splitlines()[-1]}")


def test_a_failing_msrun_job_ends_with_one_line_and_no_traceback(tmp_path):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    out = tmp_path / "out"
    proc = run_sh(TRAIN, "CPU", "2", str(tmp_path / "empty"), "--output_path", str(out), "--output_path", str(out),
                  timeout=300)
    assert proc.returncode == 1
    train = tmp_path / "empty" / "train"
    assert proc.stderr.strip() == (f"error: rank 0 failed: {train} has no class folders (put each class's images in "
                                   f"{train}/<class_name>/) (msrun exit code 1); msrun stopped this node's ranks (see "
                                   f"the worker logs and msrun.log in {out / 'logs'})")  # the rank's own line
    assert "Traceback" in (out / "logs" / "msrun.log").read_text()  # msrun's own report stays in its log
    # the launched command names each flag once, though the user repeated one
    command = next(line for line in proc.stdout.splitlines() if line.startswith("command: "))
    assert command.count("--output_path") == 1, command


def _launcher_tree(launcher_pid: int) -> list[int]:
    """The live processes started for a launcher (they carry its PID in their environment)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"CLS_LAUNCHER_PID={launcher_pid}".encode() in environ.read_bytes().split(b"\0") and \
                    (environ.parent / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


def _kill_9_and_wait(launcher: subprocess.Popen, limit: float) -> float:
    import os
    import signal
    import time

    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    killed = time.monotonic()
    while _launcher_tree(launcher.pid) and time.monotonic() - killed < 60:
        time.sleep(0.2)
    took = time.monotonic() - killed
    assert not _launcher_tree(launcher.pid), "processes outlived their launcher"
    assert took < limit, took
    return took


SUPERVISOR = """
import sys
sys.path.insert(0, {root!r})
from pathlib import Path
from src.launch import Plan, Rank, _run_ranks
rank = [sys.executable, "-c", "from src.lifeline import stop_with_launcher; stop_with_launcher(); "
        "import time; print('up', flush=True); time.sleep(300)"]
ranks = [Rank(i, {{}}, rank, Path({root!r}), Path({tmp!r}) / f"r{{i}}.log") for i in (0, 1)]
_run_ranks(Plan("Ascend", 2, [0, 1], None, [], Path({tmp!r}), ranks=ranks))
"""


def test_ranks_in_their_own_sessions_end_when_their_launcher_is_killed(tmp_path):
    """Ascend ranks and a second node's workers are started by the launcher itself, each in its own session."""
    import time

    script = tmp_path / "launcher.py"
    script.write_text(SUPERVISOR.format(root=str(ROOT), tmp=str(tmp_path)))
    launcher = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, start_new_session=True)
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"r{i}.log").is_file() and "up" in (tmp_path / f"r{i}.log").read_text()
                  for i in (0, 1)):
        assert time.monotonic() < deadline and launcher.poll() is None
        time.sleep(0.2)
    assert len(_launcher_tree(launcher.pid)) == 4  # two ranks and their watchers
    _kill_9_and_wait(launcher, limit=5)
    for i in (0, 1):
        assert "warning: the launcher (PID" in (tmp_path / f"r{i}.log").read_text()


def test_msrun_and_its_workers_end_when_the_launcher_is_killed(tmp_path):
    import os
    import time

    data = make_imagefolder(tmp_path / "data", per_class=(8, 2))
    out = tmp_path / "out"
    launcher = subprocess.Popen(
        ["sh", "scripts/run_train.sh", "CPU", "2", str(data), "--output_path", str(out), "--batch_size", "4",
         "--width", "0.25", "--image_size", "32", "--num_classes", "2", "--warmup_epochs", "0",
         "--num_parallel_workers", "1", "--epoch_size", "500"], cwd=ROOT, env={**os.environ, "GLOG_v": "3"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        log = out / "logs" / "worker_0.log"
        deadline = time.monotonic() + 300
        while not (log.is_file() and "epoch: 1 step: 2" in log.read_text()):
            assert time.monotonic() < deadline and launcher.poll() is None
            time.sleep(0.5)
        assert len(_launcher_tree(launcher.pid)) >= 6  # msrun, its scheduler, 2 workers, their tails and watchers
        took = _kill_9_and_wait(launcher, limit=25)
    finally:
        for pid in _launcher_tree(launcher.pid):
            os.kill(pid, 9)
    from src.engine.checkpoint import read_checkpoint

    for ckpt in (out / "checkpoint").glob("*.ckpt"):  # whatever rank 0 wrote is whole
        read_checkpoint(ckpt, ckpt.name)
    assert not list(out.rglob(".tmp-*"))
    print(f"every process of the job ended {took:.1f} s after its launcher was killed")


def test_node_0_refuses_a_master_port_in_use_before_it_starts(tmp_path):
    """Another job's scheduler on MASTER_PORT, or node 0 started twice (two servers both given NODE_RANK=0, tried
    on one machine): said at once, where it failed after CLUSTER_TIMEOUT with 'a rank failed or another node was
    lost'."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"NODE_NUM": "2", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        proc = run_sh(TRAIN, "CPU", str(tmp_path), "--output_path", str(tmp_path / "out"), env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: MASTER_PORT {port} is in use on this machine (another job's scheduler, or node 0 started twice: every "
        "other node needs its own NODE_RANK 1..; Address already in use) (export MASTER_PORT=<a free port>, the same "
        "on every node)"]


def test_a_node_that_never_joins_is_named_on_both_sides(tmp_path):
    """Node 0 alone: the other node never joined; node 1 alone: it could not reach node 0's scheduler. Each says so
    in one line after CLUSTER_TIMEOUT, not 'a rank failed or another node was lost'."""
    data = make_imagefolder(tmp_path / "data", per_class=(8, 2))
    ports = _free_port(), _free_port()  # two jobs of one node each, side by side: neither finds the other
    assert ports[0] != ports[1]
    nodes = [_start_node(rank, ports[rank], data, tmp_path / f"out{rank}", "--epoch_size", "1", timeout=4)
             for rank in (0, 1)]
    alone = [node.communicate(timeout=240) for node in nodes]
    assert [node.returncode for node in nodes] == [1, 1], alone
    err0, err1 = (alone[r][1].strip().splitlines() for r in (0, 1))
    assert len(err0) == 1 and err0[0].startswith(
        f"error: the job's 2 workers did not all reach the scheduler at 127.0.0.1:{ports[0]} within CLUSTER_TIMEOUT 4 "
        "s: the other nodes never joined (start the same command on every other node with its own NODE_RANK 1..")
    assert err1 == [
        "error: rank 1 failed with exit code 2: this node's workers could not join the scheduler at "
        f"127.0.0.1:{ports[1]} within CLUSTER_TIMEOUT 4 s (is node 0 running the same command with NODE_RANK=0? "
        "check MASTER_ADDR and MASTER_PORT, and that this server reaches it through any firewall); the other ranks of "
        "this node were "
        f"stopped (see {tmp_path / 'out1' / 'logs' / 'worker_1.log'})"]
    # the rank's own line does not send the user to the launcher they used
    worker = (tmp_path / "out1" / "logs" / "worker_1.log").read_text()
    assert "launch with sh scripts/run_train.sh" not in worker and "every node must start within CLUSTER_TIMEOUT" \
        in worker
