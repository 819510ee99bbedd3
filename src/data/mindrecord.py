"""MindRecord shards: written by tools/convert_to_mindrecord.py, read by `--dataset mindrecord` (MindDataset).

Layout: DATASET_PATH/train/ and DATASET_PATH/val/, written together as one conversion, each one shard set
(`<split>.mindrecord0..N-1`, each with the SQLite index `.db` MindSpore writes beside it). A record holds the
encoded image (bytes, as in the source file), its label (int32) and its source path. The schema's description (in
every shard's header) holds this package's facts about the split: the class names, the images per class and their
sum, and the conversion's id, so a reader needs nothing else.

A shard's header is the first 8 bytes (its length, little-endian) and a JSON document: its pages, their sizes, the
other shards of the set. The check reads the headers and the indexes: a missing shard or index, a truncated shard
(shorter than its pages), a damaged index, labels beyond the classes, a set from another converter or a train and
val of two conversions is one line naming the file, before anything compiles.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sqlite3
import struct
import uuid
from pathlib import Path

from src.data.label_files import count_per_class
from src.errors import UserError, first_line

log = logging.getLogger("train")
FORMAT = "mindspore_cls/mindrecord"
VERSION = 1
SPLITS = {"train": ("train",), "val": ("val", "validation_preprocess")}
SCHEMA = {"image": {"type": "bytes"}, "label": {"type": "int32"}, "file": {"type": "string"}}
MAX_SHARDS = 1000  # MindSpore's FileWriter limit
MiB = 1 << 20


def read_header(path: Path) -> dict:
    """The JSON header of a MindRecord shard; UserError naming the file if it has none."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            size = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            if not 0 < size < 256 * MiB:
                raise ValueError("no header")
            header = json.loads(fh.read(size))
        if not isinstance(header, dict) or "page" not in header or "schema" not in header:
            raise ValueError("not a MindRecord header")
        return header
    except OSError as exc:
        raise UserError(f"{path} cannot be read ({exc.strerror})") from None
    except (ValueError, UnicodeDecodeError, struct.error):
        raise UserError(f"{path} is not a MindRecord shard (no header; convert the data with "
                        "tools/convert_to_mindrecord.py)") from None


def split_facts(header: dict, path: Path) -> dict:
    """This package's facts about a split (classes, counts) from a shard header's schema description."""
    try:
        facts = json.loads(header["schema"][0]["desc"])
        if facts.get("format") != FORMAT:
            raise ValueError
        return facts
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise UserError(f"{path} is a MindRecord shard but not one of tools/convert_to_mindrecord.py (no class "
                        "names in its header; convert the data with it)") from None


def _shortest_size(header: dict, path: Path) -> int:
    """The bytes a shard holds at least: its header, then each page at page_id x page_size, the last one as used."""
    try:
        end = header["header_size"]
        for page in header["page"]:
            end = max(end, header["header_size"] + page["page_id"] * header["page_size"] + page["page_size"])
        return int(end)
    except (KeyError, TypeError):
        raise UserError(f"{path} has a damaged MindRecord header (no page table; convert again)") from None


def shard_files(split_dir: Path) -> list[Path]:
    """The shard files of one split folder (`*.mindrecord*` but the .db indexes), named by the set's header; other
    files (an OBS copy's _SUCCESS marker, say) are not looked at."""
    candidates = sorted(p for p in split_dir.iterdir() if p.is_file() and ".mindrecord" in p.name
                        and not p.name.endswith(".db") and not p.name.startswith("."))
    if not candidates:
        raise UserError(f"{split_dir} holds no MindRecord shards (convert the data with "
                        "tools/convert_to_mindrecord.py --output_dir <this folder's parent>)")
    header = read_header(candidates[0])
    return [split_dir / name for name in header.get("shard_addresses", [candidates[0].name])]


def check_split(split_dir: Path) -> tuple[dict, list[Path], str]:
    """(facts, shards, fingerprint) of one split's shard set, every shard's header and size checked."""
    shards = shard_files(split_dir)
    digest = hashlib.sha256()
    facts, labels = None, {}
    for shard in shards:
        if not shard.is_file():
            raise UserError(f"{shard} is missing: the shard set of {split_dir} has {len(shards)} files (copy all of "
                            "them, or convert again)")
        index = shard.with_name(shard.name + ".db")
        if not index.is_file():
            raise UserError(f"{index} is missing (MindSpore reads each shard with the .db index written beside it: "
                            "copy both, or convert again)")
        header = read_header(shard)
        facts = facts or split_facts(header, shard)
        stat = shard.stat()
        shortest, size = _shortest_size(header, shard), stat.st_size
        if size < shortest:
            raise UserError(f"{shard} is truncated ({size} bytes, its header says {shortest}): copy it again, or "
                            "convert again")
        stat_db = index.stat()
        digest.update(f"{shard.name}\0{size}\0{stat.st_mtime_ns}\0{stat_db.st_size}\n".encode())
        for label, count in _indexed_labels(index).items():
            labels[label] = labels.get(label, 0) + count
    counts = [labels.pop(i, 0) for i in range(len(facts["classes"]))]
    if labels or counts != list(facts["class_counts"]):
        wrong = f"labels {sorted(labels)[:5]} beyond the {len(facts['classes'])} classes" if labels else \
            f"{sum(counts)} images where the header says {facts['num_images']}"
        raise UserError(f"the shards of {split_dir} index {wrong} (damaged or mixed files: convert again)")
    return facts, shards, digest.hexdigest()


def _indexed_labels(index: Path) -> dict[int, int]:
    """Images per label in a shard's SQLite index (which MindSpore reads the records by)."""
    try:
        with contextlib.closing(sqlite3.connect(index.resolve().as_uri() + "?mode=ro", uri=True)) as db:
            return dict(db.execute("SELECT label_0, COUNT(*) FROM INDEXES GROUP BY label_0").fetchall())
    except sqlite3.Error as exc:
        raise UserError(f"{index} is damaged ({exc}): copy it again with its shard, or convert again") from None


def check_mindrecord(root: Path, num_classes: int, need_train: bool, need_val: bool):
    """The DataSource of a converted data set: DATASET_PATH/train/ and val/ shard sets."""
    from src.data.checks import DataSource, Split

    if not root.is_dir():
        raise UserError(f"dataset_path {root} does not exist (pass the --output_dir of "
                        "tools/convert_to_mindrecord.py, which holds train/ and val/)")
    splits, names, conversion = {}, None, None
    for split, needed in (("train", need_train), ("val", need_val)):
        folder = next((root / name for name in SPLITS[split] if (root / name).is_dir()), None)
        if folder is None:
            if needed:
                how = "or train with --run_eval False" if split == "val" else "convert the train split too"
                raise UserError(f"{root} has no {split}/ folder of MindRecord shards (tools/convert_to_mindrecord.py "
                                f"writes {root}/train and {root}/val; {how})")
            splits[split] = None
            continue
        facts, shards, fingerprint = check_split(folder)
        if names is not None and facts.get("conversion") != conversion:
            raise UserError(f"{folder}'s shards come from another conversion than train/'s (an interrupted or "
                            "train-only conversion? convert both splits again in one run)")
        names, conversion, named = facts["classes"], facts.get("conversion"), facts.get("named", True)
        splits[split] = Split(folder, int(facts["num_images"]), fingerprint=fingerprint,
                              class_counts=tuple(facts["class_counts"]), shards=tuple(shards))
    if len(names) != num_classes:
        raise UserError(f"the MindRecord shards in {root} hold {len(names)} classes but num_classes is {num_classes} "
                        f"(pass --num_classes {len(names)})")
    return DataSource("mindrecord", list(names), splits["train"], splits["val"], named=named)


def shard_layout(sizes: list[int], shard_size: int | None) -> tuple[int, int, int]:
    """(shards, page size, header size) for a split of images of these byte sizes.

    A page must hold the largest image; MindSpore's default (32 MiB pages, a 16 MiB header) costs 48 MiB per shard
    file however few images it holds, so small sets get small pages. Shards: `shard_size` images each, default
    about 1 GiB each."""
    total = sum(sizes)
    shards = math.ceil(len(sizes) / shard_size) if shard_size else math.ceil(total / (1 << 30))
    shards = max(1, min(MAX_SHARDS, shards, len(sizes)))
    page = 1 << max(15, math.ceil(math.log2(max(2 * max(sizes) + 4096, min(32 * MiB, total / shards / 64)))))
    page = min(page, 256 * MiB)
    pages_per_shard = math.ceil(total / shards / page) + 2
    header = 1 << max(16, math.ceil(math.log2(4096 * pages_per_shard + 65536)))
    return shards, page, min(header, 128 * MiB)


def _own_shard_set(folder: Path) -> bool:
    """Whether a folder holds a shard set of this converter only (and may be replaced by a new conversion)."""
    try:
        shards = shard_files(folder)
        split_facts(read_header(shards[0]), shards[0])
    except UserError:
        return False
    own = {p.name for p in shards} | {p.name + ".db" for p in shards}
    return all(p.name in own for p in folder.iterdir())


def refuse_foreign(out_dir: Path) -> None:
    """UserError if out_dir holds a train/ or val/ that is not a shard set of this converter (a conversion would
    replace it)."""
    for split in SPLITS:
        folder = out_dir / split
        if folder.exists() and not (folder.is_dir() and _own_shard_set(folder)):
            raise UserError(f"{folder} exists and is not a shard set of tools/convert_to_mindrecord.py (choose another "
                            "--output_dir: a conversion replaces train/ and val/ there)")


_HIDDEN = re.compile(r"^\.(train|val)\.converting-(\d+)(-old)?$")


def _recover(out_dir: Path) -> None:
    """The hidden folders of conversions whose process is gone (killed: it could not clean up). One killed while it
    swapped the folders (an `-old` folder is left) is rolled back: the earlier conversion is put back whole."""
    by_pid: dict[int, list[Path]] = {}
    for folder in out_dir.iterdir():
        found = _HIDDEN.match(folder.name)
        if found:
            by_pid.setdefault(int(found.group(2)), []).append(folder)
    for pid, folders in by_pid.items():
        try:
            os.kill(pid, 0)
            continue  # still running (another conversion into this folder)
        except ProcessLookupError:
            pass
        except PermissionError:  # another user's running process
            continue
        olds = [f for f in folders if f.name.endswith("-old")]
        if olds:  # every earlier split was moved aside before any new one went in: what is in place is new
            for split in SPLITS:
                shutil.rmtree(out_dir / split, ignore_errors=True)
            for old in olds:
                old.rename(out_dir / _HIDDEN.match(old.name).group(1))
            log.warning("%s: put back the conversion a killed conversion (process %d) was replacing", out_dir, pid)
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)


def write_dataset(out_dir: Path, splits: dict[str, list[tuple[Path, int]]], class_names: list[str],
                  shard_size: int | None, source: str, named: bool = True) -> dict[str, list[Path]]:
    """Write the splits (train, and val unless left out) as shard sets under out_dir/<split>, as one unit: each into
    a hidden folder, then all renamed into place (an earlier val/ goes too when only train is written). An earlier
    conversion's folders stay as they were until the new ones are complete, and come back if the swap fails; one
    that is not such a shard set (images, say) is never replaced: UserError. `named`: the class names are real
    (False: the label numbers of a label list without names)."""
    refuse_foreign(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _recover(out_dir)
    conversion = uuid.uuid4().hex  # both splits carry it: a train of one conversion and a val of another are refused
    temp = {split: out_dir / f".{split}.converting-{os.getpid()}" for split in SPLITS}
    old = {split: out_dir / f".{split}.converting-{os.getpid()}-old" for split in SPLITS}
    try:
        for split, samples in splits.items():
            _write_split(temp[split], split, samples, class_names, shard_size, source, conversion, named)
        moved, installed = [], []
        try:  # the swap: renames only; SIGTERM waits for a safe point (errors.stop_on_signals)
            for split in SPLITS:
                if (out_dir / split).exists():
                    (out_dir / split).rename(old[split])
                    moved.append(split)
            for split in splits:
                temp[split].rename(out_dir / split)
                installed.append(split)
        except BaseException:
            for split in installed:
                (out_dir / split).rename(temp[split])
            for split in moved:
                old[split].rename(out_dir / split)
            raise
    finally:
        for folder in (*temp.values(), *old.values()):
            shutil.rmtree(folder, ignore_errors=True)
    return {split: sorted((out_dir / split).iterdir()) for split in splits}


def _write_split(folder: Path, split: str, samples: list[tuple[Path, int]], class_names: list[str],
                 shard_size: int | None, source: str, conversion: str, named: bool) -> None:
    from mindspore.mindrecord import FileWriter
    from mindspore.mindrecord.common.exceptions import MindRecordException

    from src.errors import stop_if_signalled

    counts = count_per_class((label for _, label in samples), len(class_names))
    sizes = [path.stat().st_size for path, _ in samples]
    shards, page, header = shard_layout(sizes, shard_size)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    writer = FileWriter(str(folder / f"{split}.mindrecord"), shard_num=shards, overwrite=True)
    writer.set_page_size(page)
    writer.set_header_size(header)
    facts = {"format": FORMAT, "version": VERSION, "split": split, "classes": class_names, "class_counts": counts,
             "num_images": len(samples), "source": source, "conversion": conversion, "named": named}
    try:
        writer.add_schema(SCHEMA, json.dumps(facts))
        batch = []
        for path, label in samples:
            batch.append({"image": path.read_bytes(), "label": label, "file": str(path)})
            if len(batch) == 256:
                writer.write_raw_data(batch)
                batch = []
                stop_if_signalled()
        if batch:
            writer.write_raw_data(batch)
        writer.commit()
    except (OSError, RuntimeError, ValueError, MindRecordException) as exc:  # the C++ writer raises RuntimeError
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
        raise UserError(f"cannot write the {split} shards in {folder.parent}: {why} (free some space, or choose "
                        "another --output_dir)") from None
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():  # MindSpore writes them 0600: readable by the umask's rule, as other files
        path.chmod(0o666 & ~umask)
