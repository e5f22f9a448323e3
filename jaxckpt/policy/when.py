"""When a save is due: small rules, each one method over a :class:`SaveContext`.

A rule answers only "does the schedule ask for a save now?"; whether the checkpoint is
worth writing (would anything keep it?) is :mod:`jaxckpt.policy.keep`'s question.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Protocol, Sequence

__all__ = ["SaveContext", "SaveRule", "StepInterval", "EpochInterval", "TimeInterval",
           "SpecificSteps", "Predicate", "AnySave"]


@dataclasses.dataclass(frozen=True)
class SaveContext:
    """The moment a save is asked for.

    Attributes:
      step: the training step about to be saved.
      epoch: completed epochs, or None for a call inside an epoch.
      now: the current clock time, injected so time rules test without sleeping.
      last_save_time: clock time of the previous save (or of the start of the run).
    """

    step: int
    epoch: int | None = None
    now: float | None = None
    last_save_time: float | None = None


class SaveRule(Protocol):
    def due(self, ctx: SaveContext) -> bool: ...


@dataclasses.dataclass(frozen=True)
class StepInterval:
    """Due at every ``n``-th step (Orbax ``save_interval_steps``, Lightning
    ``every_n_train_steps``)."""

    n: int

    def due(self, ctx: SaveContext) -> bool:
        return ctx.step % self.n == 0


@dataclasses.dataclass(frozen=True)
class EpochInterval:
    """Due at the end of every ``n``-th epoch; never inside an epoch (``epoch=None``)."""

    n: int

    def due(self, ctx: SaveContext) -> bool:
        return ctx.epoch is not None and ctx.epoch % self.n == 0


@dataclasses.dataclass(frozen=True)
class TimeInterval:
    """Due once ``seconds`` have passed since the last save (Lightning
    ``train_time_interval``)."""

    seconds: float

    def due(self, ctx: SaveContext) -> bool:
        if ctx.now is None:
            raise ValueError("every_seconds needs the current time (now=...).")
        return ctx.last_save_time is None or ctx.now - ctx.last_save_time >= self.seconds


@dataclasses.dataclass(frozen=True)
class SpecificSteps:
    """Due at exactly these steps (Orbax ``save_on_steps``)."""

    steps: frozenset[int]

    def due(self, ctx: SaveContext) -> bool:
        return ctx.step in self.steps


@dataclasses.dataclass(frozen=True)
class Predicate:
    """Due when the user's ``fn(step) -> bool`` says so (Orbax ``should_save_fn``)."""

    fn: Callable[[int], bool]

    def due(self, ctx: SaveContext) -> bool:
        return bool(self.fn(ctx.step))


@dataclasses.dataclass(frozen=True)
class AnySave:
    """Due when any of ``rules`` is (Orbax ``AnySavePolicy``); never with no rules."""

    rules: Sequence[SaveRule] = ()

    def due(self, ctx: SaveContext) -> bool:
        return any(rule.due(ctx) for rule in self.rules)
