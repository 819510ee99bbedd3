"""ModelArts-style runs against a real S3-compatible server (moto) on loopback."""
from __future__ import annotations

import csv
import os
import re
import socket
import threading
import time
import zipfile
from pathlib import Path

import pytest
from conftest import TINY_TRAIN, make_imagefolder, run_cli, with_flags
from test_trackers import assert_tensorboard_holds_the_epochs

from src.cloud import S3Transfer, download_once, sync_inputs
from src.config import Config
from src.errors import UserError

SECRET = "s3cr3t-Value-That-Must-Not-Leak-0123456789"
TINY = [*TINY_TRAIN, "--epoch_size", "1"]


@pytest.fixture(scope="module")
def s3():
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"S3_ENDPOINT": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    transfer = S3Transfer()
    transfer.client.create_bucket(Bucket="bucket")
    yield transfer
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def _upload_zipped_dataset(s3: S3Transfer, tmp_path: Path) -> None:
    data = make_imagefolder(tmp_path / "src")
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(data.rglob("*.png")):
            zf.write(path, path.relative_to(data))
    s3.client.upload_file(str(archive), "bucket", "datasets/photos/photos.zip")


def test_modelarts_run_downloads_trains_and_uploads(s3, tmp_path):
    """A ModelArts job (with --resume_ckpt auto, as a job that may be restarted should have) stopped in its second
    epoch (--max_steps 4 of 2 x 3 steps) and started again with the same command on a fresh disk: it fetches its
    first attempt's outputs from train_url and finishes the run."""
    _upload_zipped_dataset(s3, tmp_path)
    local, out = tmp_path / "cache" / "data", tmp_path / "out"
    job = ["train.py", "--enable_modelarts", "True", "--data_url", "s3://bucket/datasets/photos", "--train_url",
           "obs://bucket/jobs/run1", "--dataset_path", str(local), "--resume_ckpt", "auto",
           *with_flags(TINY, epoch_size=2), "--save_checkpoint_epochs", "1", "--keep_checkpoint_max", "1",
           "--max_steps", "4", "--tracker", "tensorboard"]
    proc = run_cli(*job, "--output_path", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resume_ckpt auto: obs://bucket/jobs/run1 holds no earlier outputs" in proc.stdout
    assert "max_steps 4 reached at epoch 2 step 1" in proc.stdout, proc.stdout[-3000:]
    assert (local / "train" / "cat").is_dir() and (local / "val" / "dog").is_dir()  # the zip was unpacked
    assert "downloaded 1 files from s3://bucket/datasets/photos" in proc.stdout
    listed = s3.client.list_objects_v2(Bucket="bucket", Prefix="jobs/run1/")
    assert "Contents" in listed, proc.stdout[-3000:]
    keys = {o["Key"] for o in listed["Contents"]}
    for name in ("checkpoint/best.ckpt", "checkpoint/mobilenetv2-1_3.ckpt", "metrics.csv", "curves.png",
                 "train.log", "config.yaml"):
        assert f"jobs/run1/{name}" in keys, keys
    assert "jobs/run1/.lock" not in keys  # the run folder's lock stays on the machine
    # the secret key is in no log, no saved file and no output
    assert SECRET not in proc.stdout + proc.stderr
    for path in list(out.rglob("*")) + list(local.rglob("*")):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    # the job restarted on a fresh disk: the data copy on the node is reused, the run goes on from epoch 1
    fresh = tmp_path / "fresh_disk"
    again = run_cli(*job, "--output_path", str(fresh))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "already holds s3://bucket/datasets/photos" in again.stdout
    assert re.search(r"resume_ckpt auto: fetched \d+ files of the earlier attempt from obs://bucket/jobs/run1",
                     again.stdout)
    assert f"resuming from {fresh / 'checkpoint' / 'mobilenetv2-1_3.ckpt'}" in again.stdout
    assert [r["epoch"] for r in csv.DictReader(open(fresh / "metrics.csv"))] == ["1", "2"]
    keys = {o["Key"] for o in s3.client.list_objects_v2(Bucket="bucket", Prefix="jobs/run1/")["Contents"]}
    for name in ("checkpoint/mobilenetv2-2_3.ckpt", "per_class.csv", "confusion_matrix.png"):  # the last epoch's
        assert f"jobs/run1/{name}" in keys, keys
    assert "jobs/run1/checkpoint/mobilenetv2-1_3.ckpt" not in keys  # pruned (keep 1) there too: train_url mirrors
    # the event files went on from the first attempt's, each epoch once, and reached train_url as they ended
    assert_tensorboard_holds_the_epochs(fresh)
    events = sorted((fresh / "tensorboard").iterdir())
    assert len(events) == 2
    for path in events:
        body = s3.client.get_object(Bucket="bucket", Key=f"jobs/run1/tensorboard/{path.name}")["Body"].read()
        assert body == path.read_bytes(), path.name


@pytest.mark.parametrize("url,message", [
    ("s3://no-such-bucket/data", "s3://no-such-bucket/data does not exist (check the bucket and path)"),
    ("obs://bucket/missing/prefix", "obs://bucket/missing/prefix does not exist or is empty"),
    ("/local/folder", "/local/folder is not an obs:// or s3:// URL"),
])
def test_bad_data_url_is_one_clear_line(s3, tmp_path, url, message):
    proc = run_cli("train.py", "--enable_modelarts", "True", "--data_url", url, "--train_url", "s3://bucket/out",
                   "--dataset_path", str(tmp_path / "d"), "--output_path", str(tmp_path / "o"), *TINY)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and SECRET not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_modelarts_needs_both_urls():
    with pytest.raises(UserError, match="enable_modelarts needs --data_url and --train_url"):
        sync_inputs(Config(enable_modelarts=True, data_url="s3://b/d"))


def test_checkpoint_url_becomes_pretrain_ckpt(s3, tmp_path):
    _upload_zipped_dataset(s3, tmp_path)
    s3.client.put_object(Bucket="bucket", Key="models/mbv2/mbv2-best.ckpt", Body=b"weights")
    cfg = sync_inputs(Config(enable_modelarts=True, data_url="s3://bucket/datasets/photos", train_url="s3://bucket/o",
                             checkpoint_url="s3://bucket/models/mbv2", dataset_path=str(tmp_path / "d"),
                             output_path=str(tmp_path / "out")))
    assert cfg.pretrain_ckpt == str(tmp_path / "out" / "pretrained" / "mbv2-best.ckpt")
    assert Path(cfg.pretrain_ckpt).read_bytes() == b"weights"


def test_resume_auto_takes_checkpoint_urls_periodic_checkpoints(s3, tmp_path):
    """A job whose train_url is new and whose checkpoint_url holds an earlier job's periodic checkpoints: auto goes
    on from them (copied into output_path/checkpoint, where it takes the newest whole one); with none there,
    checkpoint_url stays the weights to start from."""
    _upload_zipped_dataset(s3, tmp_path)
    for name in ("mobilenetv2-1_3.ckpt", "mobilenetv2-2_3.ckpt", "resnet50-9_3.ckpt"):
        s3.client.put_object(Bucket="bucket", Key=f"jobs/one/checkpoint/{name}", Body=name.encode())
    job = dict(enable_modelarts=True, data_url="s3://bucket/datasets/photos", train_url="s3://bucket/jobs/two",
               dataset_path=str(tmp_path / "d"), resume_ckpt="auto")
    s3.client.put_object(Bucket="bucket", Key="jobs/one/metrics.csv", Body=b"epoch,step\n1,3\n2,6\n")
    cfg = sync_inputs(Config(**job, checkpoint_url="s3://bucket/jobs/one", output_path=str(tmp_path / "out")))
    assert cfg.pretrain_ckpt is None and cfg.resume_ckpt == "auto"
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoint").iterdir()) == [
        "mobilenetv2-1_3.ckpt", "mobilenetv2-2_3.ckpt"]  # this model's only
    assert (tmp_path / "out" / "metrics.csv").read_bytes() == b"epoch,step\n1,3\n2,6\n"  # their run's epochs
    # a fine-tuning job that names its file starts from it: nothing is resumed
    cfg = sync_inputs(Config(**job, checkpoint_url="s3://bucket/jobs/one", pretrain_ckpt="mobilenetv2-2_3.ckpt",
                             output_path=str(tmp_path / "tune")))
    assert cfg.pretrain_ckpt == str(tmp_path / "tune" / "pretrained" / "checkpoint" / "mobilenetv2-2_3.ckpt")
    assert not (tmp_path / "tune" / "checkpoint").exists()
    # two runs' checkpoints: which one to resume is not guessed
    s3.client.put_object(Bucket="bucket", Key="jobs/one/old/mobilenetv2-5_3.ckpt", Body=b"another run")
    with pytest.raises(UserError, match=r"^checkpoint_url s3://bucket/jobs/one holds periodic checkpoints of "
                                        r"mobilenetv2 in 2 folders \(checkpoint, old\): point it at the one run"):
        sync_inputs(Config(**job, checkpoint_url="s3://bucket/jobs/one", output_path=str(tmp_path / "out3")))
    s3.client.put_object(Bucket="bucket", Key="models/mbv2/mbv2-best.ckpt", Body=b"weights")
    cfg = sync_inputs(Config(**job, checkpoint_url="s3://bucket/models/mbv2", output_path=str(tmp_path / "out2")))
    assert cfg.pretrain_ckpt == str(tmp_path / "out2" / "pretrained" / "mbv2-best.ckpt")


def test_train_url_mirrors_the_checkpoints_and_the_event_files(s3, tmp_path):
    """An earlier job's checkpoints and TensorBoard events in a reused train_url go (a restart would fetch them,
    and TensorBoard would show both runs' epochs as one run's); other objects stay."""
    for key in ("reused/checkpoint/mobilenetv2-9_3.ckpt", "reused/tensorboard/events.out.tfevents.1.old",
                "reused/notes.txt"):
        s3.client.put_object(Bucket="bucket", Key=key, Body=b"earlier job")
    out = tmp_path / "out"
    for name in ("checkpoint/mobilenetv2-1_3.ckpt", "tensorboard/events.out.tfevents.2.new", "metrics.csv"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(b"this job")
    assert s3.upload(out, "s3://bucket/reused") == 3
    keys = {o["Key"] for o in s3.client.list_objects_v2(Bucket="bucket", Prefix="reused/")["Contents"]}
    assert keys == {"reused/checkpoint/mobilenetv2-1_3.ckpt", "reused/tensorboard/events.out.tfevents.2.new",
                    "reused/metrics.csv", "reused/notes.txt"}


class _SlowTransfer:
    def __init__(self):
        self.calls = 0

    def download(self, url, local):
        self.calls += 1
        time.sleep(1.0)
        (local / "x.txt").write_text("data")
        return 1


def test_one_copy_per_node(tmp_path):
    transfer = _SlowTransfer()
    threads = [threading.Thread(target=download_once, args=(transfer, "s3://b/d", tmp_path / "data"))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert transfer.calls == 1 and (tmp_path / "data" / "x.txt").read_text() == "data"


def test_waiting_for_another_copy_times_out(tmp_path, monkeypatch):
    import fcntl

    monkeypatch.setenv("MODELARTS_SYNC_TIMEOUT", "1")
    (tmp_path / "data").mkdir()
    with open(tmp_path / ".data.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(UserError, match=r"waited 1 s for another process to download s3://b/d"):
            download_once(_SlowTransfer(), "s3://b/d", tmp_path / "data")


@pytest.mark.parametrize("code", ["InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"])
def test_refused_credentials_name_the_url_and_not_the_secret(code, monkeypatch):
    from botocore.stub import Stubber

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    transfer = S3Transfer()
    with Stubber(transfer.client) as stub:
        stub.add_client_error("list_objects_v2", service_error_code=code, http_status_code=403)
        with pytest.raises(UserError) as err:
            transfer.download("obs://bucket/data", Path("/nonexistent"))
    message = str(err.value)
    assert message.startswith("the object store refused the credentials for obs://bucket/data")
    assert code in message and SECRET not in message


def test_download_takes_the_folder_not_its_string_prefix_siblings(s3, tmp_path):
    s3.client.put_object(Bucket="bucket", Key="sib/photos/a/1.txt", Body=b"in")
    s3.client.put_object(Bucket="bucket", Key="sib/photos2/b/2.txt", Body=b"out")
    assert s3.download("s3://bucket/sib/photos", tmp_path / "d") == 1
    assert (tmp_path / "d" / "a" / "1.txt").read_bytes() == b"in"
    assert not list((tmp_path / "d").rglob("2.txt"))
    assert s3.download("s3://bucket/sib/photos2/b/2.txt", tmp_path / "one") == 1  # a single object
    assert (tmp_path / "one" / "2.txt").read_bytes() == b"out"


@pytest.mark.parametrize("key", ["esc/data/../../escape.txt", "esc/data//ESCAPE_DIR/escape.txt",
                                 "esc/data/./a.txt"])
def test_an_object_key_cannot_write_outside_the_local_folder(s3, tmp_path, key):
    outside = tmp_path / "outside"
    key = key.replace("ESCAPE_DIR", str(outside).lstrip("/"))
    s3.client.put_object(Bucket="bucket", Key="esc/data/good.txt", Body=b"good")
    s3.client.put_object(Bucket="bucket", Key=key, Body=b"evil")
    local = tmp_path / "a" / "b" / "local"
    try:
        with pytest.raises(UserError) as err:
            s3.download("s3://bucket/esc/data", local)
        assert repr(key) in str(err.value) and "rename that object" in str(err.value)
        assert not (local / "good.txt").exists()  # refused before anything is copied
        written = [p for p in tmp_path.rglob("*") if p.is_file()]
        assert written == [], written
    finally:
        s3.client.delete_object(Bucket="bucket", Key=key)
        s3.client.delete_object(Bucket="bucket", Key="esc/data/good.txt")


def test_an_object_that_is_also_a_folder_prefix_is_named(s3, tmp_path):
    """`data/train` and `data/train/a/1.txt` in one bucket: it failed with 'check the path, its length and the free
    space'; now named before anything is copied."""
    s3.client.put_object(Bucket="bucket", Key="both/train", Body=b"a file")
    s3.client.put_object(Bucket="bucket", Key="both/train/a/1.txt", Body=b"in the folder")
    try:
        with pytest.raises(UserError, match=r"^objects 'both/train' and 'both/train/a/1.txt' under s3://bucket/both "
                                            r"make \S+/d/train both a file and a folder \(rename or delete the object "
                                            r"'both/train' in the bucket\)$"):
            s3.download("s3://bucket/both", tmp_path / "d")
        assert not [p for p in tmp_path.rglob("*") if p.is_file()]
    finally:
        s3.client.delete_object(Bucket="bucket", Key="both/train")
        s3.client.delete_object(Bucket="bucket", Key="both/train/a/1.txt")


def test_upload_skips_symlinks_out_of_the_output_folder(s3, tmp_path):
    secret = tmp_path / "home" / ".ssh"
    secret.mkdir(parents=True)
    (secret / "id_rsa").write_text("private")
    out = tmp_path / "out"
    (out / "checkpoint").mkdir(parents=True)
    (out / "train.log").write_text("log")
    (out / "checkpoint" / "best.ckpt").write_bytes(b"ckpt")
    (out / "checkpoint" / ".tmp-1-best.tmp").write_bytes(b"half")
    (out / "stolen_key").symlink_to(secret / "id_rsa")
    (out / "linked_dir").symlink_to(secret, target_is_directory=True)
    assert s3.upload(out, "s3://bucket/up/run") == 2
    keys = {o["Key"] for o in s3.client.list_objects_v2(Bucket="bucket", Prefix="up/")["Contents"]}
    assert keys == {"up/run/train.log", "up/run/checkpoint/best.ckpt"}


def test_a_missing_output_bucket_is_found_before_training(s3, tmp_path):
    s3.client.put_object(Bucket="bucket", Key="chk/data/a.txt", Body=b"x")
    with pytest.raises(UserError) as err:
        sync_inputs(Config(enable_modelarts=True, data_url="s3://bucket/chk/data", train_url="s3://no-such-bucket/o",
                           dataset_path=str(tmp_path / "d"), output_path=str(tmp_path / "out")))
    assert str(err.value) == "s3://no-such-bucket/o does not exist (check the bucket and path)"
    assert not (tmp_path / "d" / "a.txt").exists()  # nothing downloaded


def test_upload_into_a_deleted_bucket_is_one_line(s3, tmp_path):
    s3.client.create_bucket(Bucket="gone")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "train.log").write_text("log")
    s3.client.delete_bucket(Bucket="gone")
    with pytest.raises(UserError) as err:
        s3.upload(tmp_path / "out", "s3://gone/run")
    assert str(err.value) == "s3://gone/run does not exist (check the bucket and path)"


def test_mindrecord_shards_from_obs_are_read_as_they_are(s3, tmp_path):
    """A ModelArts job's data_url may hold converted shards (few large files instead of many small ones): the copy
    is readable as --dataset mindrecord, headers, .db indexes and class names intact."""
    from src.data.checks import check_dataset
    from src.data.mindrecord import write_dataset

    data = make_imagefolder(tmp_path / "src")
    splits = {split: [(p, label) for label, name in enumerate(("cat", "dog"))
                      for p in sorted((data / split / name).iterdir())] for split in ("train", "val")}
    write_dataset(tmp_path / "mr", splits, ["cat", "dog"], 4, "test")
    for path in sorted((tmp_path / "mr").rglob("*")):
        if path.is_file():
            s3.client.upload_file(str(path), "bucket", f"shards/{path.relative_to(tmp_path / 'mr')}")
    cfg = sync_inputs(Config(enable_modelarts=True, data_url="obs://bucket/shards", train_url="obs://bucket/out",
                             dataset="mindrecord", dataset_path=str(tmp_path / "cache"), num_classes=2))
    source = check_dataset(cfg)
    assert source.class_names == ["cat", "dog"] and source.train.num_images == 12 and len(source.train.shards) == 3
    assert source.train.class_counts == (6, 6) and source.val.num_images == 6
