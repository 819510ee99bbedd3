"""The per-epoch record of a run, which epoch is best, and the files it is kept in (metrics.csv, curves.png)."""
from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path

from src.files import write_atomically

METRICS_COLUMNS = ("epoch", "step", "lr", "loss", "val_top1", "val_top5", "epoch_time_s")


@dataclass
class EpochRecord:
    epoch: int
    step: int
    lr: float
    loss: float
    val_top1: float | None = None
    val_top5: float | None = None
    epoch_time_s: float = 0.0


class History:
    """Every epoch's record, in order; the one place that says which epoch is best (highest val top-1, earliest
    on ties)."""

    def __init__(self, records: list[EpochRecord] | None = None):
        self.records = list(records or [])

    def add(self, record: EpochRecord) -> None:
        self.records.append(record)

    @property
    def best(self) -> EpochRecord | None:
        best = None
        for r in self.records:
            if r.val_top1 is not None and (best is None or r.val_top1 > best.val_top1):
                best = r
        return best


def write_metrics(records: list[EpochRecord], path: Path) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=METRICS_COLUMNS)
            writer.writeheader()
            for r in records:
                row = asdict(r)
                writer.writerow({k: ("" if row[k] is None else (f"{row[k]:.6g}" if isinstance(row[k], float)
                                                                else row[k])) for k in METRICS_COLUMNS})

    write_atomically(path, write)


def read_metrics(path: Path, up_to_epoch: int) -> list[EpochRecord]:
    """Records of an earlier run (for resume), keeping epochs <= up_to_epoch."""
    if not path.is_file():
        return []
    out = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            if int(row["epoch"]) > up_to_epoch:
                continue
            num = {k: (float(v) if v not in ("", None) else None) for k, v in row.items() if k in METRICS_COLUMNS}
            out.append(EpochRecord(epoch=int(num["epoch"]), step=int(num["step"]), lr=num["lr"], loss=num["loss"],
                                   val_top1=num["val_top1"], val_top5=num["val_top5"],
                                   epoch_time_s=num["epoch_time_s"] or 0.0))
    return out


def plot_curves(records: list[EpochRecord], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r.epoch for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, [r.loss for r in records], marker="o")
    axes[0].set_title("train loss")
    axes[1].plot(epochs, [r.lr for r in records], marker="o", color="tab:orange")
    axes[1].set_title("learning rate (end of epoch)")
    val = [(r.epoch, r.val_top1) for r in records if r.val_top1 is not None]
    if val:
        axes[2].plot(*zip(*val), marker="o", color="tab:green")
    axes[2].set_title("val top-1")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    finally:
        plt.close(fig)
