"""Checkpoint decisions as pure functions over plain data: no I/O, no JAX.

The policy answers three questions, each a small function a test can call directly:

* is a save *due* at this step (``every_n_steps`` / ``every_n_epochs`` / ``every_seconds``)?
* does a metric value earn a place among the best ``keep_best`` checkpoints?
* which of the existing checkpoints are kept (best-K by metric, union latest-N by step)?

The manager feeds it the records of the checkpoints on disk and does what it says.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Literal, Mapping, Sequence

__all__ = ["CheckpointPolicy", "Record", "MetricError", "resolve_mode", "auto_interval"]

Mode = Literal["min", "max", "auto"]

# Substrings of metric names where larger is better. Matched against the name split on
# "_", "-", "/" and ".", so "val_acc" and "top5_accuracy" are max, "val_loss" is min.
_MAX_WORDS = frozenset({
    "acc", "accuracy", "auc", "auroc", "f1", "precision", "recall", "iou", "miou", "map",
    "dice", "r2", "bleu", "rouge", "psnr", "ssim", "reward", "return", "score", "top1",
    "top5", "ndcg", "mrr", "hit", "hits",
})


class MetricError(ValueError):
    """The monitored metric is missing from the metrics given to ``save``."""


def resolve_mode(monitor: str | None, mode: Mode) -> Literal["min", "max"]:
    """``"auto"`` is ``"max"`` for accuracy-like names and ``"min"`` for everything else."""
    if mode in ("min", "max"):
        return mode
    if mode != "auto":
        raise ValueError(f"mode must be 'min', 'max' or 'auto', got {mode!r}.")
    if monitor is None:
        return "min"
    words = monitor.lower().replace("-", "_").replace("/", "_").replace(".", "_").split("_")
    return "max" if any(w in _MAX_WORDS for w in words) else "min"


@dataclasses.dataclass(frozen=True)
class Record:
    """What the policy knows about one checkpoint on disk.

    ``value`` is the monitored metric, or None when it has none, is not finite, or the
    checkpoint failed verification: such a checkpoint can be kept as latest, never as best.
    """

    step: int
    value: float | None = None


@dataclasses.dataclass(frozen=True)
class CheckpointPolicy:
    """Which steps to save and which checkpoints to keep.

    Args:
      monitor: metric name that ranks checkpoints (e.g. ``"val_loss"``); None keeps no best.
      mode: ``"min"``, ``"max"`` or ``"auto"`` (max for accuracy-like names, else min).
      keep_best: how many best checkpoints to keep; defaults to 1 with a monitor, else 0.
      keep_latest: how many most recent checkpoints to keep. With 0, only checkpoints
        that enter the best-K are written at all (no write that would be deleted at once).
      every_n_steps, every_n_epochs, every_seconds: when a save is due (any of them; a
        save at every call when none is set). A call that is neither due nor a new best
        is skipped.
      min_delta: a new value must beat the one it displaces by more than this.
      every: ``"auto"`` lets the manager choose ``every_n_steps`` from measured save cost
        so checkpointing costs at most ``overhead_budget`` of training time (or the
        Young/Daly interval when ``mtbf_hours`` is given). An int is ``every_n_steps``.
      overhead_budget: the fraction of training time ``every="auto"`` may spend saving.
      mtbf_hours: mean time between failures; with ``every="auto"`` selects Young/Daly.
    """

    monitor: str | None = None
    mode: Mode = "auto"
    keep_best: int | None = None
    keep_latest: int = 1
    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    every_seconds: float | None = None
    min_delta: float = 0.0
    every: int | Literal["auto"] | None = None
    overhead_budget: float = 0.01
    mtbf_hours: float | None = None

    def __post_init__(self):
        if self.keep_best is None:
            object.__setattr__(self, "keep_best", 1 if self.monitor else 0)
        if isinstance(self.every, int) and not isinstance(self.every, bool):
            if self.every_n_steps is not None and self.every_n_steps != self.every:
                raise ValueError("every and every_n_steps disagree; give only one of them.")
            object.__setattr__(self, "every_n_steps", self.every)
            object.__setattr__(self, "every", None)
        _validate(self)

    @property
    def resolved_mode(self) -> Literal["min", "max"]:
        return resolve_mode(self.monitor, self.mode)

    # -- metrics -----------------------------------------------------------------------

    def monitored_value(self, metrics: Mapping[str, float] | None) -> float | None:
        """The monitored value in ``metrics`` (None without a monitor or without metrics).

        Raises:
          MetricError: metrics were given but the monitored one is not among them.
        """
        if self.monitor is None or metrics is None:
            return None
        if self.monitor not in metrics:
            raise MetricError(
                f"CheckpointPolicy monitors {self.monitor!r} but save() got metrics "
                f"{sorted(metrics)}. Pass {self.monitor!r} in metrics, or set "
                f"CheckpointPolicy(monitor=...) to one of those names.")
        return float(metrics[self.monitor])

    def stored_value(self, metrics: Mapping[str, float] | None) -> float | None:
        """The monitored value of a stored record: None when absent or not finite."""
        if self.monitor is None or not metrics or metrics.get(self.monitor) is None:
            return None
        value = float(metrics[self.monitor])
        return value if math.isfinite(value) else None

    def is_better(self, value: float, than: float) -> bool:
        """Whether ``value`` beats ``than`` by more than ``min_delta`` in this mode."""
        if self.resolved_mode == "min":
            return value < than - self.min_delta
        return value > than + self.min_delta

    def ranked(self, records: Iterable[Record]) -> list[Record]:
        """Records with a finite value, best first; ties go to the earlier step."""
        finite = [r for r in records if _finite(r.value)]
        sign = 1.0 if self.resolved_mode == "min" else -1.0
        return sorted(finite, key=lambda r: (sign * r.value, r.step))

    def best(self, records: Iterable[Record]) -> Record | None:
        """The best record, or None when no record has a finite value."""
        ranked = self.ranked(records)
        return ranked[0] if ranked else None

    def enters_best(self, value: float | None, records: Sequence[Record]) -> bool:
        """Whether a checkpoint with ``value`` would be among the best ``keep_best``."""
        if not self.keep_best or not _finite(value):
            return False
        ranked = self.ranked(records)
        if len(ranked) < self.keep_best:
            return True
        return self.is_better(value, ranked[self.keep_best - 1].value)

    # -- when to save --------------------------------------------------------------------

    def is_due(self, step: int, *, epoch: int | None = None, last_save_time: float | None = None,
               now: float | None = None) -> bool:
        """Whether the schedule asks for a save at ``step`` (any configured rule fires).

        Args:
          step: the training step about to be saved.
          epoch: completed epochs, needed only by ``every_n_epochs``; a call without it
            (a mid-epoch call) is never due by the epoch rule.
          last_save_time: clock time of the previous save (or of the start of the run).
          now: the current clock time, injected so time rules test without sleeping.
        """
        rules = []
        if self.every_n_steps is not None:
            rules.append(step % self.every_n_steps == 0)
        if self.every_n_epochs is not None:
            rules.append(epoch is not None and epoch % self.every_n_epochs == 0)
        if self.every_seconds is not None:
            if now is None:
                raise ValueError("every_seconds needs the current time (now=...).")
            rules.append(last_save_time is None or now - last_save_time >= self.every_seconds)
        if not rules:  # no schedule: every call is due, unless every="auto" decides
            return self.every != "auto"
        return any(rules)

    def should_save(self, value: float | None, records: Sequence[Record], *, due: bool) -> str | None:
        """Why a step with ``value`` is written (``"due"``/``"best"``), or None to skip it."""
        if due and self.keep_latest > 0:
            return "due"
        if self.enters_best(value, records):
            return "best"
        return None

    # -- what to keep --------------------------------------------------------------------

    def kept(self, records: Sequence[Record]) -> dict[int, list[str]]:
        """Steps to keep, each with its reasons (``"best #1"``, ``"latest"``).

        The kept set is the best ``keep_best`` by value union the ``keep_latest`` newest.
        """
        reasons: dict[int, list[str]] = {}
        for rank, record in enumerate(self.ranked(records)[: self.keep_best], start=1):
            reasons.setdefault(record.step, []).append(f"best #{rank}")
        newest = sorted((r.step for r in records), reverse=True)[: self.keep_latest]
        for step in newest:
            reasons.setdefault(step, []).append("latest")
        return reasons

    def to_json(self) -> dict:
        """The policy as plain JSON data (stored beside the checkpoints for inspection)."""
        return dataclasses.asdict(self)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _validate(p: CheckpointPolicy) -> None:
    resolve_mode(p.monitor, p.mode)
    for name in ("keep_best", "keep_latest"):
        value = getattr(p, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}.")
    if p.keep_best == 0 and p.keep_latest == 0:
        raise ValueError("keep_best=0 and keep_latest=0 would keep nothing; keep at least one.")
    if p.keep_best > 0 and not p.monitor:
        raise ValueError(f"keep_best={p.keep_best} needs a metric to rank by: pass "
                         "monitor='val_loss' (or another metric), or keep_best=0.")
    for name in ("every_n_steps", "every_n_epochs"):
        value = getattr(p, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}.")
    if p.every_seconds is not None and not p.every_seconds > 0:
        raise ValueError(f"every_seconds must be > 0 or None, got {p.every_seconds!r}.")
    if not (isinstance(p.min_delta, (int, float)) and p.min_delta >= 0):
        raise ValueError(f"min_delta must be a number >= 0, got {p.min_delta!r}.")
    if p.every not in (None, "auto"):
        raise ValueError(f"every must be a positive int, 'auto' or None, got {p.every!r}.")
    if not 0 < p.overhead_budget < 1:
        raise ValueError(f"overhead_budget must be in (0, 1), got {p.overhead_budget!r}.")
    if p.mtbf_hours is not None and not p.mtbf_hours > 0:
        raise ValueError(f"mtbf_hours must be > 0 or None, got {p.mtbf_hours!r}.")
    if p.mtbf_hours is not None and p.every != "auto":
        raise ValueError("mtbf_hours only applies with every='auto'.")
    if p.every == "auto" and p.every_n_steps is not None:
        raise ValueError("every='auto' chooses every_n_steps itself; do not give both.")


def auto_interval(save_cost_s: float, step_time_s: float, *, overhead_budget: float = 0.01,
                  mtbf_hours: float | None = None) -> int:
    """Steps between saves so checkpointing stays within budget (or the Young/Daly optimum).

    Args:
      save_cost_s: training time one save costs (blocking time plus the slowdown its
        background write causes), measured by the manager.
      step_time_s: wall time of one training step without saving.
      overhead_budget: fraction of training time saving may take.
      mtbf_hours: mean time between failures; when given, the interval minimising expected
        lost work plus save cost, sqrt(2 * cost * MTBF) (Young 1974, Daly 2006).

    Returns:
      The interval in steps, at least 1.
    """
    if step_time_s <= 0:
        raise ValueError(f"step_time_s must be > 0, got {step_time_s!r}.")
    if save_cost_s < 0:
        raise ValueError(f"save_cost_s must be >= 0, got {save_cost_s!r}.")
    if mtbf_hours is not None:
        seconds = math.sqrt(2.0 * save_cost_s * mtbf_hours * 3600.0)
    else:
        seconds = save_cost_s / overhead_budget
    return max(1, math.ceil(seconds / step_time_s))
