"""--tracker tensorboard,mlflow: the event files and the MLflow run hold metrics.csv's epochs, each once, also after a
resume; a tracker that cannot be reached at the start is one line, one that dies mid-run one warning."""
from __future__ import annotations

import csv
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY_TRAIN, run_cli

from src.config import load_config
from src.engine.history import EpochRecord, History
from src.errors import UserError


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard's view of a folder of event files (as its server reads them, purge steps applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def metrics_rows(out: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(out / "metrics.csv")))


def assert_tensorboard_holds_the_epochs(out: Path) -> dict:
    """Each epoch of metrics.csv once, at its global step, with its numbers."""
    got = scalars(out / "tensorboard")
    rows = metrics_rows(out)
    for tag, column in (("val/top1", "val_top1"), ("epoch/loss", "loss"), ("epoch/lr", "lr")):
        assert [s for s, _ in got[tag]] == [int(r["step"]) for r in rows], tag
        assert [v for _, v in got[tag]] == pytest.approx([float(r[column]) for r in rows], rel=1e-4), tag
    return got


def mlflow_runs(uri: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return [run for e in client.search_experiments() for run in client.search_runs([e.experiment_id])]


def assert_mlflow_holds_the_epochs(uri: str, run_id: str, out: Path) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    rows = metrics_rows(out)
    for key, column in (("loss", "loss"), ("val_top1", "val_top1"), ("lr", "lr")):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert [s for s, _ in history] == [int(r["epoch"]) for r in rows], key
        assert [v for _, v in history] == pytest.approx([float(r[column]) for r in rows], rel=1e-4), key


def test_the_trained_run_is_in_tensorboard_and_mlflow(trained):
    """The shared run trained with --tracker tensorboard,mlflow and the default store: per-step and per-epoch
    scalars, the config and the confusion matrix in TensorBoard; params, metrics and artifacts in MLflow."""
    out = trained.out
    got = assert_tensorboard_holds_the_epochs(out)
    assert [s for s, _ in got["train/loss"]] == [1, 3, 4, 6]  # print_freq 2, 3 steps an epoch: iters 0 and 2
    assert {"train/top1", "train/top5", "train/lr", "train/images_per_s", "val/top5", "epoch/images_per_s"} <= set(got)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    assert [(i.step, i.encoded_image_string[:4]) for i in acc.Images("val/confusion_matrix")] == [(6, b"\x89PNG")]
    config = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "    model: mobilenetv2" in config and "    tracker: tensorboard,mlflow" in config
    assert not (out / "tensorboard.new").exists()

    uri = f"sqlite:///{out / 'mlflow.db'}"
    (run,) = mlflow_runs(uri)
    assert run.info.status == "FINISHED" and run.info.run_name == "out"
    assert run.data.params["model"] == "mobilenetv2" and run.data.params["epoch_size"] == "2"
    assert_mlflow_holds_the_epochs(uri, run.info.run_id, out)
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    assert artifacts.is_relative_to(out / "mlartifacts")
    for name in ("config.yaml", "curves.png", "per_class.csv", "confusion_matrix.png", "checkpoint/best.ckpt"):
        assert (artifacts / name).read_bytes() == (out / name).read_bytes(), name
    assert f"MLflow: run {run.info.run_id} in experiment 'mobilenetv2' at {uri}" in trained.proc.stdout


def test_tracker_keys_are_checked():
    for flags, message in (
            (["--tracker", "wandb"], "--tracker got 'wandb' (use none, tensorboard, mlflow, or tensorboard,mlflow)"),
            (["--tracker", "none,mlflow"], "--tracker got 'none,mlflow'"),
            (["--tracker", "mlflow,mlflow"], "--tracker got 'mlflow,mlflow'"),
            (["--tracker", "tensorboard", "--mlflow_uri", "http://x"],
             "--mlflow_uri applies to --tracker mlflow, not tensorboard (add mlflow to --tracker, or drop "
             "--mlflow_uri)")):
        with pytest.raises(UserError) as err:
            load_config(flags)
        assert str(err.value).startswith(message), err.value
    assert load_config(["--tracker", "[tensorboard, mlflow]", "--mlflow_experiment", "e"]).mlflow_experiment == "e"


def test_a_failing_tracker_warns_once_and_the_others_go_on(caplog):
    from src.engine.trackers import Trackers

    class Broken:
        name = "MLflow"

        def epoch(self, record, images):
            raise ConnectionError("Connection refused")

    class Working:
        name = "TensorBoard"
        epochs: list[int] = []

        def epoch(self, record, images):
            self.epochs.append(record.epoch)

    working = Working()
    trackers = Trackers([Broken(), working])
    history = History()
    with caplog.at_level(logging.WARNING, logger="train"):
        for epoch in (1, 2, 3):
            record = EpochRecord(epoch=epoch, step=3 * epoch, lr=0.1, loss=1.0)
            history.add(record)
            trackers.epoch(record, history)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["MLflow tracking failed (Connection refused): it is off for the rest of this run; train.log, "
                        "metrics.csv and the checkpoints hold everything"]
    assert working.epochs == [1, 2, 3] and trackers.backends == [working]


def test_a_resumed_event_folder_shows_each_step_once(tmp_path):
    """The writer of a resumed run (purge step = the checkpoint's step + 1) hides what the interrupted run logged
    after its checkpoint, as TensorBoard reads the folder; the config is written once."""
    from src.engine.trackers import TensorBoard

    cfg = load_config([])
    first = TensorBoard(tmp_path, None, cfg)
    for step in range(1, 8):  # a run killed in its third epoch (3 steps an epoch), its checkpoint at step 6
        first.step(step, {"loss": float(step)})
    first.epoch(EpochRecord(epoch=1, step=3, lr=0.1, loss=1.0), 12)
    first.epoch(EpochRecord(epoch=2, step=6, lr=0.1, loss=2.0), 12)
    first.close()
    resumed = TensorBoard(tmp_path, 7, cfg)
    for step in range(7, 10):
        resumed.step(step, {"loss": 10.0 + step})
    resumed.epoch(EpochRecord(epoch=3, step=9, lr=0.1, loss=3.0), 12)
    resumed.close()
    got = scalars(tmp_path)
    assert got["train/loss"] == [(s, float(s)) for s in range(1, 7)] + [(s, 10.0 + s) for s in range(7, 10)]
    assert got["epoch/loss"] == [(3, 1.0), (6, 2.0), (9, 3.0)]
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_mlflow_server_that_dies_mid_run_is_one_warning(trained, tmp_path):
    """Against `mlflow server` on loopback: epoch 1 reaches it (read back through the server); killed then, the run
    goes on and ends 0 with one warning; a run started while it is down is refused in one line, before anything
    is written."""
    from mlflow import MlflowClient

    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
         str(tmp_path / "server-artifacts")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    out = tmp_path / "out"
    job = ["train.py", "--dataset_path", str(trained.data), "--output_path", str(out), "--epoch_size", "2",
           "--save_checkpoint_epochs", "1", "--tracker", "mlflow", "--mlflow_uri", uri, *TINY_TRAIN]
    run = None
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "mlflow server did not start"
                time.sleep(0.3)
        run = subprocess.Popen([sys.executable, *job], cwd=ROOT, env={**os.environ, "GLOG_v": "3"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        client = MlflowClient(tracking_uri=uri)
        while True:  # epoch 1, through the server
            runs = mlflow_runs(uri)
            if runs and client.get_metric_history(runs[0].info.run_id, "loss"):
                break
            assert time.monotonic() < deadline and run.poll() is None, run.communicate()
            time.sleep(0.2)
        assert runs[0].data.params["tracker"] == "mlflow" and runs[0].info.status == "RUNNING"
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr[-3000:]
    warnings = [line for line in stdout.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: MLflow tracking failed ("), warnings
    assert warnings[0].endswith("it is off for the rest of this run; train.log, metrics.csv and the checkpoints "
                                "hold everything")
    assert len(metrics_rows(out)) == 2
    local = f"sqlite:///{tmp_path / 'server.db'}"  # what the server had stored
    (stored,) = mlflow_runs(local)
    assert [m.step for m in MlflowClient(tracking_uri=local).get_metric_history(stored.info.run_id, "loss")][0] == 1

    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"  # refused at once (the default's retries are timed above)
    try:
        proc = run_cli(*[a if a != str(out) else str(tmp_path / "new") for a in job])
    finally:
        del os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert re.fullmatch(rf"error: MLflow at {uri} cannot be reached \(.+; start the tracking server, fix --mlflow_uri "
                        r"/ MLFLOW_TRACKING_URI, or drop mlflow from --tracker\)", proc.stderr.strip()), proc.stderr
    assert not (tmp_path / "new").exists()


def test_a_bad_store_is_one_line_and_the_default_one_is_made_with_the_run(tmp_path):
    """A URI MLflow does not know and a damaged default database are refused in one line; the check before the
    output folder's own checks makes nothing there."""
    from src.engine.trackers import MLflow, check_reachable

    out = tmp_path / "out"
    cfg = load_config(["--tracker", "mlflow", "--output_path", str(out)])
    check_reachable(cfg)
    assert not out.exists()  # the default store is made with the run, after the folder is checked and locked
    with pytest.raises(UserError, match=r"^MLflow at localhost:5000 cannot be reached \(.+; start the tracking "
                                        r"server, fix --mlflow_uri / MLFLOW_TRACKING_URI, or drop mlflow"):
        check_reachable(load_config(["--tracker", "mlflow", "--mlflow_uri", "localhost:5000"]))
    out.mkdir()
    (out / "mlflow.db").write_bytes(os.urandom(4096))
    with pytest.raises(UserError, match=rf"^MLflow at sqlite:///{re.escape(str(out))}/mlflow.db cannot be reached "
                                        rf"or refused the run \(.+; move the damaged {re.escape(str(out))}/mlflow.db "
                                        r"aside, or pass --mlflow_uri, or drop mlflow from --tracker\)$"):
        MLflow(cfg, None)
