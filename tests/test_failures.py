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
from conftest import PADDLE_LINE, RESULT_LINE, ROOT, TINY_NET, TINY_TRAIN, run_cli, with_flags

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
    if not (out / "mobilenetv2.onnx").exists():  # test_export may have exported one into the shared run
        (out / "mobilenetv2.onnx").write_bytes(b"the earlier run's export")
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


class _FullDisk:
    """A file of MindSpore's checkpoint writer on a disk that fills up after `room` bytes."""

    def __init__(self, path, *args, room=2048):
        self.f, self.room = open(path, "wb"), room  # noqa: SIM115 - closed in __exit__

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        import errno

        if self.f.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(data)


def test_a_checkpoint_write_that_fills_the_disk_leaves_no_temp_file(tmp_path, monkeypatch):
    from mindspore.train import serialization

    from src.engine.checkpoint import save_checkpoint
    from src.errors import UserError
    from src.models import create_model

    serialization._ensure_ckpt_fs_initialized()  # it sets `create` at the first save
    monkeypatch.setattr(serialization._ckpt_fs, "create", lambda path, *a: _FullDisk(path))
    (tmp_path / "net.ckpt").write_bytes(b"the earlier file")
    with pytest.raises(UserError, match="no space left on the device"):
        save_checkpoint(create_model("mobilenetv2", 2, 0.25), tmp_path / "net.ckpt", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.ckpt"]  # MindSpore's .tmp-PID-net.tmp is gone
    assert (tmp_path / "net.ckpt").read_bytes() == b"the earlier file"


def _start_training(data: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, GLOG_v="3", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "train.py", "--dataset_path", str(data), "--output_path", str(out),
                             *extra, *TINY_TRAIN], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # its own group, as in a shell


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.is_file() and text in path.read_text():
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared in {path}")


def test_ctrl_c_in_the_first_epoch_keeps_the_earlier_run_and_a_second_run_is_refused(trained, earlier_run):
    out, before = earlier_run
    proc = _start_training(trained.data, out, "--epoch_size", "3")
    _wait_for(out / "train.new.log", "[Epoch 1, iter: 0]", proc)
    proc.send_signal(signal.SIGSTOP)  # held inside its first epoch (its first evaluation still has to compile)
    # a second run into the same folder, started while the first holds it
    second = run_cli("train.py", "--dataset_path", str(trained.data), "--output_path", str(out), *TINY_TRAIN)
    assert second.returncode == 2
    assert second.stderr.strip() == (f"error: another training run (PID {proc.pid}) is writing to {out} (wait for it "
                                     "to finish, or pass another --output_path)")
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: SIGINT to the run and every process it started
    proc.send_signal(signal.SIGCONT)
    _, stderr = proc.communicate(timeout=120)
    # MindSpore's data workers may turn the SIGINT into a SIGTERM of the process
    assert proc.returncode in (128 + signal.SIGINT, 128 + signal.SIGTERM), stderr[-2000:]
    assert "Traceback" not in stderr
    # one line of ours (MindSpore's data engine may log an [ERROR] line of its own above it when the signal
    # interrupts one of its threads: not ours to silence)
    lines = stderr.strip().splitlines()
    assert re.fullmatch(r"error: training interrupted at epoch 1 step \d \(no checkpoint of this run yet; every "
                        r"file written so far is complete\)", lines[-1]), stderr
    assert all(line.startswith(("[ERROR] MD", "Line of code", "File ", "error: ")) for line in lines if line.strip())
    _assert_kept(out, before)


def test_sigterm_names_the_checkpoint_to_resume_from(trained, tmp_path):
    out = tmp_path / "out"
    proc = _start_training(trained.data, out, "--epoch_size", "30", "--save_checkpoint_epochs", "1")
    _wait_for(out / "train.log", "[Epoch 2, iter: 0]", proc)  # train.log exists: the first epoch committed
    proc.send_signal(signal.SIGTERM)  # a scheduler's stop, or `kill`
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
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
    assert not list(out.glob("*.onnx"))  # the earlier run's export went with it: eval_onnx.py would have used it


def test_an_output_path_that_is_or_lies_under_a_file_is_one_line(trained, tmp_path):
    blocker = tmp_path / "o"
    blocker.write_text("a file")
    for target in (blocker, blocker / "sub"):
        proc = run_cli("train.py", "--dataset_path", str(trained.data), "--output_path", str(target), *TINY_TRAIN)
        assert proc.returncode == 2
        assert proc.stderr.strip() == (f"error: output_path {target} cannot be created: {blocker} is a file (pass "
                                       "another --output_path)")
    assert blocker.read_text() == "a file"


def test_resume_into_a_folder_that_holds_another_run_is_refused(trained, earlier_run):
    out, before = earlier_run  # run A; the shared run is run B
    ckpt = trained.out / "checkpoint" / "mobilenetv2-1_3.ckpt"
    proc = run_cli("train.py", "--dataset_path", str(trained.data), "--output_path", str(out), "--epoch_size", "2",
                   "--resume_ckpt", str(ckpt), *TINY_TRAIN)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == (
        f"error: output_path {out} holds another run (10 files, 3 of them checkpoints) and resume_ckpt {ckpt} is "
        "not one of its checkpoints: resuming would replace that run (resume into the checkpoint's own folder, "
        f"--output_path {trained.out}, or pass a new --output_path)")
    _assert_kept(out, before)


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


def test_a_damaged_checkpoint_is_refused_by_its_checksum(trained, tmp_path):
    from src.errors import UserError

    damaged = tmp_path / "best.ckpt"
    data = bytearray((trained.out / "checkpoint" / "best.ckpt").read_bytes())
    data[len(data) // 2: len(data) // 2 + 8] = b"\x00\x01\x02\x03\x04\x05\x06\x07"  # inside a weight tensor
    damaged.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"is damaged: its CRC32 checksum does not match its contents"):
        read_checkpoint(damaged)
    proc = run_cli("eval.py", "--dataset_path", str(trained.data), "--ckpt_file", str(damaged))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: pretrain_ckpt {damaged} is damaged: its CRC32 checksum does not match its "
                                   "contents (it was changed or cut after it was saved; use another checkpoint, e.g. "
                                   "an earlier <model>-<epoch>_<step>.ckpt of the run)")
    # cut at a record boundary (here: just its CRC32 trailer), the rest still parses: refused all the same
    damaged.write_bytes((trained.out / "checkpoint" / "best.ckpt").read_bytes()[:-17])
    with pytest.raises(UserError, match=r"is damaged: it was cut short \(it holds this package's metadata"):
        read_checkpoint(damaged)


def test_a_checkpoint_without_a_checksum_still_loads(tmp_path):
    import mindspore as ms
    from mindspore import nn

    path = tmp_path / "foreign.ckpt"
    ms.save_checkpoint(nn.Dense(4, 3), str(path), append_dict={"epoch_num": 3})  # as other tools write them
    params, meta = read_checkpoint(path)
    assert sorted(params) == ["bias", "weight"] and meta.epoch_num == 3


def _resume(trained, out: Path, ckpt: str, *flags: str, data: Path | None = None) -> subprocess.CompletedProcess:
    return run_cli("train.py", "--dataset_path", str(data or trained.data), "--output_path", str(out),
                   "--resume_ckpt", str(out / "checkpoint" / ckpt),
                   *with_flags(TINY_TRAIN, **{"epoch_size": 2, **dict(zip(flags[::2], flags[1::2]))}))


def test_resume_refuses_a_changed_schedule_naming_the_key_and_the_checkpoints_value(trained, earlier_run):
    from src.config import load_config
    from src.engine.weights import check_same_schedule
    from src.errors import UserError

    out, before = earlier_run
    ckpt = out / "checkpoint" / "mobilenetv2-1_3.ckpt"

    def message(key, value, shown):
        return (f"resume_ckpt {ckpt} was trained with --{key} {shown} but this run has {value} (a resumed run keeps "
                f"its learning-rate schedule: pass --{key} {shown}, or start a new run from its weights with "
                f"--pretrain_ckpt {ckpt})")

    proc = _resume(trained, out, ckpt.name, "batch_size", "2")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == "error: " + message("batch_size", "2", "4")
    _assert_kept(out, before)
    meta = read_checkpoint(ckpt)[1]
    for key, value, shown in (("lr_max", "0.1", "0.05"), ("lr_decay_mode", "steps", "cosine"),
                              ("warmup_epochs", "1", "0"), ("lr_end", "0.001", "0"), ("lr_init", "0.01", "0"),
                              ("gradient_accumulation_steps", "2", "1")):
        cfg = load_config(with_flags(TINY_TRAIN, epoch_size=2, **{key: value}))
        with pytest.raises(UserError) as err:
            check_same_schedule(meta, cfg, ckpt)
        assert str(err.value) == message(key, value, shown)
    check_same_schedule(meta, load_config(with_flags(TINY_TRAIN, epoch_size=2)), ckpt)  # the same schedule passes
    # a checkpoint of this package from before gradient accumulation existed was trained with 1
    import dataclasses

    older = dataclasses.replace(meta, gradient_accumulation_steps=None)
    with pytest.raises(UserError, match="was trained with --gradient_accumulation_steps 1 but this run has 2"):
        check_same_schedule(older, load_config(with_flags(TINY_TRAIN, epoch_size=2, gradient_accumulation_steps=2)),
                            ckpt)


def test_resume_refuses_another_optimizer_and_compares_only_the_keys_of_its_schedule(trained):
    """The checkpoint holds its optimizer's moments: another --opt is refused in one line (a checkpoint from before
    --opt existed was trained with momentum); keys of other schedules than the checkpoint's do not matter."""
    import dataclasses

    from src.config import load_config
    from src.engine.weights import check_same_schedule
    from src.errors import UserError

    ckpt = trained.out / "checkpoint" / "mobilenetv2-1_3.ckpt"
    meta = read_checkpoint(ckpt)[1]
    assert meta.opt == "momentum"
    for checkpoint_meta in (meta, dataclasses.replace(meta, opt=None)):
        with pytest.raises(UserError) as err:
            check_same_schedule(checkpoint_meta, load_config(with_flags(TINY_TRAIN, epoch_size=2, opt="adamw")), ckpt)
        assert str(err.value) == (f"resume_ckpt {ckpt} was trained with --opt momentum but this run has adamw (a "
                                  "resumed run continues its optimizer's state: pass --opt momentum, or start a new "
                                  f"run from its weights with --pretrain_ckpt {ckpt})")
    # a cosine run's checkpoint: step's keys in it do not matter
    check_same_schedule(dataclasses.replace(meta, lr_gamma=0.5, lr_step_size=2.0), load_config(with_flags(
        TINY_TRAIN, epoch_size=2)), ckpt)
    with pytest.raises(UserError, match="was trained with --num_cycles 1 but this run has 2"):
        check_same_schedule(meta, load_config(with_flags(TINY_TRAIN, epoch_size=2, num_cycles=2)), ckpt)


def test_a_run_is_extended_by_a_new_run_from_its_weights_at_its_last_lr(trained, earlier_run, tmp_path):
    out, before = earlier_run
    ckpt = out / "checkpoint" / "mobilenetv2-1_3.ckpt"
    proc = _resume(trained, out, ckpt.name, "epoch_size", "4")
    assert proc.returncode == 2
    line = proc.stderr.strip()
    match = re.fullmatch(rf"error: resume_ckpt {re.escape(str(ckpt))} was trained with --epoch_size 2 but this run "
                         r"has 4 \(a resumed run keeps its learning-rate schedule: pass --epoch_size 2; to train "
                         r"further, start a new run from its weights, continuing its LR: python train.py "
                         rf"--pretrain_ckpt {re.escape(str(ckpt))} --lr_max (\S+) --warmup_epochs 0 --epoch_size "
                         r"<more epochs> --output_path <another folder>\)", line)
    assert match, line
    _assert_kept(out, before)
    # the LR the first run reached at the end of epoch 1 is where the documented extension starts
    first_run_lr = {m[:2]: float(m[2]) for m in PADDLE_LINE.findall(trained.proc.stdout)}
    extended = run_cli("train.py", "--dataset_path", str(trained.data), "--output_path", str(tmp_path / "more"),
                       "--pretrain_ckpt", str(ckpt), *with_flags(TINY_TRAIN, lr_max=match.group(1), epoch_size=1,
                                                                 run_eval="False"))
    assert extended.returncode == 0, extended.stderr[-2000:]
    assert "loaded 262 parameters, dropped 0 classifier parameters, 0 left at init" in extended.stdout
    lr_start = float(PADDLE_LINE.findall(extended.stdout)[0][2])
    assert lr_start == pytest.approx(float(match.group(1)), abs=1e-5)
    assert abs(lr_start - first_run_lr[("2", "0")]) < 0.25 * first_run_lr[("1", "0")]  # no jump back to lr_max


def test_resume_refuses_another_number_of_steps_per_epoch(trained, earlier_run, tmp_path):
    out, before = earlier_run
    data = tmp_path / "more_data"
    shutil.copytree(trained.data, data)
    for i in range(4):  # 4 more training images: 4 steps of 4 per epoch instead of 3
        shutil.copy(next((data / "train" / "cat").iterdir()), data / "train" / "cat" / f"extra{i}.png")
    ckpt = out / "checkpoint" / "mobilenetv2-1_3.ckpt"
    proc = _resume(trained, out, ckpt.name, data=data)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == (f"error: resume_ckpt {ckpt} was trained with 3 steps per epoch but this run has "
                                   "4 (on 1 device): the training set or the number of devices changed (resume with "
                                   f"the same data and devices, or start a new run from its weights with "
                                   f"--pretrain_ckpt {ckpt})")
    kept = {k: v for k, v in before.items() if k != "train.log"}
    assert {k: v for k, v in _files(out).items() if k in kept} == kept
    assert (out / "train.log").read_bytes().startswith(before["train.log"])  # the attempt is appended to the log


# train.py with a fault injected into MindSpore's checkpoint writer, as a disk or a kill would cause it; the fault
# and the file it hits are its first two arguments, so every such run has the same script (one compile cache entry)
FAULTY_TRAIN = """
import errno, os, runpy, signal, sys
sys.path.insert(0, {root!r})
import mindspore as ms
real_save = ms.save_checkpoint
fault, target = sys.argv[1:3]

def faulty_save(obj, path, *args, **kwargs):
    if fault == "enospc" and target in os.path.basename(path):
        raise OSError(errno.ENOSPC, "No space left on device", path)
    real_save(obj, path, *args, **kwargs)
    if fault == "kill" and target in os.path.basename(path):
        with open(path, "r+b") as f:  # the file is half written when the process dies
            f.truncate(os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)

ms.save_checkpoint = faulty_save
sys.argv = ["train.py", *sys.argv[3:]]
runpy.run_path(os.path.join({root!r}, "train.py"), run_name="__main__")
"""


def _faulty_training(trained, out: Path, tmp_path: Path, fault: str, target: str) -> subprocess.CompletedProcess:
    script = tmp_path / "faulty_train.py"
    script.write_text(FAULTY_TRAIN.format(root=str(ROOT)))
    return run_cli(str(script), fault, target, "--dataset_path", str(trained.data), "--output_path", str(out),
                   "--epoch_size", "2", "--save_checkpoint_epochs", "1", *TINY_TRAIN)


def test_a_full_disk_in_the_first_epochs_outputs_keeps_the_earlier_run(trained, earlier_run, tmp_path):
    out, before = earlier_run
    # the periodic checkpoint is the last of the first epoch's files: best.ckpt, metrics.csv and curves.png of this
    # run are written by then, and the earlier run's files are set aside
    proc = _faulty_training(trained, out, tmp_path, "enospc", "mobilenetv2-1_")
    assert proc.returncode == 2, proc.stderr[-2000:]
    ckpt = out / "checkpoint" / "mobilenetv2-1_3.ckpt"
    assert proc.stderr.strip() == (f"error: cannot write {ckpt}: no space left on the device (free some space or pass "
                                   "another --output_path); the earlier file, if any, is unchanged")
    assert "this run ended in its first epoch: the earlier run in" in proc.stdout
    _assert_kept(out, before)
    assert not list(out.rglob(".tmp-*")) and not (out / ".earlier-run").exists()


def test_a_kill_9_while_writing_a_checkpoint_keeps_the_earlier_run(trained, earlier_run, tmp_path):

    out, before = earlier_run
    proc = _faulty_training(trained, out, tmp_path, "kill", "mobilenetv2-1_")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (out / ".earlier-run" / "MANIFEST").is_file()  # killed between setting the earlier run aside and settling
    assert list((out / "checkpoint").glob(".tmp-*"))  # with a half-written checkpoint
    # eval.py, as the README says it, puts the earlier run back before it reads best.ckpt (it evaluated the killed
    # run's epoch-1 best.ckpt, exit 0)
    proc = run_cli("eval.py", "--dataset_path", str(trained.data), "--output_path", str(tmp_path / "eval"),
                   "--pretrain_ckpt", str(out / "checkpoint" / "best.ckpt"), *TINY_NET)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_files = [name for name in before if not name.startswith(("mlflow.db", "mlartifacts/"))]  # MLflow's store
    assert (f"warning: {out}: put back the earlier run that a killed training run had set aside ("  # stays in place
            f"{len(run_files)} files); the killed run's log is {out / 'train.new.log'}") in proc.stdout
    assert RESULT_LINE.search(proc.stdout)
    _assert_kept(out, before)
    assert not list(out.rglob(".tmp-*")) and not (out / ".earlier-run").exists()


def test_a_folder_set_aside_by_a_killed_run_is_put_back_by_the_next_reader_or_run(tmp_path, monkeypatch):
    """Without training: the folder as a run killed in its commit window leaves it. A reader waits while a live run
    holds the folder and refuses when it does not settle; a folder no run holds is put back by a reader or by the
    next run, the killed run's files (of its own model, exports included) removed and the others left alone."""
    import fcntl

    from src.config import load_config
    from src.engine import run_folder
    from src.engine.run_folder import RunFolder, settled_for_reading
    from src.errors import UserError
    from src.logs import attach_log_file

    def killed_in_the_window(out: Path) -> dict[str, bytes]:
        earlier = {"checkpoint/best.ckpt": b"earlier best", "checkpoint/resnet50-3_9.ckpt": b"earlier epoch 3",
                   "train.log": b"earlier log", "config.yaml": b"model: resnet50\n", "resnet50.onnx": b"export"}
        earlier_events = {"tensorboard/events.out.tfevents.1": b"earlier events"}  # a folder, set aside whole
        for name, data in {**earlier, **earlier_events}.items():
            (out / ".earlier-run" / name).parent.mkdir(parents=True, exist_ok=True)
            (out / ".earlier-run" / name).write_bytes(data)
        (out / ".earlier-run" / "MANIFEST").write_text("".join(f"{n}\n" for n in [*earlier, "tensorboard"]))
        killed = {"checkpoint/best.ckpt": b"killed best", "checkpoint/resnet50-1_9.ckpt": b"killed epoch 1",
                  "train.log": b"killed log", "config.yaml": b"model: resnet50\n", "metrics.csv": b"1,9\n",
                  "checkpoint/mobilenetv2-5_1.ckpt": b"another model's, not set aside",
                  "tensorboard/events.out.tfevents.2": b"killed events"}
        for name, data in killed.items():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(data)
        return {**earlier, **earlier_events, "checkpoint/mobilenetv2-5_1.ckpt": b"another model's, not set aside",
                "train.new.log": b"killed log", "tensorboard.new/events.out.tfevents.2": b"killed events"}

    out = tmp_path / "out"
    expected = killed_in_the_window(out)
    monkeypatch.setattr(run_folder, "WAIT_FOR_SETTLING", 0.5)
    with open(out / ".lock", "w") as held:  # a live run
        held.write("4242\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(UserError, match=rf"^the run folder {re.escape(str(out))} is being replaced by a training "
                                            r"run \(PID 4242\) that has set the earlier run aside .* pass "
                                            r"--pretrain_ckpt with a file of another folder\)$"):
            settled_for_reading(out, "pretrain_ckpt")
    settled_for_reading(out, "pretrain_ckpt")
    assert _files(out) == expected
    settled_for_reading(out, "pretrain_ckpt")  # nothing left to do
    assert _files(out) == expected
    # the next training run (of another model) does the same as it opens the folder
    shutil.rmtree(out)
    expected = killed_in_the_window(out)
    folder = RunFolder(load_config(["--output_path", str(out), *TINY_TRAIN]), resuming=False)
    folder.open()
    folder.close()
    attach_log_file(tmp_path / "unused.log")  # let go of the folder's log
    staged = ("train.new.log", "tensorboard.new/")  # the next run's log and events go there (the killed run's go)
    assert {k: v for k, v in _files(out).items() if not k.startswith(staged)} == {
        k: v for k, v in expected.items() if not k.startswith(staged)}
    assert not (out / "tensorboard.new").exists()


# train.py with one training image damaged right after the pre-check has decoded it
DAMAGED_AFTER_CHECK = """
import os, runpy, sys
sys.path.insert(0, {root!r})
import src.engine.run as run
real_check = run.check_dataset

def check_then_damage(*args, **kwargs):
    source = real_check(*args, **kwargs)
    with open({image!r}, "r+b") as f:
        f.truncate(os.path.getsize({image!r}) // 2)  # half of a PNG: MindSpore's decoder fails on it
    return source

run.check_dataset = check_then_damage
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path(os.path.join({root!r}, "train.py"), run_name="__main__")
"""


def test_an_image_that_fails_to_decode_during_training_ends_the_run_in_one_line(trained, earlier_run, tmp_path):
    out, before = earlier_run
    data = tmp_path / "data"
    shutil.copytree(trained.data, data)
    script = tmp_path / "damaged_train.py"
    image = sorted((data / "train" / "cat").iterdir())[0]
    script.write_text(DAMAGED_AFTER_CHECK.format(root=str(ROOT), image=str(image)))
    proc = run_cli(str(script), "--dataset_path", str(data), "--output_path", str(out),
                   *with_flags(TINY_TRAIN, batch_size=12))  # one batch of all 12 images
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    # MindSpore's own C++ log may print its lines before it (GLOG_v=3 shows its errors); the run's last word is ours
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {image} cannot be read by MindSpore (Decode: image decode failed), found at epoch 1 step 0 although "
        "the check before training decoded every image (was the file changed? delete or re-encode it and train again)")
    _assert_kept(out, before)  # a fresh run that fails after its compile leaves the earlier run as it was


@pytest.fixture
def signal_handlers(monkeypatch):
    """This process's signal handlers and the package's signal state, put back after the test."""
    import src.errors as errors

    monkeypatch.setattr(errors, "_pending", None)
    monkeypatch.setattr(errors, "_received", None)
    monkeypatch.setattr(errors, "_handled", set())
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    for sig in saved:  # as in a terminal: a test run started in the background (`cmd &`) inherits SIGINT ignored,
        signal.signal(sig, signal.SIG_DFL)  # which stop_on_signals rightly keeps ignored
    yield errors
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_a_signal_waits_for_a_safe_point_and_a_second_one_stops_at_once(signal_handlers):
    errors = signal_handlers
    errors.stop_on_signals()
    errors.stop_if_signalled()  # nothing received
    os.kill(os.getpid(), signal.SIGINT)  # held: an import or a graph compile in progress is not cut
    with pytest.raises(errors.Stopped) as stopped:
        errors.stop_if_signalled()
    assert stopped.value.signum == signal.SIGINT
    with pytest.raises(errors.Stopped):  # a second signal stops at once
        os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(errors.Stopped):  # and if the code it landed in swallowed it, the next safe point stops
        errors.stop_if_signalled()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as MindSpore's data engine does
    with pytest.raises(errors.Stopped):
        errors.stop_if_signalled()
    assert signal.getsignal(signal.SIGINT) is errors._handle  # put back


def test_a_signal_ignored_at_start_stays_ignored(signal_handlers):
    errors = signal_handlers
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # `nohup python train.py &`: closing the terminal must not stop it
    errors.stop_on_signals()
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) is errors._handle


def test_an_error_after_a_signal_is_the_interruption_and_an_os_error_is_one_line(signal_handlers, tmp_path, capsys):
    errors = signal_handlers

    def long_path(argv):
        (tmp_path / ("x" * 300)).exists()  # ENAMETOOLONG, which pathlib does not swallow

    assert errors.run_cli(long_path, []) == 2
    line = capsys.readouterr().err.strip()
    assert re.fullmatch(r"error: \S+x{300}: File name too long \(check the path, its length and the free space, and "
                        r"try again\)", line), line

    def import_cut_by_a_second_ctrl_c(argv):
        errors.stop_on_signals()
        os.kill(os.getpid(), signal.SIGINT)
        raise ImportError("initialization failed")  # what a KeyboardInterrupt inside MindSpore's import becomes

    assert errors.run_cli(import_cut_by_a_second_ctrl_c, []) == 128 + signal.SIGINT
    assert capsys.readouterr().err.strip() == "error: interrupted (files written so far are complete)"


@pytest.mark.parametrize("what, flag", [("output_path", "--output_path"), ("the folder of file_name", "--file_name")])
def test_a_read_only_folder_is_one_line(tmp_path, monkeypatch, what, flag):
    import errno

    from src.errors import UserError, writable_folder

    def read_only(self, *args, **kwargs):  # the tests run as root, for whom chmod does not make a folder read-only
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "write_bytes", read_only)
    with pytest.raises(UserError) as err:
        writable_folder(tmp_path / "out", what, flag)
    out = tmp_path / "out"
    assert str(err.value) == f"{what} {out} is not writable (Read-only file system; pass a writable {flag})"
    assert list((tmp_path / "out").iterdir()) == []


def test_an_evaluation_over_fewer_images_than_were_checked_is_an_error(tmp_path):
    """MindSpore's reader lists a folder when it starts reading: images removed after the check would be skipped."""
    from src.engine.callbacks import Evaluator
    from src.engine.metrics import accuracy_metrics
    from src.errors import UserError

    metrics = accuracy_metrics()

    class Model:  # evaluates 4 of the images
        def eval(self, dataset, dataset_sink_mode):
            for metric in metrics.values():
                metric.clear()
                metric.update(np.eye(2, dtype=np.float32)[[0, 1, 0, 1]], np.array([0, 1, 1, 1]))
            return {name: metric.eval() for name, metric in metrics.items()}

    assert Evaluator(Model(), None, 1, 1, metrics["acc"], (4, tmp_path))() == (0.75, 1.0)
    with pytest.raises(UserError, match=rf"evaluated 4 images but {re.escape(str(tmp_path))} held 8 when it was "
                                        r"checked before training \(were files removed or added\?"):
        Evaluator(Model(), None, 1, 1, metrics["acc"], (8, tmp_path))()


def test_every_warning_says_warning_on_the_console_and_in_the_log_file(tmp_path, capsys):
    import logging

    from src.logs import attach_log_file, setup_console_logging

    log = logging.getLogger("train")
    saved = list(log.handlers), log.propagate, log.level  # other tests read this logger through caplog
    setup_console_logging()
    attach_log_file(tmp_path / "train.log")
    try:
        log.info("an ordinary line")
        log.warning("image_size %d: trained at 32 px", 64)
        log.warning("warning: said once")
        for handler in log.handlers:
            handler.flush()
        expected = "an ordinary line\nwarning: image_size 64: trained at 32 px\nwarning: said once\n"
        assert capsys.readouterr().out.endswith(expected)
        assert (tmp_path / "train.log").read_text() == expected
    finally:
        for handler in [h for h in log.handlers if h not in saved[0]]:
            log.removeHandler(handler)
            handler.close()
        log.propagate, log.level = saved[1], saved[2]


def test_a_loss_far_above_chance_level_is_a_warning_once(caplog):
    """A finite loss of 15-50 for 2 classes (the demo's tiny net at --lr_max 0.5) ended rc 0 at chance accuracy
    without a word: a nan ends the run, an exploding finite loss now says so once."""
    from src.engine.history import EpochRecord, History
    from src.engine.outputs import LossAlarm

    alarm = LossAlarm(2, "lower --lr_max, now 0.5, and train again")
    with caplog.at_level("WARNING", logger="train"):
        alarm(EpochRecord(epoch=1, step=3, lr=0.5, loss=6.9), History())  # under 10 x ln 2 = 6.93
        assert not caplog.records
        alarm(EpochRecord(epoch=2, step=6, lr=0.5, loss=15.56), History())
        alarm(EpochRecord(epoch=3, step=9, lr=0.5, loss=53.2), History())
    assert [r.getMessage() for r in caplog.records] == [
        "epoch 2's mean loss 15.56 is over 10x chance level (0.69, ln of 2 classes): training is unstable and learns "
        "little or nothing (lower --lr_max, now 0.5, and train again)"]
