"""Published ImageNet weights by short name (`mindcv:resnet50`, `torchvision:mobilenet_v2`) or URL, downloaded once.

A download goes to the cache folder (CLS_WEIGHTS_CACHE, else $XDG_CACHE_HOME/mindspore_cls, else
~/.cache/mindspore_cls) as NAME.part, resumes from there after an interruption (an HTTP Range request with If-Range,
only when the server named the file's version by an ETag or Last-Modified: else a changed file would be spliced), ends
with a line when it stalls (STALL_SECONDS), shows a progress bar on a terminal, is checked against the sha256 its file
name starts (torch.hub's convention: `resnet50-0676ba61.pth` is a file whose sha256 begins 0676ba61) when the
publisher follows it, is refused when it is a web page (a login or error page), and only then is renamed to NAME: a
half-written file is never used. Two runs that want the same file take turns (a lock file).
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
import time
import urllib.error
import urllib.request
from pathlib import Path

from src.errors import UserError, stop_if_signalled
from src.models.registry import published_weights

log = logging.getLogger("train")
BASE_URL_ENV = "CLS_WEIGHTS_URL"
CACHE_ENV = "CLS_WEIGHTS_CACHE"
# every card's published weights (src/models/*/__init__.py) by short name, and the sources' prefixes
PUBLISHED = published_weights()
_PREFIXES = tuple(dict.fromkeys(name.split(":")[0] + ":" for name in PUBLISHED))
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
    if dest.is_file() and not _is_web_page(dest):
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with _locked(dest):
            if dest.is_file() and _is_web_page(dest):  # kept by an earlier version of this package
                log.info("%s is a web page, not weights: downloading it again", dest)
                dest.unlink()
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


# A download that brings fewer than STALL_BYTES in STALL_SECONDS (or nothing for READ_TIMEOUT) is stalled: it ends
# with a line, its part kept for the next try, instead of hanging the run on a trickling or stuck server.
STALL_SECONDS = 60.0
STALL_BYTES = 64 * 1024
READ_TIMEOUT = 30.0


def _one_line(text: object) -> str:
    return " ".join(str(text).split())  # urllib's redirect-loop reason spans three lines


def _version(headers) -> str | None:
    """The validator If-Range can name: a strong ETag, else Last-Modified (a weak ETag W/"..." is not allowed)."""
    etag = headers.get("ETag")
    return etag if etag and not etag.startswith("W/") else headers.get("Last-Modified")


def _download(url: str, dest: Path, digest: str | None, spec: str) -> None:
    from tqdm import tqdm

    part = dest.with_name(dest.name + ".part")
    validator = dest.with_name(dest.name + ".part.version")  # the ETag or Last-Modified the part was sent with
    have = part.stat().st_size if part.is_file() else 0
    version = validator.read_text().strip() if have and validator.is_file() else ""
    if have and not version:  # a part without a validator cannot be resumed safely: the file may have changed
        log.info("%s has no version from the server (ETag or Last-Modified) to resume it by: downloading %s whole",
                 part, url)
        part.unlink()
        have = 0
    # If-Range: a file that changed since the part was fetched is sent whole, not appended to the part
    headers = {"Range": f"bytes={have}-", "If-Range": version} if have else {}
    request = urllib.request.Request(url, headers=headers)
    hand = f"download {url} by hand to {dest}, or pass the file's path"
    try:
        response = urllib.request.urlopen(request, timeout=READ_TIMEOUT)  # noqa: S310 - http(s) only (is_remote)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # not a prefix of the file (it changed, or a stray part file): start anew
            _discard(part, validator)
            return _download(url, dest, digest, spec)
        raise UserError(f"cannot download {spec}: HTTP {exc.code} {_one_line(exc.reason)} from {url} ({hand})"
                        ) from None
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:  # ValueError: a bad URL
        reason = getattr(exc, "reason", None) or exc
        raise UserError(f"cannot download {spec}: {_one_line(reason)} (offline, or a wrong URL? {hand})") from None
    with response:
        resumed = response.status == 206
        if resumed and not (response.headers.get("Content-Range") or "").startswith(f"bytes {have}-"):
            response.close()  # the server sent another part than the one asked for: start anew
            _discard(part, validator)
            return _download(url, dest, digest, spec)
        if not resumed:
            validator.unlink(missing_ok=True)
            if _version(response.headers):
                validator.write_text(_version(response.headers))
        total = response.headers.get("Content-Length")
        total = int(total) + (have if resumed else 0) if total else None
        log.info("downloading %s to %s%s", url, dest, f" (resuming at {have} bytes)" if resumed else "")
        with open(part, "ab" if resumed else "wb") as out, tqdm(total=total, initial=have if resumed else 0,
                                                                unit="B", unit_scale=True, disable=None,
                                                                desc=dest.name) as bar:
            window_start, window_bytes = time.monotonic(), 0
            while True:
                stop_if_signalled()  # a safe point: Ctrl-C or SIGTERM stops here, the part kept for the next try
                try:
                    chunk = response.read1(1 << 20)
                except TimeoutError:
                    chunk = None
                except (OSError, http.client.HTTPException) as exc:  # a broken connection: what came is kept
                    if total is None:
                        raise UserError(f"the download of {spec} broke off at {out.tell()} bytes ({exc}; run "
                                        f"again to resume it, or {hand})") from None
                    break
                if chunk == b"":
                    break
                if chunk:
                    out.write(chunk)  # a full disk raises OSError: local_path says so
                    bar.update(len(chunk))
                    window_bytes += len(chunk)
                now = time.monotonic()
                if chunk is None or (now - window_start >= STALL_SECONDS and window_bytes < STALL_BYTES):
                    got = "nothing" if chunk is None else f"{window_bytes} bytes"
                    waited = READ_TIMEOUT if chunk is None else now - window_start
                    raise UserError(f"the download of {spec} stalled at {out.tell()} bytes: {got} in the last "
                                    f"{waited:.0f} s from {url} (a stuck or very slow server; run again to resume "
                                    f"it, or {hand})")
                if now - window_start >= STALL_SECONDS:
                    window_start, window_bytes = now, 0
        if total is not None and part.stat().st_size != total:
            raise UserError(f"the download of {spec} broke off at {part.stat().st_size} of {total} bytes (run "
                            f"again to resume it, or {hand})")
    if _is_web_page(part):
        _discard(part, validator)
        raise UserError(f"cannot download {spec}: {url} sent a web page, not weights (a login, error or mirror "
                        f"page? check the URL or {BASE_URL_ENV}, or {hand})")
    sha = file_sha256(part)
    if digest and not sha.startswith(digest):
        _discard(part, validator)
        raise UserError(f"the download of {spec} is damaged: its sha256 is {sha[:16]}..., its name says "
                        f"{digest} (run again to download it anew, or {hand})")
    os.replace(part, dest)
    validator.unlink(missing_ok=True)
    log.info("downloaded %s (sha256 %s%s)", dest, sha, ", as its name says" if digest else "")


def _discard(part: Path, validator: Path) -> None:
    """A part that must not be resumed, and the version it was fetched with."""
    part.unlink()
    validator.unlink(missing_ok=True)


def _is_web_page(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(512).lstrip().lower().startswith((b"<!doctype html", b"<html"))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
