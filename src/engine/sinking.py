"""Dataset sink mode: how MindSpore's epochs map onto the run's data epochs.

With sinking, `Model.train` counts one "epoch" per sink of `steps_per_sink` steps and calls the step callbacks
once per sink; unsunk, it counts data epochs and calls them every step. `Sinking` translates between the two,
so the callbacks (log lines, evaluation, checkpoints, the LR record) keep working per data epoch either way.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from src.config import Config
from src.errors import UserError

log = logging.getLogger("train")


@dataclass(frozen=True)
class Sinking:
    sink: bool
    steps_per_epoch: int
    steps_per_sink: int  # steps_per_epoch unless sink_size divides it

    @property
    def sinks_per_epoch(self) -> int:
        return self.steps_per_epoch // self.steps_per_sink if self.sink else 1

    @property
    def steps_per_call(self) -> int:
        """Steps between two on_train_step_end calls."""
        return self.steps_per_sink if self.sink else 1

    def data_epoch(self, ms_epoch: int) -> int:
        return (ms_epoch - 1) // self.sinks_per_epoch + 1

    def begins_epoch(self, ms_epoch: int) -> bool:
        return (ms_epoch - 1) % self.sinks_per_epoch == 0

    def ends_epoch(self, ms_epoch: int) -> bool:
        return ms_epoch % self.sinks_per_epoch == 0

    def train_kwargs(self, epoch_size: int, initial_epoch: int) -> dict:
        """Model.train's epoch count, sink settings and initial epoch for `epoch_size` data epochs."""
        if not self.sink:
            return {"epoch": epoch_size, "dataset_sink_mode": False, "initial_epoch": initial_epoch}
        return {"epoch": epoch_size * self.sinks_per_epoch, "dataset_sink_mode": True,
                "sink_size": self.steps_per_sink if self.sinks_per_epoch > 1 else -1,
                "initial_epoch": initial_epoch * self.sinks_per_epoch}


def sink_plan(cfg: Config, steps_per_epoch: int, say: bool = True) -> Sinking:
    """The run's sinking, checked before compile with the other limits on the steps of an epoch (accumulation groups
    stay inside an epoch); on CPU, where MindSpore does not sink, says so once."""
    if cfg.gradient_accumulation_steps > steps_per_epoch:
        raise UserError(f"gradient_accumulation_steps {cfg.gradient_accumulation_steps} is more than the "
                        f"{steps_per_epoch} batches of an epoch, and a group of batches never spans two epochs (use "
                        f"at most {steps_per_epoch}, or a smaller --batch_size)")
    if not cfg.dataset_sink_mode:
        if cfg.sink_size != -1 and say:
            log.warning("sink_size %d is ignored: dataset_sink_mode is False (pass --dataset_sink_mode True to sink)",
                     cfg.sink_size)
        return Sinking(False, steps_per_epoch, steps_per_epoch)
    if cfg.platform == "CPU":
        if say:
            log.info("CPU: MindSpore does not sink data on CPU; dataset_sink_mode is ignored and the batches go "
                     "from the host every step (the log line comes every print_freq steps)")
        return Sinking(False, steps_per_epoch, steps_per_epoch)
    size = steps_per_epoch if cfg.sink_size == -1 else cfg.sink_size
    n = cfg.gradient_accumulation_steps  # a sink inside an epoch ends on an optimizer step

    def fits(d: int) -> bool:
        return d <= steps_per_epoch and steps_per_epoch % d == 0 and (d == steps_per_epoch or d % n == 0)

    if not fits(size):
        sizes = [d for d in range(1, steps_per_epoch + 1) if fits(d)]
        rule = "does not divide" if n == 1 else \
            f"is not a multiple of gradient_accumulation_steps {n} that divides"
        raise UserError(f"sink_size {cfg.sink_size} {rule} the {steps_per_epoch} steps of an epoch (use -1 for one "
                        f"sink per epoch, or one of {', '.join(map(str, sizes[-6:]))})")
    return Sinking(True, steps_per_epoch, size)


def dry_run_line(cfg: Config) -> str:
    """What Model.train gets for sinking, for the launcher's dry run (the steps per epoch come from the data)."""
    if not cfg.dataset_sink_mode:
        return "Model.train(..., dataset_sink_mode=False): batches from the host, a log line every print_freq steps"
    if cfg.platform == "CPU":
        return "Model.train(..., dataset_sink_mode=False): CPU does not sink (dataset_sink_mode is ignored)"
    sinks = "one sink per epoch" if cfg.sink_size == -1 else f"sinks of {cfg.sink_size} steps"
    return (f"Model.train(..., dataset_sink_mode=True, sink_size={cfg.sink_size}): {sinks}, a log line and train "
            "top-1/top-5 per sink")
