"""``CheckpointPolicy``: the one-line convenience that builds the common rule combination."""

from __future__ import annotations

import dataclasses
import datetime
import math
import operator
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

from jaxckpt.policy import keep as keep_rules
from jaxckpt.policy import when
from jaxckpt.policy.keep import KeepReason
from jaxckpt.policy.names import Mode, check_mode, resolve_mode
from jaxckpt.policy.objective import Objective, Record

__all__ = ["CheckpointPolicy", "MetricError", "auto_interval"]


class MetricError(ValueError):
    """The monitored metric is missing from the metrics given to ``save``."""


@dataclasses.dataclass(frozen=True)
class CheckpointPolicy:
    """When to save and which checkpoints to keep.

    Synopsis::

        CheckpointPolicy(monitor="val_loss")                 # best by val_loss + the latest
        CheckpointPolicy(monitor="val_acc", keep_best=3, keep_latest=0)
        CheckpointPolicy(every_n_steps=1000, keep_latest=2, keep_every_n_steps=10_000)
        CheckpointPolicy(keep_all=True)                      # Orbax's default

    Args:
      monitor: metric name that ranks checkpoints (e.g. ``"val_loss"``); None keeps no best.
      mode: ``"min"``, ``"max"`` or ``"auto"``: read from the name (loss/error words are
        min, recognised scores max); a name it cannot read is refused, never guessed.
      keep_best: how many best checkpoints to keep; defaults to 1 with a monitor, else 0.
      keep_latest: how many most recent checkpoints to keep. With 0, only checkpoints some
        rule keeps are written at all (no write that would be deleted at once).
      every_n_steps, every_n_epochs, every_seconds: when a save is due (any of them; every
        call is due when no schedule is set). A call that is neither due nor a new best is
        skipped.
      min_delta: a value improves on the best only by beating it by more than this; the best
        is the first value, then each later one that improves (the improvement chain).
      every: ``"auto"`` lets the manager choose ``every_n_steps`` from measured save cost
        so checkpointing costs at most ``overhead_budget`` of training time (or the
        Young/Daly interval when ``mtbf_hours`` is given). An int is ``every_n_steps``.
      overhead_budget: the fraction of training time ``every="auto"`` may spend saving.
      mtbf_hours: mean time between failures; with ``every="auto"`` selects Young/Daly.
      keep_all: keep every checkpoint written (Orbax's default, Lightning
        ``save_top_k=-1``). The only spelling of "keep everything".
      keep_every_n_steps: also keep each checkpoint whose step is a multiple of this
        (Orbax ``keep_period``); a multiple of ``every_n_steps``.
      keep_time_interval: also keep one checkpoint per this many seconds (or a
        ``datetime.timedelta``; Orbax ``keep_time_interval``).
      initial_value_threshold: a value must beat this (by more than ``min_delta``) to be
        best at all (Keras ``initial_value_threshold``).
      save_on_steps: also due at exactly these steps (Orbax ``save_on_steps``).
      save_predicate: also due where ``save_predicate(step)`` is true. Not serialisable:
        :meth:`to_json` stores ``None``, so pass the policy again when reopening.
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
    _: dataclasses.KW_ONLY
    keep_all: bool = False
    keep_every_n_steps: int | None = None
    keep_time_interval: float | datetime.timedelta | None = None
    initial_value_threshold: float | None = None
    save_on_steps: Sequence[int] | None = None
    save_predicate: Callable[[int], bool] | None = None

    def __post_init__(self):
        if self.keep_best is None:
            object.__setattr__(self, "keep_best", 1 if self.monitor else 0)
        if isinstance(self.every, int) and not isinstance(self.every, bool):
            if self.every_n_steps is not None and self.every_n_steps != self.every:
                raise ValueError("every and every_n_steps disagree; give only one of them.")
            object.__setattr__(self, "every_n_steps", self.every)
            object.__setattr__(self, "every", None)
        if isinstance(self.keep_time_interval, datetime.timedelta):
            object.__setattr__(self, "keep_time_interval",
                               self.keep_time_interval.total_seconds())
        if self.save_on_steps is not None:
            object.__setattr__(self, "save_on_steps", _steps(self.save_on_steps))
        _validate(self)
        check_mode(self.monitor, self.mode, owner="CheckpointPolicy", stacklevel=4)

    # -- the rules it builds -------------------------------------------------------------

    @property
    def resolved_mode(self) -> Literal["min", "max"]:
        return resolve_mode(self.monitor, self.mode)

    @property
    def objective(self) -> Objective | None:
        """What "better" means for the monitored metric (None without a monitor)."""
        if self.monitor is None:
            return None
        return Objective(self.monitor, self.mode, self.min_delta, self.initial_value_threshold)

    @property
    def save_rule(self) -> when.AnySave:
        """The schedule as composable rules (``every="auto"`` is the manager's, not here)."""
        rules: list[Any] = []
        if self.every_n_steps is not None:
            rules.append(when.StepInterval(self.every_n_steps))
        if self.every_n_epochs is not None:
            rules.append(when.EpochInterval(self.every_n_epochs))
        if self.every_seconds is not None:
            rules.append(when.TimeInterval(self.every_seconds))
        if self.save_on_steps is not None:
            rules.append(when.SpecificSteps(frozenset(self.save_on_steps)))
        if self.save_predicate is not None:
            rules.append(when.Predicate(self.save_predicate))
        return when.AnySave(tuple(rules))

    @property
    def keep_rule(self) -> keep_rules.AnyKeep:
        """Retention as composable rules, best first (the order of each step's reasons)."""
        rules: list[Any] = []
        if self.keep_best:
            rules.append(keep_rules.BestN(self.keep_best, self.objective))
        if self.keep_latest:
            rules.append(keep_rules.LatestN(self.keep_latest))
        rules.append(keep_rules.ResumePoint())
        if self.keep_every_n_steps is not None:
            rules.append(keep_rules.EveryNSteps(self.keep_every_n_steps))
        if self.keep_time_interval is not None:
            rules.append(keep_rules.EveryNSeconds(self.keep_time_interval))
        if self.keep_all:
            rules.append(keep_rules.KeepAll())
        return keep_rules.AnyKeep(tuple(rules))

    # -- metrics -------------------------------------------------------------------------

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
        return self._objective().beats(value, than)

    def improves(self, value: float | None, records: Iterable[Record]) -> bool:
        """Whether ``value`` beats the current best of ``records``: store it as
        ``Record.improved`` of the checkpoint saved with it."""
        objective = self.objective
        if objective is None:
            return False
        head = objective.head(records)
        return objective.improves(value, head.value if head else None)

    def ranked(self, records: Iterable[Record]) -> list[Record]:
        """Records that can be best, best first: the improvement chain's head, then the
        rest by value (ties to the earlier step)."""
        return self.objective.ranked(records) if self.objective else []

    def best(self, records: Iterable[Record]) -> Record | None:
        """The best record (the improvement chain's head), or None when none can be best."""
        return self.objective.head(records) if self.objective else None

    # -- when to save --------------------------------------------------------------------

    @property
    def reads_clock(self) -> bool:
        """Whether a decision depends on the time of a call (``every_seconds``,
        ``keep_time_interval``) or on measured times (``every="auto"``): processes of one
        job, each with its own clock, must then take one process's answer."""
        return (self.every_seconds is not None or self.keep_time_interval is not None
                or self.every == "auto")

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
        rule = self.save_rule
        if not rule.rules:  # no schedule: every call is due, unless every="auto" decides
            return self.every != "auto"
        return rule.due(when.SaveContext(step, epoch, now, last_save_time))

    def should_save(self, value: float | None, records: Sequence[Record], *, due: bool,
                    step: int | None = None, time: float | None = None,
                    has_metrics: bool = True) -> KeepReason | None:
        """Why a checkpoint with ``value`` is worth writing now, or None to skip it.

        It is written when it would be kept: by any rule when the save is ``due``, and as
        one of the best even when it is not (a new best is never skipped).

        Args:
          value: its monitored value (None or non-finite: cannot be best).
          records: the checkpoints on disk.
          due: whether the schedule asks for a save (:meth:`is_due`, or a forced save).
          step, time, has_metrics: the new checkpoint's step (default: after the newest
            record), save time and whether it has metrics, as in :class:`Record`.

        Returns:
          The first reason it would be kept (best before latest), or None.
        """
        records = list(records)
        if step is None:
            step = 1 + max((r.step for r in records), default=-1)
        value = value if value is not None and math.isfinite(value) and has_metrics else None
        new = Record(step, value, time, has_metrics, self.improves(value, records))
        reasons = self.kept(records + [new]).get(step, ())
        if not due:
            reasons = tuple(r for r in reasons if r.kind == "best")
        return reasons[0] if reasons else None

    # -- what to keep --------------------------------------------------------------------

    def kept(self, records: Sequence[Record]) -> dict[int, tuple[KeepReason, ...]]:
        """Steps to keep, by step, each with its reasons, best first
        (``(KeepReason("best", 1), KeepReason("latest", 1))``); the rest are deleted."""
        return self.keep_rule.keep(list(records))

    # -- stored form ---------------------------------------------------------------------

    def to_json(self) -> dict:
        """The policy as plain JSON data (stored beside the checkpoints).

        ``mode`` is stored resolved, so a reopened directory ranks the same way whatever
        later versions read from names. ``save_predicate`` is stored as None: code is
        never stored, so pass the policy again to keep the predicate.
        """
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.monitor is not None:
            data["mode"] = self.resolved_mode
        if self.save_on_steps is not None:
            data["save_on_steps"] = list(self.save_on_steps)
        data["save_predicate"] = None
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "CheckpointPolicy":
        """The policy stored by :meth:`to_json`; missing fields take their defaults.

        Raises:
          ValueError: a field this version does not know (written by a newer jaxckpt or
            edited by hand), or a stored predicate.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"a stored CheckpointPolicy is a JSON object, got "
                            f"{type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"stored CheckpointPolicy has unknown field(s) {unknown} (written by a newer "
                f"jaxckpt, or edited by hand); known fields: {sorted(known)}. Remove them, or "
                "pass policy=CheckpointPolicy(...) explicitly.")
        if data.get("save_predicate") is not None:
            raise ValueError("a stored CheckpointPolicy cannot hold save_predicate (code is "
                             "never stored); store null and pass the policy again.")
        return cls(**data)

    def _objective(self) -> Objective:
        if self.objective is None:
            raise ValueError("this CheckpointPolicy monitors no metric; pass monitor=... to "
                             "compare values.")
        return self.objective


def _steps(steps: Any) -> tuple[int, ...]:
    if isinstance(steps, (str, bytes)) or not isinstance(steps, Iterable):
        raise ValueError(f"save_on_steps must be a list of steps, got {steps!r}.")
    try:
        out = tuple(sorted({operator.index(s) for s in steps}))
    except TypeError:
        raise ValueError(f"save_on_steps must hold int steps, got {list(steps)!r}.") from None
    if not out or out[0] < 0:
        raise ValueError(f"save_on_steps must be a non-empty list of steps >= 0, got {out!r}; "
                         "use None for no explicit steps.")
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 \
        and math.isfinite(value)


def _validate(p: CheckpointPolicy) -> None:
    resolve_mode(p.monitor, p.mode)
    if p.mode != "auto" and p.monitor is None:
        raise ValueError(f"mode={p.mode!r} has no effect without a monitor: pass "
                         "monitor='val_loss' (or another metric), or drop mode.")
    if p.keep_latest is None:
        raise ValueError("keep_latest=None: to keep every checkpoint (Orbax max_to_keep=None) "
                         "pass keep_all=True.")
    if p.keep_best == -1:
        raise ValueError("keep_best=-1 (Lightning save_top_k=-1) is spelled keep_all=True here.")
    for name in ("keep_best", "keep_latest"):
        value = getattr(p, name)
        if not _is_int(value) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}.")
    if not isinstance(p.keep_all, bool):
        raise ValueError(f"keep_all must be True or False, got {p.keep_all!r}.")
    for name in ("every_n_steps", "every_n_epochs", "keep_every_n_steps"):
        value = getattr(p, name)
        if value is not None and (not _is_int(value) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}.")
    for name in ("every_seconds", "keep_time_interval"):
        value = getattr(p, name)
        if value is not None and not _positive_number(value):
            raise ValueError(f"{name} must be > 0 seconds or None, got {value!r}.")
    keeps_something = (p.keep_best or p.keep_latest or p.keep_all or p.keep_every_n_steps
                       or p.keep_time_interval)
    if not keeps_something:
        raise ValueError("keep_best=0 and keep_latest=0 would keep nothing; keep at least one "
                         "(or set keep_all, keep_every_n_steps or keep_time_interval).")
    if p.keep_all and (p.keep_every_n_steps or p.keep_time_interval):
        raise ValueError("keep_all=True already keeps every checkpoint; drop "
                         "keep_every_n_steps / keep_time_interval, or drop keep_all.")
    if p.keep_best > 0 and not p.monitor:
        raise ValueError(f"keep_best={p.keep_best} needs a metric to rank by: pass "
                         "monitor='val_loss' (or another metric), or keep_best=0.")
    if not (isinstance(p.min_delta, (int, float)) and not isinstance(p.min_delta, bool)
            and p.min_delta >= 0 and math.isfinite(p.min_delta)):
        raise ValueError(f"min_delta must be a number >= 0, got {p.min_delta!r}.")
    if p.min_delta and not p.monitor:
        raise ValueError(f"min_delta={p.min_delta} needs a metric: pass monitor=..., or drop "
                         "min_delta.")
    if p.initial_value_threshold is not None:
        if not p.monitor:
            raise ValueError("initial_value_threshold needs a metric: pass monitor=..., or "
                             "drop it.")
        if not (isinstance(p.initial_value_threshold, (int, float))
                and math.isfinite(p.initial_value_threshold)):
            raise ValueError("initial_value_threshold must be a finite number, got "
                             f"{p.initial_value_threshold!r}.")
    if p.save_predicate is not None and not callable(p.save_predicate):
        raise ValueError(f"save_predicate must be a function step -> bool, got "
                         f"{p.save_predicate!r}.")
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
    if p.keep_every_n_steps and p.every_n_steps and p.keep_every_n_steps % p.every_n_steps:
        raise ValueError(
            f"keep_every_n_steps={p.keep_every_n_steps} is not a multiple of every_n_steps="
            f"{p.every_n_steps}: only steps that are multiples of both would be kept. Pass a "
            f"multiple, e.g. keep_every_n_steps={p.every_n_steps * max(1, round(p.keep_every_n_steps / p.every_n_steps))}.")


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
