"""ModelArts-style runs against a real S3-compatible server (moto) on loopback."""
from __future__ import annotations

import os
import socket
import threading
import time
import zipfile
from pathlib import Path

import pytest
from conftest import TINY_TRAIN, make_imagefolder, run_cli

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
    _upload_zipped_dataset(s3, tmp_path)
    local, out = tmp_path / "cache" / "data", tmp_path / "out"
    proc = run_cli("train.py", "--enable_modelarts", "True", "--data_url", "s3://bucket/datasets/photos",
                   "--train_url", "obs://bucket/jobs/run1", "--dataset_path", str(local), "--output_path", str(out),
                   *TINY)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (local / "train" / "cat").is_dir() and (local / "val" / "dog").is_dir()  # the zip was unpacked
    assert "downloaded 1 files from s3://bucket/datasets/photos" in proc.stdout
    keys = {o["Key"] for o in s3.client.list_objects_v2(Bucket="bucket", Prefix="jobs/run1/")["Contents"]}
    for name in ("checkpoint/best.ckpt", "checkpoint/mobilenetv2-1_3.ckpt", "metrics.csv", "curves.png",
                 "train.log", "config.yaml", "per_class.csv", "confusion_matrix.png"):
        assert f"jobs/run1/{name}" in keys, keys
    # the secret key is in no log, no saved file and no output
    assert SECRET not in proc.stdout + proc.stderr
    for path in list(out.rglob("*")) + list(local.rglob("*")):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    # a second job on the same node reuses the copy
    again = run_cli("train.py", "--enable_modelarts", "True", "--data_url", "s3://bucket/datasets/photos",
                    "--train_url", "obs://bucket/jobs/run2", "--dataset_path", str(local), "--output_path",
                    str(tmp_path / "out2"), *TINY)
    assert again.returncode == 0 and "already holds s3://bucket/datasets/photos" in again.stdout


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
