"""``EarlyStopping``: settings and tracker in one immutable value (after Flax's).

Synopsis::

    es = EarlyStopping(monitor="val_loss", patience=3)
    for epoch in range(1, epochs + 1):
        es, improved = es.update(evaluate()["val_loss"], epoch=epoch)
        if es.should_stop:
            break

``update`` returns a new value, so the tracker checkpoints as one JSON value
(:meth:`to_json`) and cannot drift from its settings. Improvement is judged by the same
:class:`~jaxckpt.policy.Objective` as the checkpoint policy's best, so both agree on the best
epoch whenever :meth:`agrees_with` says they do.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import operator
import warnings
from typing import Any, Literal, Mapping

from jaxckpt.policy import CheckpointPolicy, Objective, check_mode

__all__ = ["EarlyStopping"]

_SETTINGS = ("monitor", "patience", "min_delta", "mode", "restore_best_weights", "baseline",
             "start_from_epoch")
_TRACKER = ("best", "best_epoch", "wait", "epoch")
_LEGACY = ("stopped",)  # stored by jaxckpt before the tracker derived it from wait


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
    """Stop when ``monitor`` has not improved for ``patience`` epochs in a row.

    Args:
      monitor: the epoch metric to watch (``"val_loss"``).
      patience: epochs without improvement after which to stop: with ``patience=3`` a run
        whose best is epoch 5 stops at the end of epoch 8 (Keras and Lightning alike).
      min_delta: an improvement must beat the best by more than this.
      mode: ``"min"``, ``"max"`` or ``"auto"`` (read from the name; an unreadable name is
        refused).
      restore_best_weights: ``fit`` ends with the state of the best epoch (from the best
        checkpoint when the checkpoint policy :meth:`agrees_with` this, else from a copy
        kept in host memory).
      baseline: the value the first improvement must beat; epochs that do not beat it count
        toward ``patience`` (Keras ``baseline``).
      start_from_epoch: epochs ignored at the start (warm-up): neither best nor counted.

    The tracker (``best``, ``best_epoch``, ``wait``, ``epoch``) starts empty and is advanced
    only by :meth:`update`.
    """

    monitor: str = "val_loss"
    patience: int = 5
    min_delta: float = 0.0
    mode: Literal["min", "max", "auto"] = "auto"
    restore_best_weights: bool = True
    baseline: float | None = None
    start_from_epoch: int = 0
    best: float | None = None
    best_epoch: int | None = None
    wait: int = 0
    epoch: int = 0

    def __post_init__(self):
        self.objective  # noqa: B018 - resolves the mode: an unreadable name fails here
        for name in ("patience", "start_from_epoch", "wait", "epoch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"EarlyStopping needs {name} to be an int >= 0, got {value!r}.")
        if not (isinstance(self.min_delta, (int, float)) and self.min_delta >= 0):
            raise ValueError(f"EarlyStopping needs min_delta >= 0, got {self.min_delta!r}.")
        if self.baseline is not None and not math.isfinite(self.baseline):
            raise ValueError(f"EarlyStopping baseline must be finite or None, got "
                             f"{self.baseline!r}.")
        check_mode(self.monitor, self.mode, owner="EarlyStopping", stacklevel=4)

    @property
    def objective(self) -> Objective:
        """What counts as an improvement (shared with the checkpoint policy's best)."""
        return Objective(self.monitor, self.mode, self.min_delta, self.baseline)

    @property
    def should_stop(self) -> bool:
        """Whether ``patience`` epochs in a row have passed without improvement."""
        return self.wait > 0 and self.wait >= self.patience

    def update(self, value: float, epoch: int | None = None) -> tuple["EarlyStopping", bool]:
        """Advance the tracker by one epoch's ``value``.

        Args:
          value: the monitored metric of the epoch; NaN or inf never improves.
          epoch: the epoch it belongs to (1-based); default the one after the last update.

        Returns:
          ``(new, improved)``: the advanced tracker, and whether ``value`` is the new best.
        """
        epoch = self.epoch + 1 if epoch is None else operator.index(epoch)
        if epoch <= self.start_from_epoch:
            return self._replace(epoch=epoch), False
        value = float(value)
        if self.objective.improves(value, self.best):
            return self._replace(best=value, best_epoch=epoch, wait=0, epoch=epoch), True
        return self._replace(wait=self.wait + 1, epoch=epoch), False

    def reset(self) -> "EarlyStopping":
        """The same settings with an empty tracker."""
        return self._replace(best=None, best_epoch=None, wait=0, epoch=0)

    def resume(self, stored: "EarlyStopping") -> "EarlyStopping":
        """These settings with ``stored``'s tracker (from a checkpoint), so a resumed run
        stops where the uninterrupted one would.

        A tracker that judged improvement differently (another monitor, mode, min_delta,
        baseline or warm-up) cannot be carried over: it restarts, with a warning.
        """
        if (stored.objective, stored.start_from_epoch) != (self.objective,
                                                           self.start_from_epoch):
            warnings.warn(
                f"the checkpoint's early-stopping tracker judged {stored.monitor!r} "
                f"(mode={stored.objective.mode}, min_delta={stored.min_delta}, baseline="
                f"{stored.baseline}, start_from_epoch={stored.start_from_epoch}); this run's "
                f"EarlyStopping differs, so its tracker starts afresh at epoch {stored.epoch}.",
                UserWarning, stacklevel=2)
            return self.reset()._replace(epoch=stored.epoch)
        return self._replace(**{name: getattr(stored, name) for name in _TRACKER})

    def agrees_with(self, policy: CheckpointPolicy | None) -> bool:
        """Whether ``policy``'s best checkpoint is this tracker's best epoch: it keeps a best
        judged by the same objective, and no warm-up hides epochs from this one."""
        return (policy is not None and policy.keep_best > 0
                and policy.objective == self.objective and self.start_from_epoch == 0)

    # -- stored form -----------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """Settings and tracker as plain JSON data (checkpointed with the loop)."""
        return {name: getattr(self, name) for name in _SETTINGS + _TRACKER}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "EarlyStopping":
        """The value stored by :meth:`to_json`; missing fields take their defaults.

        Raises:
          ValueError: a field this version does not know.
        """
        unknown = sorted(set(data) - set(_SETTINGS + _TRACKER + _LEGACY))
        if unknown:
            raise ValueError(f"stored EarlyStopping has unknown field(s) {unknown}; known: "
                             f"{sorted(_SETTINGS + _TRACKER)}.")
        return cls(**{k: v for k, v in data.items() if k not in _LEGACY})

    def _replace(self, **changes) -> "EarlyStopping":
        # Not dataclasses.replace: the settings were validated (and any mode warning given)
        # once, at construction; a tracker step must not repeat that.
        new = copy.copy(self)
        for name, value in changes.items():
            object.__setattr__(new, name, value)
        return new
