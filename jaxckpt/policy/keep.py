"""What is kept: small rules, each one method from the records on disk to the steps it keeps.

Rules compose as a union (:class:`AnyKeep`, Orbax's ``AnyPreservationPolicy``); a step not
kept by any rule is deleted. Every rule is stable: running it again on what it kept (plus
anything else still on disk) keeps the same steps, so a decision never flips after a
deletion or a reopen.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

from jaxckpt.policy.objective import Objective, Record

__all__ = ["KeepReason", "KeepRule", "LatestN", "BestN", "EveryNSteps", "EveryNSeconds",
           "KeepAll", "ResumePoint", "AnyKeep"]

Kept = dict[int, tuple["KeepReason", ...]]


@dataclasses.dataclass(frozen=True)
class KeepReason:
    """Why a checkpoint is kept.

    Attributes:
      kind: ``"best"``, ``"latest"``, ``"every_n_steps"``, ``"every_n_seconds"`` or ``"all"``.
      rank: 1 for the best (or the newest), 2 for the next, ...; None for kinds that do not
        rank.
    """

    kind: str
    rank: int | None = None

    def __str__(self) -> str:
        """Text for logs and the CLI: ``"best #1"``, ``"latest"`` (the newest),
        ``"latest #2"``, ``"every_n_steps"``."""
        if self.rank is None or (self.kind == "latest" and self.rank == 1):
            return self.kind
        return f"{self.kind} #{self.rank}"


class KeepRule(Protocol):
    def keep(self, records: Sequence[Record]) -> Kept: ...


def _by_step(records: Sequence[Record]) -> list[Record]:
    return sorted(records, key=lambda r: r.step)


@dataclasses.dataclass(frozen=True)
class LatestN:
    """The ``n`` newest checkpoints (Orbax ``LatestN``, Keras/Lightning ``save_last``)."""

    n: int

    def keep(self, records: Sequence[Record]) -> Kept:
        newest = _by_step(records)[::-1][: self.n]
        return {r.step: (KeepReason("latest", rank),) for rank, r in enumerate(newest, 1)}


@dataclasses.dataclass(frozen=True)
class BestN:
    """The ``n`` best by ``objective`` (Orbax ``BestN``, Lightning ``save_top_k``).

    #1 is the improvement chain's head; #2..n are the next by value. A checkpoint without
    metrics, with a non-finite value or one not beating the threshold is never best.
    """

    n: int
    objective: Objective

    def keep(self, records: Sequence[Record]) -> Kept:
        best = self.objective.ranked(records)[: self.n]
        return {r.step: (KeepReason("best", rank),) for rank, r in enumerate(best, 1)}


@dataclasses.dataclass(frozen=True)
class EveryNSteps:
    """Checkpoints whose step is a multiple of ``n`` (Orbax ``keep_period`` /
    ``EveryNSteps``): a thinned record of the whole run."""

    n: int

    def keep(self, records: Sequence[Record]) -> Kept:
        return {r.step: (KeepReason("every_n_steps"),) for r in records if r.step % self.n == 0}


@dataclasses.dataclass(frozen=True)
class EveryNSeconds:
    """One checkpoint per ``seconds`` (Orbax ``keep_time_interval`` / ``EveryNSeconds``):
    the oldest, then each one at least ``seconds`` after the last one kept this way."""

    seconds: float

    def keep(self, records: Sequence[Record]) -> Kept:
        kept: Kept = {}
        last = None
        for r in _by_step(records):
            if r.time is None:
                raise ValueError(f"keep_time_interval needs each checkpoint's save time, but "
                                 f"Record(step={r.step}) has time=None; pass time=.")
            if last is None or r.time - last >= self.seconds:
                kept[r.step], last = (KeepReason("every_n_seconds"),), r.time
        return kept


@dataclasses.dataclass(frozen=True)
class KeepAll:
    """Every checkpoint (Orbax's default, Lightning ``save_top_k=-1``)."""

    def keep(self, records: Sequence[Record]) -> Kept:
        return {r.step: (KeepReason("all"),) for r in records}


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """The newest checkpoint while it has no metrics (a mid-epoch or preemption save).

    Metrics cannot rank it and it is the only place to resume from, so it is kept as
    latest even with ``keep_latest=0``, until a newer checkpoint replaces it.
    """

    def keep(self, records: Sequence[Record]) -> Kept:
        newest = max(records, key=lambda r: r.step, default=None)
        if newest is None or newest.has_metrics:
            return {}
        return {newest.step: (KeepReason("latest", 1),)}


@dataclasses.dataclass(frozen=True)
class AnyKeep:
    """The union of ``rules``; each step's reasons in rule order, without repeats."""

    rules: Sequence[KeepRule] = ()

    def keep(self, records: Sequence[Record]) -> Kept:
        merged: dict[int, list[KeepReason]] = {}
        for rule in self.rules:
            for step, reasons in rule.keep(records).items():
                have = merged.setdefault(step, [])
                have += [r for r in reasons if r not in have]
        return {step: tuple(merged[step]) for step in sorted(merged)}
