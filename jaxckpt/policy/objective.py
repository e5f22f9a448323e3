"""What "better" means for the monitored metric, and what the policy knows of a checkpoint.

The best checkpoint is the head of the *improvement chain*: the first eligible value, then
each later value that beats the current head by more than ``min_delta`` (Keras's and
Lightning's early-stopping rule). It is a fact of the sequence of values, so it cannot
depend on which other checkpoints happen to be kept. Because deleting an old chain member
can hide that history, each :class:`Record` carries ``improved``, decided when it was saved.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable

from jaxckpt.policy.names import Mode, resolve_mode

__all__ = ["Record", "Objective"]


@dataclasses.dataclass(frozen=True)
class Record:
    """What the policy knows about one checkpoint on disk.

    Attributes:
      step: the checkpoint's step.
      value: the monitored metric; None when the save had no metrics, the value was not
        finite, or the checkpoint failed verification: such a checkpoint is never best.
      time: clock time of the save (needed only by ``keep_time_interval``).
      has_metrics: False for a save without metrics (mid-epoch, preemption): it is kept
        while it is the newest checkpoint, as the point to resume from.
      improved: whether ``value`` beat the best before it when it was saved
        (:meth:`CheckpointPolicy.improves`); None when unknown, then it is recomputed from
        the records in step order.
    """

    step: int
    value: float | None = None
    time: float | None = None
    has_metrics: bool = True
    improved: bool | None = None

    def __post_init__(self):
        if not self.has_metrics and self.value is not None:
            raise ValueError(f"Record(step={self.step}) has has_metrics=False but value="
                             f"{self.value!r}; a checkpoint without metrics has no value.")


@dataclasses.dataclass(frozen=True)
class Objective:
    """How values of the monitored metric compare.

    Args:
      monitor: the metric's name.
      mode: ``"min"``, ``"max"`` or ``"auto"`` (resolved from the name at construction).
      min_delta: a value improves on the best only by beating it by more than this.
      threshold: the bar the first best must beat (by more than ``min_delta``); a value
        that does not beat it is never best (Keras's ``initial_value_threshold`` and
        ``baseline``).
    """

    monitor: str
    mode: Mode = "auto"
    min_delta: float = 0.0
    threshold: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "mode", resolve_mode(self.monitor, self.mode))
        object.__setattr__(self, "min_delta", float(self.min_delta))
        if self.threshold is not None:
            object.__setattr__(self, "threshold", float(self.threshold))

    def beats(self, value: float, than: float) -> bool:
        """Whether ``value`` is better than ``than`` by more than ``min_delta``."""
        if self.mode == "min":
            return value < than - self.min_delta
        return value > than + self.min_delta

    def eligible(self, value: float | None) -> bool:
        """Whether ``value`` can be a best at all: finite and beating the threshold."""
        if value is None or not math.isfinite(value):
            return False
        return self.threshold is None or self.beats(value, self.threshold)

    def improves(self, value: float | None, best: float | None) -> bool:
        """Whether ``value`` extends the chain whose head is ``best`` (None: no head yet)."""
        return self.eligible(value) and (best is None or self.beats(value, best))

    def head(self, records: Iterable[Record]) -> Record | None:
        """The best record: the head of the improvement chain, or None without one.

        A record marked ``improved=True`` is a chain member, ``False`` is not (it joins
        only when no earlier member survives, as the best of what is left); ``None`` is
        decided here against the head before it.
        """
        head = None
        for record in sorted(records, key=lambda r: r.step):
            if not record.has_metrics or not self.eligible(record.value):
                continue
            if record.improved is True or (
                    (record.improved is None or head is None)
                    and self.improves(record.value, head.value if head else None)):
                head = record
        return head

    def ranked(self, records: Iterable[Record]) -> list[Record]:
        """Eligible records, best first: the chain's head, then the rest by value (ties to
        the earlier step)."""
        records = list(records)
        head = self.head(records)
        if head is None:
            return []
        sign = 1.0 if self.mode == "min" else -1.0
        rest = sorted((r for r in records if r is not head and r.has_metrics
                       and self.eligible(r.value)), key=lambda r: (sign * r.value, r.step))
        return [head] + rest
