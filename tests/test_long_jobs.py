"""Long jobs that look after themselves: --resume_ckpt auto picks the newest whole checkpoint of the run."""
from __future__ import annotations

import csv
import logging
import shutil

import numpy as np
import pytest
from conftest import TINY_TRAIN, run_cli

from src.config import Config
from src.engine.weights import resolve_auto_resume
from src.errors import NothingToDo, UserError


def _messages(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


def test_auto_resume_choice(trained, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="train")
    cfg = Config(output_path=str(tmp_path / "empty"), resume_ckpt="auto", epoch_size=2)
    assert resolve_auto_resume(cfg).resume_ckpt is None  # nothing there: a fresh start, said in one line
    assert f"no checkpoint of this run in {tmp_path / 'empty' / 'checkpoint'}: starting from epoch 1" in \
        _messages(caplog)
    out = tmp_path / "run"
    shutil.copytree(trained.out, out)
    with pytest.raises(NothingToDo, match="has finished all 2 epochs: nothing to train"):
        resolve_auto_resume(cfg.replace(output_path=str(out)))
    assert resolve_auto_resume(cfg.replace(output_path=str(out), epoch_size=3)).resume_ckpt == \
        str(out / "checkpoint" / "mobilenetv2-2_3.ckpt")
    newest = out / "checkpoint" / "mobilenetv2-2_3.ckpt"
    with open(newest, "r+b") as fh:
        fh.truncate(newest.stat().st_size // 2)
    chosen = resolve_auto_resume(cfg.replace(output_path=str(out), epoch_size=3)).resume_ckpt
    assert chosen == str(out / "checkpoint" / "mobilenetv2-1_3.ckpt")
    assert "mobilenetv2-2_3.ckpt is damaged; resuming from the one before it, mobilenetv2-1_3.ckpt" in \
        _messages(caplog)
    oldest = out / "checkpoint" / "mobilenetv2-1_3.ckpt"
    oldest.write_bytes(oldest.read_bytes()[:100])
    with pytest.raises(UserError, match="every checkpoint in .* is damaged \\(2, newest mobilenetv2-2_3.ckpt\\)"):
        resolve_auto_resume(cfg.replace(output_path=str(out), epoch_size=3))
    other = Config(output_path=str(out), resume_ckpt=str(oldest))  # an explicit path is left alone
    assert resolve_auto_resume(other) is other


def test_a_restarted_job_goes_on_from_its_newest_whole_checkpoint(trained, tmp_path):
    """The job's command, with --resume_ckpt auto, run again after its newest checkpoint was damaged (a kill while
    a disk copied it, say): it resumes from the one before, and ends with the uninterrupted run's weights and one
    metrics row per epoch."""
    from src.engine.checkpoint import read_checkpoint

    out = tmp_path / "run"
    shutil.copytree(trained.out, out)
    newest = out / "checkpoint" / "mobilenetv2-2_3.ckpt"
    newest.write_bytes(newest.read_bytes()[:-200])
    job = ["train.py", "--dataset_path", str(trained.data), "--output_path", str(out), "--epoch_size", "2",
           "--resume_ckpt", "auto", "--resume_data", "exact", *TINY_TRAIN]
    proc = run_cli(*job)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from the one before it, mobilenetv2-1_3.ckpt" in proc.stdout
    assert "from epoch 1 (global step 3)" in proc.stdout
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    uninterrupted = list(csv.DictReader(open(trained.out / "metrics.csv")))
    assert [(r["epoch"], r["lr"], r["loss"]) for r in rows] == [(r["epoch"], r["lr"], r["loss"]) for r in uninterrupted]
    ours, _ = read_checkpoint(newest)
    theirs, _ = read_checkpoint(trained.out / "checkpoint" / "mobilenetv2-2_3.ckpt")
    assert all(np.array_equal(ours[k].asnumpy(), theirs[k].asnumpy()) for k in theirs)
    # and once more: the run is finished, so the job ends 0 at once, saying so
    again = run_cli(*job)
    assert again.returncode == 0 and "has finished all 2 epochs: nothing to train" in again.stdout
