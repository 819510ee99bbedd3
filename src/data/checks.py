"""Data set checks: the ImageFolder (also the built-in demo) and CIFAR-10 binary layouts, and every image file.

Everything a user can get wrong about the data is checked here, before any graph is compiled:
missing folders, empty classes, a class count that differs from num_classes, and files that claim
to be images but are not (these fail, naming the file: a silently skipped image would change the
data set without anyone noticing). Files without an image extension are ignored with a warning.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from src.config import Config
from src.data.image_check import check_images
from src.data.label_files import (
    IMAGE_EXTENSIONS,
    LabelFile,
    count_per_class,
    find_label_file,
    image_key,
    read_class_names,
    read_csv,
    read_list,
)
from src.errors import UserError, not_a_file

log = logging.getLogger("train")

_MAGIC = {".jpg": (b"\xff\xd8\xff",), ".jpeg": (b"\xff\xd8\xff",), ".png": (b"\x89PNG\r\n\x1a\n",),
          ".bmp": (b"BM",)}
VAL_FOLDERS = ("val", "validation_preprocess")
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_RECORD = 1 + 32 * 32 * 3
CIFAR_FILE_RECORDS = 10_000  # MindSpore's Cifar10Dataset reads only files of exactly this many records
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR_TEST_FILES = ("test_batch.bin",)


@dataclass
class Split:
    """One checked split: where it is, its size and (for image folders) the extensions present."""

    path: Path  # the split's folder; a label list's or CSV's file
    num_images: int
    extensions: set[str] = field(default_factory=set)
    fingerprint: str = ""  # hash of every file's name, size and mtime: changes when the data changes
    cifar_files: tuple[tuple[Path, int], ...] = ()  # CIFAR-format binary files and their record counts
    samples: tuple[tuple[Path, int], ...] = ()  # a label file's (image, label) pairs, in its order
    class_counts: tuple[int, ...] = ()  # images per class, where known without reading the data
    shards: tuple[Path, ...] = ()  # MindRecord shard files

    @property
    def standard_cifar(self) -> bool:
        """Every binary file holds the 10,000 records MindSpore's own CIFAR-10 reader insists on."""
        return all(n == CIFAR_FILE_RECORDS for _, n in self.cifar_files)


@dataclass
class DataSource:
    """The checked layout of a data set: class names and the train and val splits."""

    kind: str
    class_names: list[str]
    train: Split | None
    val: Split | None
    named: bool = True  # False: class_names are the label numbers (a label list without a class_names file)


def image_problem(path: Path) -> str | None:
    """Why this file cannot be a whole image of the type its extension claims, or None.

    Checks the signature and the end marker (JPEG EOI, PNG IEND, BMP declared size): a truncated
    download crashes MindSpore 2.10's decoder with SIGFPE instead of raising, so it must be caught here.
    """
    suffix = path.suffix.lower()
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - 1024))
            tail = fh.read()
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if not head:
        return "is empty"
    if not head.startswith(_MAGIC[suffix]):
        return f"is not a {suffix.lstrip('.').upper()} image"
    if suffix in (".jpg", ".jpeg") and b"\xff\xd9" not in tail:
        return "is truncated (no JPEG end-of-image marker)"
    if suffix == ".png" and b"IEND" not in tail:
        return "is truncated (no PNG IEND chunk)"
    if suffix == ".bmp" and (len(head) < 6 or size < int.from_bytes(head[2:6], "little")):
        return "is truncated (shorter than its BMP header says)"
    return None


def _scan_split(split_dir: Path, class_names: list[str] | None, decode: bool = True) -> tuple[list[str], Split]:
    """Class folders and images of a split, every file checked (`decode`: also decoded; eval skips train's)."""
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"{split_dir} has no class folders (put each class's images in "
                        f"{split_dir}/<class_name>/)")
    if class_names is not None:
        extra = sorted(set(classes) - set(class_names))
        if extra:
            raise UserError(f"{split_dir} has class folders that train/ lacks: {', '.join(extra[:5])} "
                            "(train and val need the same class folder names)")
    images, ignored, exts, by_class, dangling = [], 0, set(), {}, []
    digest = hashlib.sha256()
    for name in classes:
        count = 0
        by_class[name] = []
        for entry in sorted(os.scandir(split_dir / name), key=lambda e: e.name):
            suffix = os.path.splitext(entry.name)[1]
            try:
                is_file = entry.is_file()
                leads_nowhere = entry.is_symlink() and not is_file and not entry.is_dir()
            except OSError:  # a loop of links
                is_file, leads_nowhere = False, True
            if leads_nowhere and suffix.lower() in IMAGE_EXTENSIONS:
                dangling.append((Path(entry.path), not_a_file(Path(entry.path)) or "is not a regular file"))
            if not is_file:
                continue
            # hidden files are checked too: MindSpore's reader takes every file with an image extension,
            # macOS's ._name.jpg metadata files included
            if suffix.lower() in IMAGE_EXTENSIONS:
                images.append(Path(entry.path))
                by_class[name].append(images[-1])
                exts.add(suffix)
                count += 1
                stat = entry.stat()
                digest.update(f"{name}/{entry.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            elif not entry.name.startswith("."):
                ignored += 1
        if count == 0 and class_names is None:
            raise UserError(f"class folder {split_dir / name} has no images (add .jpg/.jpeg/.png/.bmp files "
                            "or remove the folder)")
    _check_image_files(split_dir, by_class, decode, dangling)
    if ignored:
        log.warning("%s: ignored %d files without an image extension (%s)", split_dir, ignored,
                    "/".join(IMAGE_EXTENSIONS))
    counts = tuple(len(by_class.get(name, ())) for name in class_names or classes)  # in label order
    return classes, Split(split_dir, len(images), exts, digest.hexdigest(), class_counts=counts)


def _check_image_files(where: Path, by_folder: dict[str, list[Path]], decode: bool,
                       dangling: list[tuple[Path, str]] = (), identity: str = "") -> None:
    """Every file's signature and end marker, then (with `decode`) every image decoded (folders unchanged since an
    earlier check are skipped); UserError naming the first damaged file, the others listed on stdout."""
    problems = list(dangling)
    if not problems:
        checked = check_images(where, by_folder, image_problem, decode, identity)
        problems = checked.errors
        if checked.warnings:
            path, why = checked.warnings[0]
            log.warning("%s: %d images are slightly damaged but decode, and train as decoded (e.g. %s: %s)",
                        identity or where, len(checked.warnings), path, why)
    if problems:
        path, why = problems[0]
        more = ""
        if len(problems) > 1:
            for other, reason in problems[:1000]:  # the error line names one: every one is listed (on stdout)
                log.warning("damaged image: %s %s", other, reason)
            more = f" and {len(problems) - 1} more (listed above{', the first 1000' if len(problems) > 1000 else ''})"
        if path.name.startswith("._"):
            raise UserError(f"{path} {why}{more} (a macOS metadata file: delete them with "
                            f"find {where} -name '._*' -delete)")
        raise UserError(f"{path} {why}{more} (delete or re-encode the file)")


def _check_root(root: Path, what: str) -> None:
    if root.exists() and not root.is_dir():
        raise UserError(f"dataset_path {root} is a file, not a folder (pass the folder that holds {what} "
                        "with --dataset_path)")


def check_imagefolder(root: Path, num_classes: int, need_train: bool, need_val: bool) -> DataSource:
    _check_root(root, "train/ and val/")
    if not root.is_dir():
        raise UserError(f"dataset_path {root} does not exist (pass the folder that holds train/ and val/ "
                        "with --dataset_path)")
    train_dir = root / "train"
    val_dir = next((root / v for v in VAL_FOLDERS if (root / v).is_dir()), None)
    if not train_dir.is_dir():
        if need_train or val_dir is None:
            raise UserError(f"{root} has no train/ folder (ImageFolder layout: {root}/train/<class>/*.jpg "
                            f"and {root}/val/<class>/*.jpg)")
    if need_val and val_dir is None:
        raise UserError(f"{root} has no val/ (or validation_preprocess/) folder (add one, or train with "
                        "--run_eval False)")
    class_names, train = (None, None)
    if train_dir.is_dir():
        class_names, train = _scan_split(train_dir, None, decode=need_train)
    val = None
    if val_dir is not None and (need_val or class_names is None):
        val_classes, val = _scan_split(val_dir, class_names, decode=need_val)
        class_names = class_names or val_classes
        if need_val and val.num_images == 0:
            raise UserError(f"{val_dir} has no images in its class folders (add validation images, or train with "
                            "--run_eval False)")
    if len(class_names) != num_classes:
        raise UserError(f"found {len(class_names)} class folders in {train_dir if train else val_dir} but "
                        f"num_classes is {num_classes} (pass --num_classes {len(class_names)})")
    return DataSource("imagefolder", class_names, train, val)


def _cifar_dir(root: Path, files: tuple[str, ...], sub: str) -> Path | None:
    for cand in (root, root / "cifar-10-batches-bin", root / sub):
        if all((cand / f).is_file() for f in files):
            return cand
    return None


def _cifar_records(path: Path, size: int, num_classes: int) -> int:
    """The number of 3,073-byte records (label byte + 32x32x3 pixels) in a CIFAR-format binary file, checked."""
    records, rest = divmod(size, CIFAR_RECORD)
    if rest or not records:
        raise UserError(f"{path} has {size} bytes, which is not a whole number of {CIFAR_RECORD}-byte CIFAR "
                        f"records (1 label byte + 32x32x3 pixels; CIFAR-10 files hold {CIFAR_FILE_RECORDS} records, "
                        f"{CIFAR_FILE_RECORDS * CIFAR_RECORD} bytes: download the file again)")
    if records != CIFAR_FILE_RECORDS:  # a CIFAR-format set of one's own: its labels must fit num_classes
        import numpy as np

        labels = np.fromfile(path, dtype=np.uint8).reshape(records, CIFAR_RECORD)[:, 0]
        bad = np.flatnonzero(labels >= num_classes)
        if bad.size:
            raise UserError(f"{path}: record {bad[0]} has label {labels[bad[0]]}, but there are {num_classes} "
                            "classes (labels are 0..9 in a CIFAR-10-format file)")
    return records


def check_cifar10(root: Path, num_classes: int, need_train: bool, need_val: bool) -> DataSource:
    _check_root(root, "the CIFAR-10 binary files")
    if not root.is_dir():
        raise UserError(f"dataset_path {root} does not exist (pass the folder with the CIFAR-10 binary "
                        "files data_batch_1..5.bin and test_batch.bin)")
    if num_classes != 10:
        raise UserError(f"CIFAR-10 has 10 classes but num_classes is {num_classes} (pass --num_classes 10)")
    splits = []
    for files, sub, needed in ((CIFAR_TRAIN_FILES, "train", need_train), (CIFAR_TEST_FILES, "test", need_val)):
        folder = _cifar_dir(root, files, sub)
        if folder is None:
            if needed:
                raise UserError(f"{root} lacks the CIFAR-10 binary files {', '.join(files)} (looked in "
                                f"{root}, {root}/cifar-10-batches-bin and {root}/{sub}; download the "
                                "'CIFAR-10 binary version')")
            splits.append(None)
            continue
        digest = hashlib.sha256()
        counted = []
        for f in files:
            stat = (folder / f).stat()
            digest.update(f"{f}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            counted.append((folder / f, _cifar_records(folder / f, stat.st_size, num_classes)))
        split = Split(folder, sum(n for _, n in counted), fingerprint=digest.hexdigest(), cifar_files=tuple(counted))
        if not split.standard_cifar:
            log.info("CIFAR-format %s set: %d images (%s)", "train" if sub == "train" else "test", split.num_images,
                     ", ".join(f"{p.name} {n}" for p, n in counted))
        splits.append(split)
    return DataSource("cifar10", list(CIFAR_CLASSES), splits[0], splits[1])


def _label_file_split(root: Path, label_file: LabelFile, num_classes: int) -> Split:
    """A split of a label list or CSV: its images checked and decoded as a class folder's are, grouped by their
    folders (a split that is not needed is never built: a CSV read for its class names has no images looked at)."""
    by_folder: dict[str, list[Path]] = {}
    digest = hashlib.sha256(label_file.path.read_bytes())
    for path, _ in label_file.samples:
        by_folder.setdefault(os.path.relpath(path.parent, root), []).append(path)
    _check_image_files(root, by_folder, True, identity=str(label_file.path.resolve()))
    for path, _ in label_file.samples:  # after the check: a file it found missing is named there
        stat = path.stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return Split(label_file.path, len(label_file.samples), {p.suffix for p, _ in label_file.samples},
                 digest.hexdigest(), samples=label_file.samples,
                 class_counts=count_per_class((label for _, label in label_file.samples), num_classes))


def _check_label_files(cfg: Config, root: Path, need_train: bool, need_val: bool,
                       known_names: list[str] | None = None) -> DataSource:
    """A label-list (PaddleClas) or CSV data set: the label files, their images, the class names and count
    (`known_names`: a checkpoint's, which name the classes when no class_names file does and no training runs)."""
    if not root.is_dir():
        raise UserError(f"dataset_path {root} does not exist (pass the folder the {cfg.dataset} files' image "
                        "paths start from with --dataset_path)")
    kind = cfg.dataset
    names = read_class_names(find_label_file(root, cfg.class_names, "class_names", "class_names")) \
        if cfg.class_names else None
    if names is not None and len(names) != cfg.num_classes:
        raise UserError(f"the class_names file lists {len(names)} classes but num_classes is {cfg.num_classes} "
                        f"(pass --num_classes {len(names)})")
    from_file = "the class_names file" if names is not None else None
    if kind == "csv" and names is not None and known_names and names != list(known_names):
        raise UserError(f"the class_names file's classes ({', '.join(names[:5])}, ...) are not the checkpoint's "
                        f"({', '.join(known_names[:5])}, ...) in its order: the checkpoint's number the CSV's labels "
                        "(drop --class_names)")
    if names is None and not need_train and known_names and len(known_names) == cfg.num_classes:
        names, from_file = list(known_names), "the checkpoint"
    train_integers = None  # the train CSV's kind of labels, which val's must have (without class names)
    splits: dict[str, Split | None] = {}
    for split, needed in (("train", need_train), ("val", need_val)):
        key = f"{split}_{'list' if kind == 'list' else 'csv'}"
        given = getattr(cfg, key)
        splits[split] = None
        if not needed and not (split == "train" and names is None and kind == "csv"):
            continue  # (a CSV's train labels name the classes when no class_names file does)
        try:
            path = find_label_file(root, given, key, f"{split} {kind}")
        except UserError:
            if needed:
                raise
            continue
        if kind == "list":
            label_file = read_list(path, root, cfg.num_classes)
        else:
            label_file = read_csv(path, cfg.csv_image_column, cfg.csv_label_column, cfg.num_classes, names,
                                  from_file=from_file, integers=train_integers, check_files=needed)
            if split == "train" and not from_file:
                train_integers = label_file.names is None
            if names is None and label_file.names is not None:
                names = label_file.names
                if len(names) != cfg.num_classes:
                    raise UserError(f"{path} has {len(names)} classes ({', '.join(names[:5])}"
                                    f"{', ...' if len(names) > 5 else ''}) but num_classes is {cfg.num_classes} "
                                    f"(pass --num_classes {len(names)})")
        if needed:
            splits[split] = _label_file_split(root, label_file, cfg.num_classes)
    train = splits["train"]
    if train is not None and splits["val"] is not None:
        shared = {image_key(p) for p, _ in train.samples} & {image_key(p) for p, _ in splits["val"].samples}
        if shared:
            log.warning("%d val images are also train images (e.g. %s): val accuracy will read high (list "
                        "each image in one split)", len(shared), min(shared))
    if train is not None and need_train:
        empty = [i for i, n in enumerate(train.class_counts) if n == 0]
        if empty:
            shown = ", ".join(str(names[i]) if names else str(i) for i in empty[:10])
            log.warning("%s: %d of %d classes have no train images (%s%s)", train.path, len(empty),
                        cfg.num_classes, shown, ", ..." if len(empty) > 10 else "")
    return DataSource(kind, names or [str(i) for i in range(cfg.num_classes)], train, splits["val"],
                      named=names is not None)


def train_class_counts(source: DataSource) -> tuple[int, ...]:
    """Train images per class (CIFAR-10: the label bytes are read)."""
    split = source.train
    if split.class_counts:
        return split.class_counts
    import numpy as np

    labels = np.concatenate([np.fromfile(path, dtype=np.uint8).reshape(n, CIFAR_RECORD)[:, 0]
                             for path, n in split.cifar_files])
    return count_per_class(labels.tolist(), len(source.class_names))


def check_dataset(cfg: Config, need_train: bool = True, need_val: bool = True,
                  known_names: list[str] | None = None) -> DataSource:
    """Check the dataset layout against the config; raises UserError with the fix. `known_names`: the classes of
    the checkpoint being evaluated, for a label list or CSV without a class_names file."""
    if not cfg.dataset_path:
        what = {"cifar10": "CIFAR-10 binary files", "imagefolder": "train/ and val/ folders",
                "mindrecord": "train/ and val/ MindRecord shards"}.get(cfg.dataset, f"{cfg.dataset} files and images")
        raise UserError(f"dataset_path is not set (pass --dataset_path, the folder with your {what})")
    root = cfg.resolved_dataset_path()
    if cfg.dataset in ("list", "csv"):
        _check_root(root, f"the {cfg.dataset} files and images")
        return _check_label_files(cfg, root, need_train, need_val, known_names)
    if cfg.dataset == "mindrecord":
        from src.data.mindrecord import check_mindrecord

        return check_mindrecord(root, cfg.num_classes, need_train, need_val)
    check = check_cifar10 if cfg.dataset == "cifar10" else check_imagefolder
    return check(root, cfg.num_classes, need_train, need_val)
