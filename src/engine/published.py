"""Published ImageNet weights by short name (`mindcv:resnet50`, `torchvision:mobilenet_v2`) or URL, downloaded once.

A download goes to the cache folder (CLS_WEIGHTS_CACHE, else $XDG_CACHE_HOME/mindspore_cls, else
~/.cache/mindspore_cls) as NAME.part, resumes from there after an interruption (an HTTP Range request), shows a
progress bar on a terminal, is checked against the sha256 its file name starts (torch.hub's convention:
`resnet50-0676ba61.pth` is a file whose sha256 begins 0676ba61) when the publisher follows it, and only then is
renamed to NAME: a half-written file is never used. Two runs that want the same file take turns (a lock file).
CLS_WEIGHTS_URL replaces the host and folder of every short name's URL (a mirror, or a server of the tests).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import logging
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from src.errors import UserError

log = logging.getLogger("train")
BASE_URL_ENV = "CLS_WEIGHTS_URL"
CACHE_ENV = "CLS_WEIGHTS_CACHE"
_MINDCV = "https://download.mindspore.cn/toolkits/mindcv"
_TORCHVISION = "https://download.pytorch.org/models"


@dataclass(frozen=True)
class Published:
    url: str
    model: str
    digest_in_name: bool  # the hex after the last "-" of the file name starts its sha256

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[1]


# mindcv 0.3.0's default_cfgs (its file names carry no documented digest); torchvision's IMAGENET1K_V1 weights
# (resize 256, crop 224, bilinear), whose names start their sha256
PUBLISHED = {
    "mindcv:mobilenet_v2_100": Published(f"{_MINDCV}/mobilenet/mobilenetv2/mobilenet_v2_100-d5532038.ckpt",
                                         "mobilenetv2", False),
    "mindcv:mobilenet_v3_large_100": Published(
        f"{_MINDCV}/mobilenet/mobilenetv3/mobilenet_v3_large_100-1279ad5f.ckpt", "mobilenetv3_large", False),
    "mindcv:mobilenet_v3_small_100": Published(
        f"{_MINDCV}/mobilenet/mobilenetv3/mobilenet_v3_small_100-509c6047.ckpt", "mobilenetv3_small", False),
    "mindcv:resnet50": Published(f"{_MINDCV}/resnet/resnet50-e0733ab8.ckpt", "resnet50", False),
    "mindcv:resnet101": Published(f"{_MINDCV}/resnet/resnet101-689c5e77.ckpt", "resnet101", False),
    "torchvision:mobilenet_v2": Published(f"{_TORCHVISION}/mobilenet_v2-b0353104.pth", "mobilenetv2", True),
    "torchvision:mobilenet_v3_large": Published(f"{_TORCHVISION}/mobilenet_v3_large-8738ca79.pth",
                                                "mobilenetv3_large", True),
    "torchvision:mobilenet_v3_small": Published(f"{_TORCHVISION}/mobilenet_v3_small-047dcff4.pth",
                                                "mobilenetv3_small", True),
    "torchvision:resnet50": Published(f"{_TORCHVISION}/resnet50-0676ba61.pth", "resnet50", True),
    "torchvision:resnet101": Published(f"{_TORCHVISION}/resnet101-63fe2227.pth", "resnet101", True),
}
_PREFIXES = ("mindcv:", "torchvision:")
_DIGEST = re.compile(r".*-([0-9a-f]{8,64})\.[A-Za-z.]+")  # torch.hub's: NAME-<sha256 start>.EXT


def is_remote(spec: str) -> bool:
    return spec.startswith(("http://", "https://", *_PREFIXES))


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "mindspore_cls"


def remote_file_name(spec: str) -> str:
    """The file name a short name or URL downloads to."""
    if spec in PUBLISHED:
        return PUBLISHED[spec].file_name
    return spec.split("?")[0].rstrip("/").rsplit("/", 1)[-1] or "download"


def cached_path(spec: str) -> Path:
    """Where a short name's file is cached (its own name: the table's names are unique), or a URL's (a folder per
    URL: many publishers name every file model.safetensors)."""
    if spec in PUBLISHED or spec.startswith(_PREFIXES):
        return cache_dir() / remote_file_name(spec)
    return cache_dir() / "urls" / hashlib.sha256(spec.encode()).hexdigest()[:16] / remote_file_name(spec)


def local_path(spec: str, what: str) -> Path:
    """The file for a --pretrain_ckpt/--ckpt_file value: a path as it is; a short name or URL downloaded (once)."""
    if not is_remote(spec):
        return Path(spec)
    url, digest = _url_and_digest(spec, what)
    dest = cached_path(spec)
    if dest.is_file():
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with _locked(dest):
            if not dest.is_file():  # another run may have finished it while this one waited
                _download(url, dest, digest, spec)
    except OSError as exc:
        raise UserError(f"cannot write the download {dest}: {exc.strerror or exc} (free some space or set "
                        f"{CACHE_ENV} to a writable folder)") from None
    return dest


def _url_and_digest(spec: str, what: str) -> tuple[str, str | None]:
    if spec.startswith(_PREFIXES):
        if spec not in PUBLISHED:
            raise UserError(f"{what} {spec} is not a published checkpoint this package knows (known: "
                            f"{', '.join(PUBLISHED)}; or pass a URL or a file)")
        entry = PUBLISHED[spec]
        url = entry.url
        if os.environ.get(BASE_URL_ENV):
            url = f"{os.environ[BASE_URL_ENV].rstrip('/')}/{entry.file_name}"
        return url, _DIGEST.fullmatch(entry.file_name).group(1) if entry.digest_in_name else None
    return spec, None  # a name like model-20231225.ckpt need not carry a digest: the sha256 is logged instead


@contextlib.contextmanager
def _locked(dest: Path):
    with open(dest.with_name(dest.name + ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is downloading %s: waiting for it", dest.name)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _download(url: str, dest: Path, digest: str | None, spec: str) -> None:
    from tqdm import tqdm

    part = dest.with_name(dest.name + ".part")
    validator = dest.with_name(dest.name + ".part.version")  # the ETag or Last-Modified the part was sent with
    have = part.stat().st_size if part.is_file() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    if have and validator.is_file():  # If-Range: a file that changed since is sent whole, not appended to
        headers["If-Range"] = validator.read_text().strip()
    request = urllib.request.Request(url, headers=headers)
    hand = f"download {url} by hand to {dest}, or pass the file's path"
    try:
        response = urllib.request.urlopen(request, timeout=60)  # noqa: S310 - http(s) only (is_remote)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # not a prefix of the file (it changed, or a stray part file): start anew
            part.unlink()
            validator.unlink(missing_ok=True)
            return _download(url, dest, digest, spec)
        raise UserError(f"cannot download {spec}: HTTP {exc.code} {exc.reason} from {url} ({hand})") from None
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:  # ValueError: a bad URL
        reason = getattr(exc, "reason", None) or exc
        raise UserError(f"cannot download {spec}: {reason} (offline, or a wrong URL? {hand})") from None
    with response:
        resumed = response.status == 206
        version = response.headers.get("ETag") or response.headers.get("Last-Modified")
        if version and not resumed:
            validator.write_text(version)
        total = response.headers.get("Content-Length")
        total = int(total) + (have if resumed else 0) if total else None
        log.info("downloading %s to %s%s", url, dest, f" (resuming at {have} bytes)" if resumed else "")
        with open(part, "ab" if resumed else "wb") as out, tqdm(total=total, initial=have if resumed else 0,
                                                                unit="B", unit_scale=True, disable=None,
                                                                desc=dest.name) as bar:
            while True:
                try:
                    chunk = response.read(1 << 20)
                except (OSError, http.client.HTTPException) as exc:  # a broken connection: what came is kept
                    if total is None:
                        raise UserError(f"the download of {spec} broke off at {out.tell()} bytes ({exc}; run "
                                        f"again to resume it, or {hand})") from None
                    break
                if not chunk:
                    break
                out.write(chunk)  # a full disk raises OSError: local_path says so
                bar.update(len(chunk))
        if total is not None and part.stat().st_size != total:
            raise UserError(f"the download of {spec} broke off at {part.stat().st_size} of {total} bytes (run "
                            f"again to resume it, or {hand})")
    sha = file_sha256(part)
    if digest and not sha.startswith(digest):
        part.unlink()
        validator.unlink(missing_ok=True)
        raise UserError(f"the download of {spec} is damaged: its sha256 is {sha[:16]}..., its name says "
                        f"{digest} (run again to download it anew, or {hand})")
    os.replace(part, dest)
    validator.unlink(missing_ok=True)
    log.info("downloaded %s (sha256 %s%s)", dest, sha, ", as its name says" if digest else "")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
