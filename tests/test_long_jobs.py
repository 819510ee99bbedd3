"""Long jobs that look after themselves: --resume_ckpt auto picks the newest whole checkpoint of the run."""
from __future__ import annotations

import csv
import logging
import shutil

import numpy as np
import pytest
from conftest import TINY_TRAIN
from test_trackers import assert_mlflow_holds_the_epochs, assert_tensorboard_holds_the_epochs, mlflow_runs

from src.config import Config
from src.engine.weights import resolve_auto_resume
from src.errors import NothingToDo, UserError


def _messages(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


def test_auto_resume_choice(trained, tmp_path, caplog):
    from src.config import load_config

    caplog.set_level(logging.INFO, logger="train")

    def cfg(out, *extra):  # the trained run's command, with --resume_ckpt auto
        return load_config([*TINY_TRAIN, "--epoch_size", "2", "--output_path", str(out), "--resume_ckpt", "auto",
                            *extra])

    assert resolve_auto_resume(cfg(tmp_path / "empty")).resume_ckpt is None  # nothing there: a fresh start
    assert f"no checkpoint of this run in {tmp_path / 'empty' / 'checkpoint'}: starting from epoch 1" in \
        _messages(caplog)
    out = tmp_path / "run"
    shutil.copytree(trained.out, out)
    with pytest.raises(NothingToDo, match="has finished all 2 epochs: nothing to train"):
        resolve_auto_resume(cfg(out))
    # the checks of an explicit --resume_ckpt come first: another schedule is an error, not "finished"
    with pytest.raises(UserError, match="was trained with --epoch_size 2 but this run has 3"):
        resolve_auto_resume(cfg(out, "--epoch_size", "3"))
    newest = out / "checkpoint" / "mobilenetv2-2_3.ckpt"
    with open(newest, "r+b") as fh:
        fh.truncate(newest.stat().st_size // 2)
    assert resolve_auto_resume(cfg(out)).resume_ckpt == str(out / "checkpoint" / "mobilenetv2-1_3.ckpt")
    assert "mobilenetv2-2_3.ckpt is damaged; resuming from the one before it, mobilenetv2-1_3.ckpt" in \
        _messages(caplog)
    oldest = out / "checkpoint" / "mobilenetv2-1_3.ckpt"
    oldest.write_bytes(oldest.read_bytes()[:100])
    with pytest.raises(UserError, match="every checkpoint in .* is damaged \\(2, newest mobilenetv2-2_3.ckpt\\)"):
        resolve_auto_resume(cfg(out))
    other = Config(output_path=str(out), resume_ckpt=str(oldest))  # an explicit path is left alone
    assert resolve_auto_resume(other) is other
    # a run killed between setting an earlier run aside and settling: its first epoch is undone, so a fresh start
    (out / ".earlier-run").mkdir()
    assert resolve_auto_resume(cfg(out)).resume_ckpt is None


def _launcher(out, data, *extra, env=None):
    import os
    import subprocess

    from conftest import ROOT, TINY_NET

    return subprocess.Popen(
        ["sh", "scripts/run_train.sh", "CPU", str(data), "--output_path", str(out), *TINY_NET, "--batch_size", "4",
         "--warmup_epochs", "0", "--save_checkpoint_epochs", "1", *extra],
        cwd=ROOT, env={**os.environ, "GLOG_v": "3", **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True)


def test_max_restarts_restarts_a_killed_worker_but_not_a_user_error(tmp_path):
    """MAX_RESTARTS=1: a worker killed by SIGKILL after its first checkpoint is started again with --resume_ckpt auto
    and the job ends 0, saying why; a worker that exits 2 (a damaged image) is not restarted; nor is a Ctrl-C."""
    import os
    import re
    import signal
    import time

    from conftest import make_imagefolder

    data = make_imagefolder(tmp_path / "data")
    out = tmp_path / "out"
    job = _launcher(out, data, "--epoch_size", "4", "--tracker", "tensorboard,mlflow", env={"MAX_RESTARTS": "1"})
    try:
        pid = None
        deadline = time.monotonic() + 300
        while pid is None:  # "rank 0: started (pid N)"
            line = job.stdout.readline()
            assert line and time.monotonic() < deadline, job.stderr.read()[-2000:]
            found = re.search(r"rank 0: started \(pid (\d+)\)", line)
            pid = int(found.group(1)) if found else None
        while not (out / "checkpoint" / "mobilenetv2-1_3.ckpt").is_file():
            assert time.monotonic() < deadline and job.poll() is None
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
        stdout, stderr = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 0, stdout[-2000:] + stderr[-2000:]
    assert re.search(r"restart 1 of 1: a rank was killed by SIGKILL; starting the job again with --resume_ckpt auto "
                     r"\(the newest checkpoint is mobilenetv2-[12]_3\.ckpt\)", stdout), stdout[-2000:]
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"]  # each epoch once
    # ... in TensorBoard and in the one MLflow run, which the restart went on in
    assert_tensorboard_holds_the_epochs(out)
    uri = f"sqlite:///{out / 'mlflow.db'}"
    (run,) = mlflow_runs(uri)
    assert run.info.status == "FINISHED"
    assert_mlflow_holds_the_epochs(uri, run.info.run_id, out)
    # exit 2 is not restarted
    (data / "train" / "cat" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    failed = _launcher(tmp_path / "out2", data, "--epoch_size", "1", env={"MAX_RESTARTS": "3"})
    stdout, stderr = failed.communicate(timeout=300)
    assert failed.returncode == 1 and "restart 1 of" not in stdout
    assert "the job is not restarted: a rank exited 2, a user error that would recur" in stdout
    assert "0.png" in stderr
    # Ctrl-C (SIGINT to the launcher) ends the job, not restarted
    (data / "train" / "cat" / "0.png").unlink()
    stopped = _launcher(tmp_path / "out3", data, "--epoch_size", "50", env={"MAX_RESTARTS": "3"})
    try:
        assert "rank 0: started" in stopped.stdout.readline()
        time.sleep(1)
        os.killpg(stopped.pid, signal.SIGINT)  # the terminal's Ctrl-C reaches the launcher's process group
        stdout, stderr = stopped.communicate(timeout=120)
    finally:
        if stopped.poll() is None:
            os.killpg(stopped.pid, signal.SIGKILL)
    assert stopped.returncode == 130 and "restart 1 of" not in stdout, stdout[-2000:] + stderr[-2000:]
    assert "error: interrupted" in stderr and "Traceback" not in stderr


def test_which_failures_restart():
    from src.launch import restart_cause

    assert restart_cause(-9) == "killed by SIGKILL" and restart_cause(137) == "stopped by SIGKILL"
    assert restart_cause(143) == "stopped by SIGTERM" and restart_cause(1) == "exit code 1"
    assert restart_cause(2) is None and restart_cause(None) is None  # a user error; an unknown rank


def test_max_restarts_is_checked_and_shown_by_the_dry_run(tmp_path):
    from conftest import make_imagefolder, run_sh

    data = make_imagefolder(tmp_path / "data")
    shown = run_sh("scripts/run_train.sh", "CPU", str(data), env={"DRY_RUN": "1", "MAX_RESTARTS": "2"})
    assert shown.returncode == 0 and "MAX_RESTARTS 2: a rank killed by a signal or crashed restarts" in shown.stdout
    for env, message in [({"MAX_RESTARTS": "x"}, "MAX_RESTARTS 'x' must be 0..1000"),
                         ({"MAX_RESTARTS": "1", "NODE_NUM": "2", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1"},
                          "MAX_RESTARTS applies to a job on one server")]:
        refused = run_sh("scripts/run_train.sh", "CPU", str(data), env={"DRY_RUN": "1", **env})
        assert refused.returncode == 2 and refused.stderr.startswith("error: ") and message in refused.stderr


def test_a_resumed_pipeline_continues_the_batch_ops_epochs(tmp_path):
    """Mixup's draws are seeded by the data epoch (and mixup_off_epoch counts it): a pipeline positioned after
    epoch 1 (fast or exact) mixes epochs 2 and 3 as the uninterrupted one did, epoch 3 unmixed."""
    import mindspore.dataset as ds
    from conftest import make_imagefolder

    from src.data.checks import check_dataset
    from src.data.pipeline import create_dataset, resume_at

    data = make_imagefolder(tmp_path / "data")
    cfg = Config(dataset_path=str(data), num_classes=2, image_size=32, batch_size=4, num_parallel_workers=1,
                 mixup=1.0, mixup_off_epoch=2, re_prob=0.5, label_smooth=0.0)
    source = check_dataset(cfg, need_val=False)

    def targets(done: int, exact: bool = False) -> list[np.ndarray]:
        ds.config.set_seed(cfg.seed)
        pipeline = create_dataset(cfg, source, training=True)
        if done:
            resume_at(pipeline, done, exact)
        iterator = pipeline.create_tuple_iterator(output_numpy=True, num_epochs=3)
        return [np.concatenate([y for _, y in iterator]) for _ in range(3 - done)]

    run = targets(0)
    assert not np.isin(run[1], (0.0, 1.0)).all() and np.isin(run[2], (0.0, 1.0)).all()  # epoch 2 mixed, 3 not
    for exact in (False, True):
        resumed = targets(1, exact)
        np.testing.assert_array_equal(resumed[0], run[1])
        np.testing.assert_array_equal(resumed[1], run[2])


def test_a_restart_keeps_the_failed_attempts_logs(tmp_path):
    """The next attempt's ranks write logs/worker_N.log and msrun.log afresh: the failed attempt's, which hold the
    cause, are moved into logs/attempt-N/ first."""
    from src.launch import _keep_logs

    logs = tmp_path / "logs"
    assert _keep_logs(logs, 1) is None  # a job on one device logs to the console
    logs.mkdir()
    for name in ("worker_0.log", "worker_1.log", "msrun.log"):
        (logs / name).write_text(f"attempt 1 {name}")
    assert _keep_logs(logs, 1) == logs / "attempt-1"
    (logs / "worker_0.log").write_text("attempt 2")
    assert _keep_logs(logs, 2) == logs / "attempt-2"
    assert sorted(p.relative_to(logs).as_posix() for p in logs.rglob("*.log")) == [
        "attempt-1/msrun.log", "attempt-1/worker_0.log", "attempt-1/worker_1.log", "attempt-2/worker_0.log"]
    assert (logs / "attempt-1" / "worker_1.log").read_text() == "attempt 1 worker_1.log"
    (logs / "worker_0.log").write_text("another job's attempt 1")  # a later job into the same folder
    assert _keep_logs(logs, 1) == logs / "attempt-1.2"
    assert (logs / "attempt-1" / "worker_0.log").read_text() == "attempt 1 worker_0.log"
