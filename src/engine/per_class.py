"""Per-class evaluation: per_class.csv (class, images, top-1, top-5, the class it is most taken for),
confusion_matrix.png (the matrix up to 100 classes, else the 30 most confused pairs) and the 5 worst classes."""
from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mindspore.train import Metric

from src.files import write_atomically

log = logging.getLogger("train")
MATRIX_MAX_CLASSES = 100  # above this the picture shows the most confused pairs instead of the matrix
TOP_PAIRS = 30


@dataclass
class PerClass:
    names: list[str]
    matrix: np.ndarray  # [true, predicted] top-1 counts
    top5_hits: np.ndarray  # per true class

    @property
    def images(self) -> np.ndarray:
        return self.matrix.sum(axis=1)

    def rows(self) -> list[dict]:
        rows = []
        for i, name in enumerate(self.names):
            n = int(self.images[i])
            wrong = self.matrix[i].copy()
            wrong[i] = 0
            j = int(wrong.argmax())
            rows.append({"class": name, "images": n, "top1": self.matrix[i, i] / n if n else float("nan"),
                         "top5": self.top5_hits[i] / n if n else float("nan"),
                         "most_confused_with": self.names[j] if wrong[j] else "", "confused_images": int(wrong[j])})
        return rows

    def worst(self, n: int = 5) -> list[dict]:
        return sorted((r for r in self.rows() if r["images"]), key=lambda r: (r["top1"], r["class"]))[:n]

    def pairs(self, n: int = TOP_PAIRS) -> list[tuple[str, str, int]]:
        """The n most frequent (true, predicted) mistakes."""
        wrong = self.matrix.copy()
        np.fill_diagonal(wrong, 0)
        flat = np.argsort(wrong, axis=None)[::-1][:n]
        return [(self.names[t], self.names[p], int(wrong[t, p])) for t, p in zip(*np.unravel_index(flat, wrong.shape))
                if wrong[t, p]]


class ConfusionCounts(Metric):
    """Counts top-1 predictions per (true, predicted) class and top-5 hits per class, for ms.Model evaluation."""

    def __init__(self, names: list[str]):
        super().__init__()
        self.names = list(names)
        self.clear()

    def clear(self) -> None:
        k = len(self.names)
        self.matrix, self.top5 = np.zeros((k, k), np.int64), np.zeros(k, np.int64)

    def update(self, *inputs) -> None:
        logits, labels = (self._convert_data(x) for x in inputs[:2])
        labels = labels.reshape(-1).astype(np.int64)
        np.add.at(self.matrix, (labels, logits.argmax(axis=1)), 1)
        k = min(5, logits.shape[1])
        top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
        np.add.at(self.top5, labels, np.any(top == labels[:, None], axis=1))

    def eval(self) -> PerClass:
        return PerClass(self.names, self.matrix.copy(), self.top5.copy())


def write_per_class(result: PerClass, folder: Path) -> tuple[Path, Path]:
    """per_class.csv and confusion_matrix.png in `folder` (each through a temp file and a rename)."""
    folder.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    writer = csv.DictWriter(text, ["class", "images", "top1", "top5", "most_confused_with", "confused_images"],
                            lineterminator="\n")
    writer.writeheader()
    for row in result.rows():
        writer.writerow({**row, "top1": f"{row['top1']:.4f}", "top5": f"{row['top5']:.4f}"})
    csv_path, png_path = folder / "per_class.csv", folder / "confusion_matrix.png"
    write_atomically(csv_path, lambda tmp: tmp.write_text(text.getvalue(), encoding="utf-8"))
    write_atomically(png_path, lambda tmp: _plot(result, tmp))
    return csv_path, png_path


def _plot(result: PerClass, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(result.names)
    if k <= MATRIX_MAX_CLASSES:
        size = max(6.0, min(24.0, 0.22 * k + 3))
        fig, ax = plt.subplots(figsize=(size, size))
        rates = result.matrix / np.maximum(result.images[:, None], 1)
        image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        ticks = np.arange(k)
        font = max(4, min(10, int(400 / max(k, 1))))
        ax.set_xticks(ticks, result.names, rotation=90, fontsize=font)
        ax.set_yticks(ticks, result.names, fontsize=font)
        if k <= 20:
            for t in range(k):
                for p in range(k):
                    if result.matrix[t, p]:
                        ax.text(p, t, str(result.matrix[t, p]), ha="center", va="center", fontsize=font,
                                color="white" if rates[t, p] > 0.5 else "black")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title("confusion matrix (each row: one true class, normalised)", fontsize=10)
        fig.colorbar(image, ax=ax, fraction=0.046)
    else:
        pairs = result.pairs()
        fig, ax = plt.subplots(figsize=(9, 0.28 * max(len(pairs), 1) + 1.5))
        ax.barh([f"{t} -> {p}" for t, p, _ in pairs][::-1], [c for _, _, c in pairs][::-1], color="tab:red")
        ax.set_xlabel("val images")
        ax.set_title(f"the {len(pairs)} most confused pairs (true -> predicted) of {k} classes")
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    try:
        fig.savefig(path, format="png", dpi=90)
    finally:
        plt.close(fig)


def log_worst(result: PerClass, n: int = 5) -> str:
    """One line naming the n worst classes by top-1."""
    parts = [f"{r['class']} {r['top1']:.4f} ({r['images']} images" + (
        f", {r['confused_images']} taken for {r['most_confused_with']})" if r["confused_images"] else ")")
        for r in result.worst(n)]
    line = f"worst {len(parts)} classes by top-1: " + "; ".join(parts)
    log.info(line)
    return line
