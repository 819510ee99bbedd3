"""train.py / eval.py end to end on a tiny image folder: outputs, log lines, resume, and user errors."""
from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import PADDLE_LINE, RESULT_LINE, TINY_TRAIN, make_imagefolder, run_cli, with_flags
from test_trackers import assert_mlflow_holds_the_epochs, assert_tensorboard_holds_the_epochs, mlflow_runs


def test_outputs_and_log_lines(trained):
    data, out, proc = trained
    ckpts = sorted(p.name for p in (out / "checkpoint").iterdir())
    assert ckpts == ["best.ckpt", "mobilenetv2-1_3.ckpt", "mobilenetv2-2_3.ckpt"]
    for name in ("config.yaml", "train.log", "metrics.csv", "curves.png"):
        assert (out / name).is_file(), name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.rglob(".tmp-*"))
    text = proc.stdout
    assert re.search(r"^epoch: 2 step: 3, loss is \d+\.\d+", text, re.M)
    assert re.search(r"^epoch time: \d+\.\d{3} ms, per step time: \d+\.\d{3} ms$", text, re.M)
    assert [m[:2] for m in PADDLE_LINE.findall(text)] == [("1", "0"), ("1", "2"), ("2", "0"), ("2", "2")]
    assert f"checkpoint: {out / 'checkpoint' / 'best.ckpt'}" in text
    assert f"curves: {out / 'curves.png'}" in text
    log = (out / "train.log").read_text()
    assert PADDLE_LINE.search(log) and "epoch: 1 step: 3, loss is" in log
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert list(rows[0]) == ["epoch", "step", "lr", "loss", "val_top1", "val_top5", "epoch_time_s"]
    assert [(r["epoch"], r["step"]) for r in rows] == [("1", "3"), ("2", "6")]
    assert all(0 <= float(r["val_top1"]) <= 1 and float(r["epoch_time_s"]) > 0 for r in rows)
    saved = (out / "config.yaml").read_text()
    assert "epoch_size: 2" in saved and f"dataset_path: {data}" in saved


def test_eval_prints_and_appends_the_result_line(trained, tmp_path):
    data, out = trained.data, tmp_path / "out"
    shutil.copytree(trained.out / "checkpoint", out / "checkpoint")
    shutil.copy(trained.out / "metrics.csv", out / "metrics.csv")
    args = ["eval.py", "--dataset_path", str(data), "--output_path", str(out), *TINY_TRAIN]
    first, second = run_cli(*args), run_cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    acc, top5, ckpt = RESULT_LINE.search(first.stdout).groups()
    assert Path(ckpt) == out / "checkpoint" / "best.ckpt" and float(top5) == 1.0
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert float(acc) == pytest.approx(max(float(r["val_top1"]) for r in rows), abs=1e-4)
    assert RESULT_LINE.findall((out / "eval.log").read_text()) == [(acc, top5, ckpt)] * 2
    assert second.stdout.strip().splitlines()[-1] == first.stdout.strip().splitlines()[-1]
    assert "CPU: onnxruntime is the faster path for inference" in first.stdout


def test_resume_continues_epoch_and_lr(trained, tmp_path):
    """The run's command again with --resume_ckpt auto after its newest checkpoint was damaged (a kill while a disk
    copied it, say): it resumes from the one before and, with --resume_data exact, ends with the uninterrupted run's
    weights, optimizer state, LR curve and metrics rows, bit for bit (the old resume differed in 420 of 451
    tensors); run once more, it is finished and ends 0 at once."""
    from src.engine.checkpoint import read_checkpoint

    data, out, full = trained
    resumed_out = tmp_path / "resumed"
    shutil.copytree(out, resumed_out)
    newest = resumed_out / "checkpoint" / "mobilenetv2-2_3.ckpt"
    newest.write_bytes(newest.read_bytes()[:-200])
    job = ["train.py", "--dataset_path", str(data), "--output_path", str(resumed_out), "--epoch_size", "2",
           "--resume_ckpt", "auto", "--resume_data", "exact", "--tracker", "tensorboard,mlflow", *TINY_TRAIN]
    proc = run_cli(*job)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mobilenetv2-2_3.ckpt is damaged; resuming from the one before it, mobilenetv2-1_3.ckpt" in proc.stdout
    # TensorBoard's view of the folder has each epoch once; MLflow cannot take back epoch 2, logged when the damaged
    # checkpoint was written, so the resumed run logs to a new MLflow run holding each epoch once
    assert_tensorboard_holds_the_epochs(resumed_out)
    uri = f"sqlite:///{resumed_out / 'mlflow.db'}"
    runs = {run.info.status: run for run in mlflow_runs(uri)}
    assert sorted(runs) == ["FINISHED", "KILLED"]
    assert runs["FINISHED"].data.tags["mlflow.parentRunId"] == runs["KILLED"].info.run_id
    assert f"warning: MLflow run {runs['KILLED'].info.run_id} has epochs up to 2, past the checkpoint resumed (epoch " \
        "1, an older one than its last): this run logs to a new MLflow run" in proc.stdout
    assert_mlflow_holds_the_epochs(uri, runs["FINISHED"].info.run_id, resumed_out)
    # the copied folder's store points at the copy's artifact folder
    assert runs["FINISHED"].info.artifact_uri.startswith((resumed_out / "mlartifacts").as_uri())
    assert "resuming" in proc.stdout and "from epoch 1 (global step 3)" in proc.stdout
    assert "compile cache: 3 graphs loaded, 0 compiled" in proc.stdout  # the shared run's: the weights below agree
    lines = PADDLE_LINE.findall(proc.stdout)
    assert [m[:2] for m in lines] == [("2", "0"), ("2", "2")]  # epoch 1 is not trained again
    full_lr = {m[:2]: m[2] for m in PADDLE_LINE.findall(full.stdout)}
    assert [m[2] for m in lines] == [full_lr[("2", "0")], full_lr[("2", "2")]]  # same LR curve, no new warmup
    rows = list(csv.DictReader(open(resumed_out / "metrics.csv")))
    uninterrupted = list(csv.DictReader(open(out / "metrics.csv")))
    assert [(r["epoch"], r["lr"], r["loss"], r["val_top1"]) for r in rows] == \
        [(r["epoch"], r["lr"], r["loss"], r["val_top1"]) for r in uninterrupted]  # each epoch once, the same
    ours, _ = read_checkpoint(newest)
    theirs, _ = read_checkpoint(out / "checkpoint" / "mobilenetv2-2_3.ckpt")
    assert sorted(ours) == sorted(theirs)
    different = [name for name in ours if not np.array_equal(ours[name].asnumpy(), theirs[name].asnumpy())]
    assert not different, different[:5]
    again = run_cli(*job)
    assert again.returncode == 0 and "has finished all 2 epochs: nothing to train" in again.stdout


def _error_run(*args, cwd=None):
    proc = run_cli(*args, cwd=cwd)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_bad_dataset_path_is_one_line_and_writes_nothing(tmp_path):
    line = _error_run("train.py", "--dataset_path", str(tmp_path / "nope"), "--output_path", str(tmp_path / "o"))
    assert "does not exist" in line and "--dataset_path" in line
    assert not (tmp_path / "o").exists()


def test_unknown_flag(tmp_path):
    line = _error_run("train.py", "--epoch", "3")
    assert "unknown flag 'epoch'" in line and "--epoch_size" in line


def test_missing_device_is_refused_before_anything_is_written(tmp_path):
    line = _error_run("train.py", "--platform", "GPU", "--output_path", str(tmp_path / "o"))
    assert "platform GPU is not available" in line and "--platform CPU" in line
    assert not (tmp_path / "o").exists()


def test_class_count_mismatch_names_the_flag(tmp_path):
    data = make_imagefolder(tmp_path / "d", classes=("a", "b", "c"), per_class=(1, 1))
    line = _error_run("train.py", "--dataset_path", str(data), "--output_path", str(tmp_path / "o"))
    assert "found 3 class folders" in line and "--num_classes 3" in line


def test_eval_errors(trained, tmp_path):
    data, out, _ = trained
    line = _error_run("eval.py", "--dataset_path", str(data), "--output_path", str(tmp_path / "empty"))
    assert "no checkpoint at" in line and "python train.py" in line
    line = _error_run("eval.py", "--dataset_path", str(data), "--pretrain_ckpt", str(out / "checkpoint/best.ckpt"),
                      *with_flags(TINY_TRAIN, num_classes=5))
    assert "num_classes=2" in line and "--num_classes 2" in line
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    line = _error_run("eval.py", "--dataset_path", str(data), "--pretrain_ckpt", str(junk), *TINY_TRAIN)
    assert "is not a readable MindSpore checkpoint" in line


def test_resume_from_best_ckpt_is_refused(trained, tmp_path):
    data, out, _ = trained
    line = _error_run("train.py", "--dataset_path", str(data), "--output_path", str(tmp_path / "o"),
                      "--resume_ckpt", str(out / "checkpoint" / "best.ckpt"), *TINY_TRAIN)
    assert "has no optimizer state" in line and "--pretrain_ckpt" in line
    assert not (tmp_path / "o").exists()


def test_debug_shows_the_traceback(tmp_path):
    proc = run_cli("train.py", "--dataset_path", str(tmp_path / "nope"), "--debug", "True")
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "error: dataset_path" in proc.stderr


def test_imagenet_config_with_overrides(tmp_path):
    """A user's own photo folder with the ImageNet recipe, scaled down by flags: a one-epoch trial run keeps the
    recipe's warmup (clamped to the run, with a warning)."""
    data = make_imagefolder(tmp_path / "photos", size=(40, 30))
    at = TINY_TRAIN.index("--warmup_epochs")
    tiny_with_the_recipes_warmup = TINY_TRAIN[:at] + TINY_TRAIN[at + 2:]
    # on CPU the recipe's own comment says --amp_level O0: float16 on CPU is slower, and this tiny net's depthwise
    # weights reach nan at O2 (the run then ends as a divergence naming --amp_level O0: tests/test_failures.py)
    proc = run_cli("train.py", "--config_path", "configs/mobilenetv2_imagenet.yaml", "--dataset_path", str(data),
                   "--platform", "CPU", "--amp_level", "O0", "--output_path", str(tmp_path / "o"), "--epoch_size", "1",
                   *tiny_with_the_recipes_warmup)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning: warmup_epochs 4 is not below epoch_size 1: the whole run warms up" in proc.stdout
    assert (tmp_path / "o" / "checkpoint" / "best.ckpt").is_file()
    log = (tmp_path / "o" / "train.log").read_text()
    assert "amp O0" in log and "image 32 px" in log and "2 classes" in log
    # the oneDNN ISA cap in effect is in the run's summary line, on every CPU (src/device.py sets it on AVX-512)
    isa = re.search(r"amp O0, ONEDNN_MAX_CPU_ISA(=\w+| unset \(oneDNN takes the CPU's best\))", log)
    assert isa, log[:2000]
    assert (isa.group(1) == "=AVX2") == (" avx512f" in open("/proc/cpuinfo").read())
    evaluation = run_cli("eval.py", "--config_path", "configs/mobilenetv2_imagenet.yaml", "--dataset_path", str(data),
                         "--platform", "CPU", "--output_path", str(tmp_path / "o"), *TINY_TRAIN)
    assert evaluation.returncode == 0 and RESULT_LINE.search(evaluation.stdout), evaluation.stderr[-3000:]


def test_batch_larger_than_the_training_set(tmp_path):
    data = make_imagefolder(tmp_path / "d")
    line = _error_run("train.py", "--dataset_path", str(data), "--output_path", str(tmp_path / "o"),
                      "--num_classes", "2", "--batch_size", "50")
    assert line == ("error: batch_size 50 is larger than the training set: there are 12 training images "
                    "(lower --batch_size to at most 12)")
    assert not (tmp_path / "o").exists()
    line = _error_run("train.py", "--dataset_path", str(data), "--output_path", str(tmp_path / "o"),
                      "--num_classes", "2", "--batch_size", "3", "--cutmix", "1.0")
    assert line == ("error: --mixup/--cutmix pair each image with the one at the mirrored batch position, so "
                    "batch_size must be even (got 3; as timm and mindcv)")
    assert not (tmp_path / "o").exists()


def test_max_steps_stops_after_n_optimizer_steps_and_prints_the_throughput(tmp_path):
    """The PyTorch seed's performance mode: 4 steps with 3 per epoch finish epoch 1 (its files written) and stop one
    step into epoch 2, which records nothing; the run ends 0 with the FPS line."""
    data, out = make_imagefolder(tmp_path / "data"), tmp_path / "out"
    proc = run_cli("train.py", "--dataset_path", str(data), "--output_path", str(out), "--epoch_size", "3",
                   "--max_steps", "4", "--save_checkpoint_epochs", "1", *TINY_TRAIN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = re.search(r"^max_steps 4 reached at epoch 2 step 1: (\d) optimizer steps after the first (\d) took "
                     r"\d+\.\d\d s, \d+\.\d{4} s/step, FPS (\d+\.\d\d) images/s on 1 device$", proc.stdout, re.M)
    assert line, proc.stdout[-3000:]
    assert int(line.group(1)) + int(line.group(2)) == 4 and float(line.group(3)) > 0
    assert [r["epoch"] for r in csv.DictReader(open(out / "metrics.csv"))] == ["1"]
    assert sorted(p.name for p in (out / "checkpoint").glob("*.ckpt")) == ["best.ckpt", "mobilenetv2-1_3.ckpt"]
    assert "[Epoch 2] val top1" not in proc.stdout and (out / "train.log").is_file()
