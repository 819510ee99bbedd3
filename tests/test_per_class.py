"""Per-class evaluation: counts, the csv, the picture for few and for many classes, and the worst-classes line."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from src.engine.per_class import ConfusionCounts, log_worst, write_per_class


def _counts(names, labels, logits):
    metric = ConfusionCounts(names)
    metric.update(np.asarray(logits, np.float32), np.asarray(labels, np.int32))
    return metric.eval()


def test_counts_rows_and_the_worst_classes(tmp_path):
    # 3 cats (2 right, 1 taken for a dog), 2 dogs (both taken for birds), 1 bird (right)
    logits = [[3, 1, 0], [3, 0, 1], [0, 3, 1], [0, 1, 3], [1, 0, 3], [0, 1, 3]]
    result = _counts(["cat", "dog", "bird"], [0, 0, 0, 1, 1, 2], logits)
    assert result.matrix.tolist() == [[2, 1, 0], [0, 0, 2], [0, 0, 1]]
    rows = {r["class"]: r for r in result.rows()}
    assert rows["cat"] == {"class": "cat", "images": 3, "top1": pytest.approx(2 / 3), "top5": 1.0,
                           "most_confused_with": "dog", "confused_images": 1}
    assert rows["dog"]["top1"] == 0 and rows["dog"]["most_confused_with"] == "bird"
    assert rows["bird"]["most_confused_with"] == "" and rows["bird"]["confused_images"] == 0
    assert [r["class"] for r in result.worst(2)] == ["dog", "cat"]
    assert result.pairs() == [("dog", "bird", 2), ("cat", "dog", 1)]
    assert log_worst(result, 2) == ("worst 2 classes by top-1: dog 0.0000 (2 images, 2 taken for bird); "
                                    "cat 0.6667 (3 images, 1 taken for dog)")
    csv_path, png_path = write_per_class(result, tmp_path)
    with open(csv_path, newline="") as fh:
        table = list(csv.DictReader(fh))
    assert table[0] == {"class": "cat", "images": "3", "top1": "0.6667", "top5": "1.0000",
                        "most_confused_with": "dog", "confused_images": "1"}
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion_matrix.png", "per_class.csv"]  # no temp files


def test_top5_counts_hits_among_the_five_largest():
    logits = np.tile(np.arange(10, dtype=np.float32), (2, 1))  # class 9 first, 5 the fifth, 4 the sixth
    result = _counts([str(i) for i in range(10)], [5, 4], logits)
    assert result.top5_hits.tolist()[4:6] == [0, 1]


def test_many_classes_draw_the_most_confused_pairs(tmp_path):
    rng = np.random.default_rng(0)
    names = [f"c{i}" for i in range(150)]
    labels = rng.integers(0, 150, 3000)
    logits = rng.standard_normal((3000, 150)).astype(np.float32)
    result = _counts(names, labels, logits)
    assert result.matrix.sum() == 3000 and len(result.pairs()) == 30
    counts = [c for _, _, c in result.pairs()]
    assert counts == sorted(counts, reverse=True)
    _, png = write_per_class(result, tmp_path)
    assert png.stat().st_size > 1000
