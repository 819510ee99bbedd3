"""What happens when things go wrong: a run that diverges, is interrupted, fails or meets another run keeps every
earlier good file byte for byte, says what happened in one line and exits non-zero."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TINY_TRAIN, run_cli, with_flags

from src.engine.checkpoint import read_checkpoint


def _files(folder: Path) -> dict[str, bytes]:
    """Every file of a run folder and its bytes (but the lock file, which holds the last writer's PID)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.fixture
def earlier_run(trained, tmp_path) -> tuple[Path, dict[str, bytes]]:
    """A copy of the shared run's output folder, and its bytes."""
    out = tmp_path / "out"
    shutil.copytree(trained.out, out)
    return out, _files(out)


def _assert_kept(out: Path, before: dict[str, bytes]) -> None:
    after = _files(out)
    changed = [name for name, data in before.items() if after.get(name) != data]
    assert not changed, changed
    assert set(after) - set(before) <= {"train.new.log"}, sorted(set(after) - set(before))


def test_a_diverging_run_ends_with_one_line_and_keeps_the_earlier_run(trained, earlier_run):
    out, before = earlier_run
    proc = run_cli("train.py", "--dataset_path", str(trained.data), "--output_path", str(out), "--epoch_size", "2",
                   *with_flags(TINY_TRAIN, lr_max="1e9", amp_level="O2"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip()
    assert re.fullmatch(r"error: training diverged at epoch 1 step \d \((loss (nan|inf|-inf)|parameter \S+ is nan or "
                        r"inf)\); last good checkpoint: none of this run; lower --lr_max \(now 1e\+09\), or train in "
                        r"float32 with --amp_level O0 \(now O2: float16 on CPU is slower and overflows easily\) and "
                        r"train again", line), line
    _assert_kept(out, before)
    assert "training diverged" not in (out / "train.log").read_text()  # the earlier run's log is untouched
    assert "[Epoch 1, iter: 0]" in (out / "train.new.log").read_text()  # this run's log is kept beside it


def test_no_checkpoint_with_a_non_finite_parameter_is_written(tmp_path):
    import mindspore as ms

    from src.engine.checkpoint import NonFiniteParameter, save_checkpoint
    from src.models import create_model

    net = create_model("mobilenetv2", 2, 0.25)
    weight = net.head.dense.weight if hasattr(net.head, "dense") else net.trainable_params()[-2]
    weight.set_data(ms.Tensor(np.full(weight.shape, np.nan, np.float32)))
    with pytest.raises(NonFiniteParameter, match=rf"parameter {re.escape(weight.name)} holds nan or inf"):
        save_checkpoint(net, tmp_path / "x.ckpt", {})
    assert list(tmp_path.iterdir()) == []


def _start_training(data: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, GLOG_v="3", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "train.py", "--dataset_path", str(data), "--output_path", str(out),
                             *extra, *TINY_TRAIN], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.is_file() and text in path.read_text():
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared in {path}")


def test_sigterm_in_the_first_epoch_keeps_the_earlier_run_and_a_second_run_is_refused(trained, earlier_run):
    out, before = earlier_run
    proc = _start_training(trained.data, out, "--epoch_size", "3")
    _wait_for(out / "train.new.log", "[Epoch 1, iter: 0]", proc)
    proc.send_signal(signal.SIGSTOP)  # held inside its first epoch (its first evaluation still has to compile)
    # a second run into the same folder, started while the first holds it
    second = run_cli("train.py", "--dataset_path", str(trained.data), "--output_path", str(out), *TINY_TRAIN)
    assert second.returncode == 2
    assert second.stderr.strip() == (f"error: another training run (PID {proc.pid}) is writing to {out} (wait for it "
                                     "to finish, or pass another --output_path)")
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "Traceback" not in stderr
    assert re.fullmatch(r"error: training interrupted at epoch 1 step \d \(no checkpoint of this run yet; every "
                        r"file written so far is complete\)", stderr.strip()), stderr
    _assert_kept(out, before)


def test_an_interrupted_run_names_the_checkpoint_to_resume_from(trained, tmp_path):
    out = tmp_path / "out"
    proc = _start_training(trained.data, out, "--epoch_size", "30", "--save_checkpoint_epochs", "1")
    _wait_for(out / "train.log", "[Epoch 2, iter: 0]", proc)  # train.log exists: the first epoch committed
    proc.send_signal(signal.SIGINT)  # Ctrl-C (MindSpore's data workers may turn it into a SIGTERM of the process)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode in (128 + signal.SIGINT, 128 + signal.SIGTERM), stderr[-2000:]
    m = re.fullmatch(r"error: training interrupted at epoch (\d+) step \d \(resume with --resume_ckpt (\S+); every "
                     r"file written so far is complete\)", stderr.strip())
    assert m, stderr
    epoch, ckpt = int(m.group(1)), Path(m.group(2))
    assert epoch >= 2 and ckpt == out / "checkpoint" / f"mobilenetv2-{epoch - 1}_3.ckpt"
    _, meta = read_checkpoint(ckpt)
    assert meta.epoch_num == epoch - 1 and not list(out.rglob(".tmp-*"))
    # header + every finished epoch (+ the interrupted epoch's row when the signal came between its files)
    assert len((out / "metrics.csv").read_text().splitlines()) in (epoch, epoch + 1)


def test_a_finished_fresh_run_replaces_the_earlier_one(trained, earlier_run):
    out, _ = earlier_run
    proc = run_cli("train.py", "--dataset_path", str(trained.data), "--output_path", str(out), "--epoch_size", "1",
                   "--keep_checkpoint_max", "1", *TINY_TRAIN)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "replacing the earlier run" in proc.stdout
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == ["best.ckpt", "mobilenetv2-1_3.ckpt"]
    assert "epoch_size: 1" in (out / "config.yaml").read_text()
    assert not (out / "train.new.log").exists()
    log = (out / "train.log").read_text()
    assert log.count("[Epoch 1, iter: 0]") == 1 and "epoch: 1 step: 3" in log
    assert len((out / "metrics.csv").read_text().splitlines()) == 2


def test_an_output_path_that_is_or_lies_under_a_file_is_one_line(trained, tmp_path):
    blocker = tmp_path / "o"
    blocker.write_text("a file")
    for target in (blocker, blocker / "sub"):
        proc = run_cli("train.py", "--dataset_path", str(trained.data), "--output_path", str(target), *TINY_TRAIN)
        assert proc.returncode == 2
        assert proc.stderr.strip() == (f"error: output_path {target} cannot be created: {blocker} is a file (pass "
                                       "another --output_path)")
    assert blocker.read_text() == "a file"


def test_a_resumed_run_replaces_best_ckpt_only_with_a_better_epoch(trained, tmp_path):
    from src.engine.checkpoint import save_checkpoint

    out = tmp_path / "out"
    shutil.copytree(trained.out, out)
    best = out / "checkpoint" / "best.ckpt"
    params, meta = read_checkpoint(best)
    # a best.ckpt that a later epoch of the killed run wrote, better than anything in metrics.csv up to epoch 1
    save_checkpoint([{"name": k, "data": v} for k, v in params.items()], best,
                    {"model": "mobilenetv2", "num_classes": 2, "width": 0.25, "image_size": 32, "epoch_num": 2,
                     "val_top1": 1.0})
    kept = best.read_bytes()
    proc = run_cli("train.py", "--dataset_path", str(trained.data), "--output_path", str(out), "--epoch_size", "2",
                   "--resume_ckpt", str(out / "checkpoint" / "mobilenetv2-1_3.ckpt"), *TINY_TRAIN)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert best.read_bytes() == kept
    assert "best val top1: 1.0000" in proc.stdout
