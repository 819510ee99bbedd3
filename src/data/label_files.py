"""Label files: PaddleClas label lists, CSV label tables and class-name files, read into checked samples.

A label list (PaddleClas's `train_list.txt`) has one `relative/path.jpg label` line per image, the path relative
to dataset_path; the label is the last field, so a path may hold spaces (PaddleClas splits on its delimiter and
would take the first word only). A CSV (Kaggle's and Hugging Face imagefolder's `metadata.csv`) has a header and
one row per image, the path relative to the CSV's own folder, the label a class name or an integer. Every mistake
is a UserError naming the file and line: a missing image, a label out of range, an image listed twice.
"""
from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

from src.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
_ID_NAME = re.compile(r"^(\d+)\s+(\S.*)$")


@dataclass(frozen=True)
class LabelFile:
    """The checked samples of one label file: (image path, label) in the file's order."""

    path: Path
    samples: tuple[tuple[Path, int], ...]
    names: list[str] | None  # the class names a CSV's labels gave (sorted), None for integer labels


def count_per_class(labels, num_classes: int) -> tuple[int, ...]:
    """Images per class from a split's labels."""
    counts = [0] * num_classes
    for label in labels:
        counts[label] += 1
    return tuple(counts)


def find_label_file(root: Path, given: str, key: str, what: str) -> Path:
    """A label file: `given` relative to dataset_path, else as given (from the current folder), else UserError."""
    for candidate in (root / given, Path(os.path.expanduser(given))):
        if candidate.is_file():
            return candidate
    raise UserError(f"{what} file {root / given} does not exist (pass --{key} with the file's name in "
                    f"{root}, or its path)")


def read_class_names(path: Path) -> list[str]:
    """Class names in label order: one per line, or PaddleClas's class_id_map_file lines `id name` (ids 0, 1, ...)."""
    lines = [line.strip() for line in _text(path).splitlines() if line.strip()]
    if not lines:
        raise UserError(f"class_names file {path} is empty (write one class name per line, in label order)")
    numbered = [_ID_NAME.match(line) for line in lines]
    if all(numbered):  # PaddleClas's class_id_map_file
        ids = [int(m.group(1)) for m in numbered]
        wrong = next((i for i, value in enumerate(ids) if value != i), None)
        if wrong is not None:
            raise UserError(f"{path} line {wrong + 1}: the lines are 'id name' but this id is {ids[wrong]}, not "
                            f"{wrong} (ids count from 0 in label order; or write one name per line)")
        lines = [m.group(2).strip() for m in numbered]
    seen: dict[str, int] = {}
    for number, name in enumerate(lines, 1):
        if name in seen:
            raise UserError(f"{path} line {number}: class name {name!r} repeats line {seen[name]} (each class "
                            "once, in label order)")
        seen[name] = number
    return lines


def read_list(path: Path, image_root: Path, num_classes: int) -> LabelFile:
    """A PaddleClas label list: `path label` lines, paths relative to `image_root`, integer labels below
    num_classes."""
    rows = []
    for number, line in enumerate(_text(path).splitlines(), 1):
        if not line.strip():
            continue
        fields = line.strip().rsplit(None, 1)
        if len(fields) != 2:
            raise UserError(f"{path} line {number}: {line.strip()[:80]!r} is not 'relative/path.jpg label' (one "
                            "image and its integer label per line)")
        rows.append((number, fields[0].strip(), fields[1]))
    return LabelFile(path, _samples(path, rows, image_root, num_classes, "line"), None)


def read_csv(path: Path, image_column: str, label_column: str, num_classes: int, class_names: list[str] | None,
             from_file: str | None = None, integers: bool | None = None, check_files: bool = True) -> LabelFile:
    """A CSV label table: a header naming the image and label columns, image paths relative to the CSV's folder;
    labels as class names (mapped through `class_names`, else the sorted names found) or integers, one kind per
    file. `from_file`: where `class_names` come from (a class_names file, a checkpoint; None: the train CSV);
    `integers`: the kind the train CSV had, which a val CSV without class_names must have too; `check_files` False:
    only the labels are wanted (the images are not looked at)."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        try:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            missing = [c for c in (image_column, label_column) if c not in header]
            if missing:
                raise UserError(f"{path}: the header {','.join(header)[:120]!r} has no column "
                                f"{' or '.join(map(repr, missing))} (name the columns with --csv_image_column and "
                                "--csv_label_column)")
            rows = [(reader.line_num, (row[image_column] or "").strip(), (row[label_column] or "").strip())
                    for row in reader if any((v or "").strip() for v in row.values() if isinstance(v, str))]
        except csv.Error as exc:
            raise UserError(f"{path}: not a readable CSV file ({exc})") from None
        except UnicodeDecodeError as exc:
            raise UserError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}; save it as UTF-8)") from None
    for number, _, label in rows:
        if not label:
            raise UserError(f"{path} row {number}: the label is empty (every row needs its image's label)")
    kinds = [_is_integer(label) for _, _, label in rows]
    if rows and any(kinds) and not all(kinds):
        odd = next(i for i, kind in enumerate(kinds) if kind != (sum(kinds) * 2 > len(kinds)))
        kind, others = ("an integer", "names") if kinds[odd] else ("a name", "integers")
        raise UserError(f"{path} row {rows[odd][0]}: label {rows[odd][2]!r} is {kind}, but most labels are {others} "
                        "(one kind per file: class names, or integers from 0)")
    by_name = bool(rows) and not kinds[0]
    if integers is not None and not from_file and by_name == integers:
        raise UserError(f"{path} row {rows[0][0]}: label {rows[0][2]!r} is {'a name' if by_name else 'an integer'} "
                        f"but the train labels are {'integers' if integers else 'names'} (use one kind in both, or "
                        "give --class_names to map names to numbers)")
    names = None
    if class_names is None and by_name:
        names = sorted({label for _, _, label in rows})  # as ImageFolder sorts its class folders
    index = {name: i for i, name in enumerate(class_names or names or [])}
    if by_name:
        for number, _, label in rows:
            if label not in index:
                where = f"{from_file} lists them" if from_file else "the train labels' classes"
                raise UserError(f"{path} row {number}: label {label!r} is not one of the {len(index)} classes "
                                f"({_shown(list(index))}; {where})")
        rows = [(number, image, str(index[label])) for number, image, label in rows]
    return LabelFile(path, _samples(path, rows, path.parent, len(names) if names else num_classes, "row",
                                    check_files), names)


def _samples(path: Path, rows: list[tuple[int, str, str]], image_root: Path, num_classes: int, unit: str,
             check_files: bool = True) -> tuple[tuple[Path, int], ...]:
    if not rows:
        raise UserError(f"{path} lists no images (one {'line' if unit == 'line' else 'row'} per image)")
    samples, seen, missing = [], {}, []
    for number, image, label in rows:
        if not image:
            raise UserError(f"{path} {unit} {number}: the image path is empty")
        if not _is_integer(label):
            raise UserError(f"{path} {unit} {number}: label {label!r} is not an integer from 0 (one label per image; "
                            "multi-label lists are not supported)")
        value = int(label)
        if not 0 <= value < num_classes:
            raise UserError(f"{path} {unit} {number}: label {value} is out of range for {num_classes} classes "
                            f"(labels are 0..{num_classes - 1}; pass --num_classes to match the data)")
        file = image_root / image
        if os.path.splitext(image)[1].lower() not in IMAGE_EXTENSIONS:
            raise UserError(f"{path} {unit} {number}: {image} is not a {'/'.join(IMAGE_EXTENSIONS)} file (list "
                            "image files only)")
        key = image_key(file)
        if key in seen:
            raise UserError(f"{path} {unit} {number}: {image} is listed again (first at {unit} {seen[key]}; each "
                            "image once)")
        seen[key] = number
        if check_files and not file.is_file():
            missing.append((number, image))
        samples.append((file, value))
    if missing:
        number, image = missing[0]
        more = f" and {len(missing) - 1} more listed images are missing" if len(missing) > 1 else ""
        raise UserError(f"{path} {unit} {number}: {image_root / image} does not exist{more} (paths are relative "
                        f"to {image_root})")
    return tuple(samples)


def image_key(path: Path) -> str:
    """One string per image file however it is written: ./a.jpg, a//a.jpg, x/../a.jpg and the absolute path."""
    return os.path.normpath(os.path.abspath(path))


def _is_integer(text: str) -> bool:
    digits = text[1:] if text.startswith("+") else text
    return digits.isascii() and digits.isdigit()  # not '²' or Arabic-Indic digits, which int() reads or refuses


def _shown(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f", ... {len(names)} in all" if len(names) > 5 else "")


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}; save it as UTF-8)") from None
    except OSError as exc:
        raise UserError(f"{path} cannot be read ({exc.strerror})") from None
