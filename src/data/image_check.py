"""Decode every image once before training, in parallel, and remember the folders that passed.

The signature and end-marker check in checks.py is cheap but cannot see a damaged body: a JPEG whose data was cut
and an end marker appended, or overwritten with garbage, passes it. Here every file is decoded: JPEG by
libjpeg-turbo (the decoder MindSpore uses) through simplejpeg in strict mode, at 1/8 scale (the whole entropy-coded
data is still read, only the inverse DCT is cheaper); PNG and BMP by Pillow. Both release the GIL, so threads use
every core.

What libjpeg reports:
- an error (the file cannot be decoded), missing data ("premature end of data segment": the rest of the image
  would be grey), undecodable data ("bad Huffman code") or data that is mostly not image data (extraneous bytes
  before the end marker above 5% of the file: a body overwritten with garbage): the image is refused, naming it;
- other recoverable damage (e.g. a few "extraneous bytes before marker", common in real photo collections and
  harmless): the image trains as decoded, and the files are named in one warning.

Results are cached per class folder, keyed by the names, sizes and modification times of its images, under
`$CLS_CACHE_DIR` (default `$XDG_CACHE_HOME/mindspore_cls` or `~/.cache/mindspore_cls`), so a second run over the
same data decodes nothing.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from src.errors import UserError, stop_if_signalled
from src.files import write_atomically

log = logging.getLogger("train")
CACHE_VERSION = 1
FATAL_JPEG_WARNINGS = ("premature end", "huffman")  # data is missing or garbage: part of the image is invented
EXTRANEOUS = re.compile(r"(\d+) extraneous bytes")
JPEG_COLORSPACES = {"Gray": "GRAY", "CMYK": "CMYK", "YCCK": "CMYK"}


@dataclass
class FolderCheck:
    """The decode check of one class folder: refused files (path, why) and damaged-but-usable ones."""

    errors: list[tuple[Path, str]] = field(default_factory=list)
    warnings: list[tuple[Path, str]] = field(default_factory=list)


def cache_root() -> Path:
    if os.environ.get("CLS_CACHE_DIR"):
        return Path(os.environ["CLS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mindspore_cls"


def decode_problem(path: Path) -> tuple[str | None, str | None]:
    """(error, warning) of decoding `path` fully: error is why it cannot be used, warning is harmless damage."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"cannot be read ({exc.strerror})", None
    if path.suffix.lower() in (".jpg", ".jpeg") and data.startswith(b"\xff\xd8"):
        return _jpeg_problem(data)
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for damaged files
        return f"cannot be decoded ({str(exc).strip() or type(exc).__name__})", None
    return None, None


def _jpeg_problem(data: bytes) -> tuple[str | None, str | None]:
    import simplejpeg

    def decode(strict: bool) -> None:
        colorspace = simplejpeg.decode_jpeg_header(data)[2]  # decode as stored: libjpeg turns no CMYK into RGB
        simplejpeg.decode_jpeg(data, colorspace=JPEG_COLORSPACES.get(colorspace, "RGB"), min_height=1, min_width=1,
                               min_factor=8, strict=strict)

    try:
        decode(strict=True)
        return None, None
    except ValueError as exc:
        why = str(exc).strip()
    try:  # strict mode turns libjpeg's warnings into errors: decoding leniently tells which this was
        decode(strict=False)
    except ValueError as exc:
        return f"cannot be decoded ({str(exc).strip()})", None
    extraneous = EXTRANEOUS.search(why)
    if any(word in why.lower() for word in FATAL_JPEG_WARNINGS) or (
            extraneous and int(extraneous.group(1)) > 0.05 * len(data)):
        return f"is damaged ({why}: part of the image would be made up)", None
    return None, why


def folder_digest(images: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in images:
        stat = path.stat()
        digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class ImageCheckCache:
    """Per split folder: for each class folder that passed, its digest and its warnings."""

    def __init__(self, split_dir: Path, decoded: bool = True, identity: str = ""):
        key = hashlib.sha256((str(split_dir.resolve()) + identity).encode()).hexdigest()[:20]
        # a split checked without decoding (eval reads train/ only for its class names) has its own record
        self.path = cache_root() / "image_checks" / f"{key}{'' if decoded else '-precheck'}.json"
        self.split_dir = split_dir
        try:
            data = json.loads(self.path.read_text())
            self.folders = data["folders"] if data.get("version") == CACHE_VERSION else {}
        except (OSError, ValueError, KeyError, TypeError):
            self.folders = {}

    def get(self, name: str, digest: str) -> FolderCheck | None:
        entry = self.folders.get(name)
        if not isinstance(entry, dict) or entry.get("digest") != digest:
            return None
        return FolderCheck(warnings=[(self.split_dir / name / f, why) for f, why in entry.get("warnings", [])])

    def put(self, name: str, digest: str, check: FolderCheck) -> None:
        self.folders[name] = {"digest": digest, "warnings": [[p.name, why] for p, why in check.warnings]}

    def save(self) -> None:
        text = json.dumps({"version": CACHE_VERSION, "split": str(self.split_dir), "folders": self.folders})
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(self.path, lambda tmp: tmp.write_text(text))
        except (OSError, UserError) as exc:  # a cache that cannot be written costs time, not correctness
            log.debug("image check cache %s not written: %s", self.path, exc)


def check_images(split_dir: Path, by_class: dict[str, list[Path]], precheck: Callable[[Path], str | None],
                 decode: bool = True, identity: str = "") -> FolderCheck:
    """Check every image of a split (class folder -> images): `precheck` (a cheap look at the file's signature and
    end marker), then, with `decode`, a full decode. Class folders that passed before, unchanged, are skipped.

    A label file's images are grouped by their folder below `split_dir` instead; `identity` (the label file) keeps
    two label files that list images of the same folders from sharing one cache record."""
    cache = ImageCheckCache(split_dir, decode, identity)
    result, todo, digests = FolderCheck(), [], {}
    for name, images in by_class.items():
        digests[name] = folder_digest(images)
        cached = cache.get(name, digests[name])
        if cached is None:
            todo.append(name)
        else:
            result.warnings += cached.warnings
    paths = [p for name in todo for p in by_class[name]]
    if not paths:
        return result

    def check(path: Path) -> tuple[str | None, str | None]:
        problem = precheck(path)
        return (problem, None) if problem or not decode else decode_problem(path)

    start = time.perf_counter()
    threads = max(1, os.cpu_count() or 1) if decode else 16  # decoding is CPU-bound; the precheck waits on I/O
    pool, outcomes = ThreadPoolExecutor(max_workers=threads), {}
    try:
        for path, outcome in zip(paths, pool.map(check, paths)):
            outcomes[path] = outcome
            stop_if_signalled()  # Ctrl-C stops an hour-long check at once, not after it
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    elapsed = time.perf_counter() - start
    for name in todo:
        folder = FolderCheck()
        for path in by_class[name]:
            error, warning = outcomes[path]
            if error:
                folder.errors.append((path, error))
            elif warning:
                folder.warnings.append((path, warning))
        if not folder.errors:
            cache.put(name, digests[name], folder)
        result.errors += folder.errors
        result.warnings += folder.warnings
    cache.save()
    if decode:
        cached = sum(len(images) for images in by_class.values()) - len(paths)
        log.info("%s: decoded %d images to check them in %.1f s (%.1f s per 10,000 images on %d threads)%s",
                 split_dir, len(paths), elapsed, elapsed / len(paths) * 10_000, threads,
                 f"; {cached} unchanged since an earlier check" if cached else "")
    return result
