"""ModelArts jobs: copy inputs from OBS (or any S3-compatible store) before training, upload outputs after.

Transfer backend: MoXing's `mox.file.copy_parallel` when `import moxing` works (ModelArts provides it;
the PyPI package of that name is unrelated and must not be installed), otherwise boto3 against the
S3 protocol (OBS speaks it) for obs:// and s3:// URLs, with the endpoint from S3_ENDPOINT and the
standard AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY credentials. Credentials are never logged or saved.
"""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
import zipfile
from pathlib import Path
from urllib.parse import urlparse

from src.config import Config
from src.errors import UserError
from src.files import periodic_checkpoints

log = logging.getLogger("train")
DEFAULT_DATA_DIR = "/cache/data"  # ModelArts' local disk
DONE_MARKER = ".sync_done"
# ".earlier-run": the run a fresh run replaces, set aside during its first epoch (engine/run_folder.py ASIDE)
SKIP_UPLOAD = ("feature_cache", "rewritten_network", "kernel_meta", "pretrained", ".earlier-run")


def _lock_timeout() -> float:
    return float(os.environ.get("MODELARTS_SYNC_TIMEOUT", "3600"))


class S3Transfer:
    """Copy folders between S3-compatible object storage and local disk with boto3."""

    def __init__(self):
        import boto3
        from botocore.config import Config as BotoConfig

        endpoint = os.environ.get("S3_ENDPOINT") or None
        self.client = boto3.client("s3", endpoint_url=endpoint,
                                   config=BotoConfig(retries={"max_attempts": 3}, connect_timeout=10))

    @staticmethod
    def split(url: str) -> tuple[str, str]:
        parsed = urlparse(url)
        if parsed.scheme not in ("obs", "s3") or not parsed.netloc:
            raise UserError(f"{url} is not an obs:// or s3:// URL (write obs://bucket/path)")
        return parsed.netloc, parsed.path.lstrip("/")

    def _call(self, url: str, fn, *args, **kwargs):
        from boto3.exceptions import S3TransferFailedError, S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            return fn(*args, **kwargs)
        except (S3UploadFailedError, S3TransferFailedError) as exc:
            # boto3's transfer manager wraps the ClientError in a message: "... An error occurred (NoSuchBucket) ..."
            text = str(exc)
            if "NoSuchBucket" in text or "(404)" in text:
                raise UserError(f"{url} does not exist (check the bucket and path)") from None
            raise UserError(f"transfer of {url} failed: {text.splitlines()[0] if text else type(exc).__name__} "
                            "(check the URL and S3_ENDPOINT)") from None
        except NoCredentialsError:
            raise UserError(f"no credentials for {url} (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)") from None
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchBucket", "404", "NoSuchKey"):
                raise UserError(f"{url} does not exist (check the bucket and path)") from None
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
                raise UserError(f"the object store refused the credentials for {url} ({code}; check "
                                "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and S3_ENDPOINT)") from None
            raise UserError(f"transfer of {url} failed: {code or exc} (check the URL and S3_ENDPOINT)") from None
        except BotoCoreError as exc:
            raise UserError(f"cannot reach the object store for {url}: {type(exc).__name__} "
                            "(check S3_ENDPOINT and the network)") from None

    def exists(self, url: str) -> bool:
        """Whether any object lies under the URL's prefix."""
        bucket, prefix = self.split(url)
        folder = prefix.rstrip("/") + "/" if prefix else ""
        found = self._call(url, lambda: self.client.list_objects_v2(Bucket=bucket, Prefix=folder, MaxKeys=1))
        return bool(found.get("KeyCount"))

    def download(self, url: str, local: Path) -> int:
        """Copy every object under the URL's prefix (or the single object it names) into `local`."""
        bucket, prefix = self.split(url)
        folder = prefix.rstrip("/") + "/" if prefix else ""
        keys = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in self._call(url, lambda: list(paginator.paginate(Bucket=bucket, Prefix=prefix))):
            # an S3 prefix matches by string: data/photos also lists data/photos2/..., which is not inside it
            keys += [obj["Key"] for obj in page.get("Contents", [])
                     if (obj["Key"] == prefix or obj["Key"].startswith(folder)) and not obj["Key"].endswith("/")]
        if not keys:
            raise UserError(f"{url} does not exist or is empty (check the bucket and path)")
        # every target is checked before anything is copied: a key is a string, not a path below `local`
        targets = [(key, local_target(local, Path(key).name if key == prefix else key[len(folder):], url, key))
                   for key in keys]
        _check_no_file_is_a_folder(targets, local, url)
        for key, target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            self._call(url, self.client.download_file, bucket, key, str(target))
        return len(keys)

    def check_writable(self, url: str) -> None:
        """Fail before training, not after the first epoch, when the output bucket is missing or refused."""
        bucket, _ = self.split(url)
        self._call(url, self.client.head_bucket, Bucket=bucket)

    def upload(self, local: Path, url: str) -> int:
        """Copy the output folder's files to the URL, and delete the checkpoints and event files there that the
        folder no longer has (MIRRORED)."""
        bucket, prefix = self.split(url)
        base = f"{prefix.rstrip('/')}/" if prefix else ""
        count = 0
        for path in upload_files(local):
            key = base + path.relative_to(local).as_posix()
            self._call(url, self.client.upload_file, str(path), bucket, key)
            count += 1
        for folder in MIRRORED:
            pages = self._call(url, lambda prefix=f"{base}{folder}/": list(
                self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)))
            keys = {o["Key"][len(f"{base}{folder}/"):]: o["Key"] for page in pages for o in page.get("Contents", [])}
            for name in stale(local, folder, keys):
                self._call(url, self.client.delete_object, Bucket=bucket, Key=keys[name])
        return count


# the folders of output_path that train_url mirrors (deleting what the run no longer has), so that a restarted job
# fetches this run's files only: the checkpoints keep_checkpoint_max pruned or an earlier run left, and an earlier
# run's TensorBoard event files (TensorBoard would show both runs' epochs as one run's)
MIRRORED = ("checkpoint", "tensorboard")


def stale(local: Path, folder: str, remote_names) -> list[str]:
    """The names (relative to `folder`) under train_url's `folder` that the output folder's `folder` does not have."""
    if folder == "checkpoint":  # the periodic checkpoints and best.ckpt; not pretrained/ or other files
        kept = {p.name for p in (local / folder).glob("*.ckpt")}
        return [n for n in remote_names if n.endswith(".ckpt") and "/" not in n and n not in kept]
    kept = {p.relative_to(local / folder).as_posix() for p in (local / folder).rglob("*") if p.is_file()} \
        if (local / folder).is_dir() else set()
    return [n for n in remote_names if n and not n.endswith("/") and n not in kept]


def local_target(local: Path, rel: str, url: str, key: str) -> Path:
    """`local / rel`, refused unless it stays inside `local`: an object key such as `data/../../x` or `data//tmp/x`
    (pathlib drops `local` before an absolute part) would otherwise write anywhere on the host."""
    parts = rel.split("/")
    target = local.joinpath(*parts) if parts else local
    root = local.resolve()
    if any(p in ("", ".", "..") for p in parts) or not target.resolve().is_relative_to(root) \
            or target.resolve() == root:
        raise UserError(f"object {key!r} under {url} does not name a file inside {local} (a key with '..', '.' "
                        "or an empty part such as '//' is refused: rename that object in the bucket)")
    return target


def _check_no_file_is_a_folder(targets: list[tuple[str, Path]], local: Path, url: str) -> None:
    """An object store holds `data/train` and `data/train/a.jpg` side by side; a file system cannot."""
    files = {target: key for key, target in targets}
    for key, target in targets:
        for parent in target.parents:
            if parent == local:
                break
            if parent in files:
                raise UserError(f"objects {files[parent]!r} and {key!r} under {url} make {parent} both a file and a "
                                f"folder (rename or delete the object {files[parent]!r} in the bucket)")


def upload_files(local: Path) -> list[Path]:
    """The regular files to upload from an output folder: no temp files, caches or symlinks (a link inside the
    output folder could point at any file of the host), and no folder reached through a link."""
    files = []
    for dirpath, dirnames, filenames in os.walk(local, followlinks=False):
        here = Path(dirpath)
        if here == local:
            dirnames[:] = [d for d in dirnames if d not in SKIP_UPLOAD]
        dirnames[:] = sorted(d for d in dirnames if not (here / d).is_symlink())
        for name in sorted(filenames):
            path = here / name
            if name.startswith(".tmp") or name == ".lock" or path.is_symlink() or not path.is_file():
                continue
            files.append(path)
    return files


class MoxTransfer:
    """MoXing, as preinstalled on ModelArts."""

    def __init__(self, mox):
        self.mox = mox

    def exists(self, url: str) -> bool:
        return bool(self.mox.file.exists(url) and self.mox.file.list_directory(url))

    def download(self, url: str, local: Path) -> int:
        local.mkdir(parents=True, exist_ok=True)
        self.mox.file.copy_parallel(src_url=url, dst_url=str(local))
        return sum(1 for p in local.rglob("*") if p.is_file())

    def upload(self, local: Path, url: str) -> int:
        files = upload_files(local)  # the same files as S3's: no lock, temp files, caches or an earlier run
        for path in files:
            self.mox.file.copy(str(path), f"{url.rstrip('/')}/{path.relative_to(local).as_posix()}")
        for folder in MIRRORED:
            remote = f"{url.rstrip('/')}/{folder}"
            if self.mox.file.exists(remote):
                for name in stale(local, folder, self.mox.file.list_directory(remote, recursive=True)):
                    self.mox.file.remove(f"{remote}/{name}", recursive=False)
        return len(files)


def transfer_backend():
    try:
        import moxing  # noqa: F401 - only present on ModelArts
    except ImportError:
        return S3Transfer()
    import moxing as mox

    return MoxTransfer(mox)


def _unzip_all(folder: Path) -> None:
    for archive in sorted(folder.rglob("*.zip")):
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(archive.parent)
        except zipfile.BadZipFile:
            raise UserError(f"{archive} is not a valid zip file (upload it again)") from None
        log.info("unpacked %s", archive)


def download_once(transfer, url: str, local: Path) -> None:
    """Download `url` into `local` once per node: the first process copies, the others wait on a lock."""
    local.mkdir(parents=True, exist_ok=True)
    marker = local / DONE_MARKER
    lock_path = local.parent / f".{local.name}.lock"
    deadline = time.monotonic() + _lock_timeout()
    with open(lock_path, "w") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise UserError(f"waited {_lock_timeout():.0f} s for another process to download {url} into "
                                    f"{local} (check that process's log; remove {lock_path} if it died)") from None
                time.sleep(1)
        try:
            if marker.exists() and marker.read_text() == url:
                log.info("%s already holds %s", local, url)
                return
            start = time.perf_counter()
            count = transfer.download(url, local)
            _unzip_all(local)
            marker.write_text(url)
            log.info("downloaded %d files from %s to %s (%.1f s)", count, url, local, time.perf_counter() - start)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def fetch_earlier_run(transfer, cfg: Config) -> None:
    """A restarted job (`--resume_ckpt auto`) on a fresh disk: the outputs its earlier attempt uploaded to train_url
    (checkpoints, metrics.csv, train.log, ...) are copied into output_path, so the run goes on from them. A disk that
    has the run's checkpoints already (a restart on the same machine) is newer than train_url and is kept."""
    out = Path(cfg.output_path)

    def has_checkpoints() -> bool:  # of this model's run: a lone best.ckpt or another model's do not count
        return bool(periodic_checkpoints(out / "checkpoint", cfg.model)) if (out / "checkpoint").is_dir() else False

    if has_checkpoints():
        return
    if not transfer.exists(cfg.train_url):
        log.info("resume_ckpt auto: %s holds no earlier outputs", cfg.train_url)
        return
    lock_path = out.parent / f".{out.name}.fetch.lock"  # the processes of one node: one copies, the others wait
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not has_checkpoints():
                count = transfer.download(cfg.train_url, out)
                log.info("resume_ckpt auto: fetched %d files of the earlier attempt from %s", count, cfg.train_url)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _resume_from(local_ckpt: Path, cfg: Config) -> bool:
    """`--resume_ckpt auto` without --pretrain_ckpt, and a checkpoint_url of one run's periodic checkpoints of this
    model (an earlier job's train_url, say), while output_path has none (train_url had none): they become the run's
    own (with that run's metrics.csv beside them, when there is one), for auto to take the newest whole one. False
    when checkpoint_url is the weights to start from."""
    own = Path(cfg.output_path) / "checkpoint"
    if cfg.pretrain_ckpt:
        return False  # a fine-tuning job names the file it starts from
    if own.is_dir() and periodic_checkpoints(own, cfg.model):
        return True  # the run's own (from train_url): newer than any checkpoint_url holds
    folders = sorted({p.parent for p in local_ckpt.rglob(f"{cfg.model}-*.ckpt") if periodic_checkpoints(p.parent,
                                                                                                         cfg.model)})
    if not folders:
        return False
    if len(folders) > 1:
        names = ", ".join(str(f.relative_to(local_ckpt)) or "." for f in folders)
        raise UserError(f"checkpoint_url {cfg.checkpoint_url} holds periodic checkpoints of {cfg.model} in "
                        f"{len(folders)} folders ({names}): point it at the one run to resume")
    periodic = periodic_checkpoints(folders[0], cfg.model)
    own.mkdir(parents=True, exist_ok=True)
    for ckpt in periodic:
        shutil.copy2(ckpt, own / ckpt.name)
    metrics = folders[0].parent / "metrics.csv" if folders[0].name == "checkpoint" else None
    if metrics is not None and metrics.is_file() and not (own.parent / "metrics.csv").exists():
        shutil.copy2(metrics, own.parent / "metrics.csv")  # the epochs before the checkpoint, for its history
    log.info("resume_ckpt auto: %d periodic checkpoints of %s from %s, the newest %s", len(periodic), cfg.model,
             cfg.checkpoint_url, periodic[-1].name)
    return True


def sync_inputs(cfg: Config) -> Config:
    """With enable_modelarts: fetch data (and a checkpoint) and return the config pointing at the local copies."""
    if not cfg.enable_modelarts:
        return cfg
    if not cfg.data_url or not cfg.train_url:
        raise UserError("enable_modelarts needs --data_url and --train_url (obs://bucket/path of the data set "
                        "and of the output folder)")
    transfer = transfer_backend()
    if hasattr(transfer, "check_writable"):
        transfer.check_writable(cfg.train_url)
    local_data = Path(cfg.dataset_path or DEFAULT_DATA_DIR)
    download_once(transfer, cfg.data_url, local_data)
    changes = {"dataset_path": str(local_data)}
    if cfg.resume_ckpt == "auto":
        fetch_earlier_run(transfer, cfg)
    if cfg.checkpoint_url:
        local_ckpt = Path(cfg.output_path) / "pretrained"
        download_once(transfer, cfg.checkpoint_url, local_ckpt)
        if cfg.resume_ckpt == "auto" and _resume_from(local_ckpt, cfg):
            return cfg.replace(**changes)
        found = sorted(p for ext in ("*.ckpt", "*.safetensors", "*.pth", "*.pt") for p in local_ckpt.rglob(ext))
        name = Path(cfg.pretrain_ckpt).name if cfg.pretrain_ckpt else None
        chosen = next((p for p in found if p.name == name), None) if name else (found[0] if len(found) == 1 else None)
        if chosen is None:
            raise UserError(f"{cfg.checkpoint_url} holds {len(found)} checkpoint files; name the one to use with "
                            "--pretrain_ckpt FILE_NAME")
        changes["pretrain_ckpt"] = str(chosen)
    return cfg.replace(**changes)


def upload_outputs(cfg: Config) -> None:
    if not cfg.enable_modelarts:
        return
    count = transfer_backend().upload(Path(cfg.output_path), cfg.train_url)
    log.info("uploaded %d files from %s to %s", count, cfg.output_path, cfg.train_url)
