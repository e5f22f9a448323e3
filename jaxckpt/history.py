"""``History``: the per-epoch record of a ``fit`` run, as a table, CSV and a loss-curve plot."""

from __future__ import annotations

import csv
import dataclasses
import math
from typing import Any, Sequence

from jaxckpt.policy import Objective, metric_mode

__all__ = ["History"]

_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def json_number(value: Any) -> Any:
    """``value`` with NaN and infinities as the strings ``"nan"``, ``"inf"``, ``"-inf"``:
    strict JSON (what checkpoints store) has no numbers for them, and a diverged epoch's
    metrics must still be saved and resumed."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def number_from_json(value: Any) -> Any:
    """The inverse of :func:`json_number`."""
    return _NONFINITE.get(value, value) if isinstance(value, str) else value


@dataclasses.dataclass
class History:
    """Per-epoch metrics (``rows``) and notable events (resume, rollback, early stop).

    ``rows[i]`` is ``{"epoch": i + 1, "loss": ..., "accuracy": ..., "val_loss": ..., ...}``.
    ``monitor`` names the metric that picks the best epoch (``val_loss`` by default);
    ``mode``, ``min_delta`` and ``threshold`` judge it as the checkpoint policy (or early
    stopping) of the run does, so the table's best epoch is the best checkpoint's.
    """

    rows: list[dict[str, float]] = dataclasses.field(default_factory=list)
    events: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    monitor: str | None = "val_loss"
    mode: str = "auto"
    directory: str | None = None  # the run's checkpoint directory, for plot titles
    min_delta: float = 0.0
    threshold: float | None = None

    # -- access --------------------------------------------------------------------------

    @property
    def epochs(self) -> list[int]:
        return [int(r["epoch"]) for r in self.rows]

    def metric(self, name: str) -> list[float]:
        """One metric over the epochs (NaN where an epoch lacks it)."""
        return [float(r.get(name, math.nan)) for r in self.rows]

    @property
    def metric_names(self) -> list[str]:
        names: list[str] = []
        for row in self.rows:
            names += [k for k in row if k not in ("epoch", "time") and k not in names]
        return names

    @property
    def best_epoch(self) -> int | None:
        """The head of the improvement chain: the last epoch that beat the best before it
        by more than ``min_delta`` (and ``threshold``, if set), as a checkpoint policy's
        best; NaN is never best. None when the mode is ``"auto"`` and the name says no
        direction (never guessed)."""
        if not self.monitor:
            return None
        mode = self.mode if self.mode in ("min", "max") else metric_mode(self.monitor)
        if mode is None:
            return None
        objective = Objective(self.monitor, mode, self.min_delta, self.threshold)
        best: tuple[float, int] | None = None
        for row in self.rows:
            value = row.get(self.monitor)
            if value is not None and objective.improves(float(value),
                                                        best[0] if best else None):
                best = (float(value), int(row["epoch"]))
        return best[1] if best else None

    # -- export --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """``{"epoch": [...], "loss": [...], ...}`` plus ``events`` (JSON-able)."""
        out: dict[str, Any] = {"epoch": self.epochs}
        for name in self.metric_names:
            out[name] = self.metric(name)
        out["events"] = list(self.events)
        return out

    def to_json(self) -> dict[str, Any]:
        """Strict JSON (non-finite metrics as strings, see :func:`json_number`)."""
        return {"rows": [{k: json_number(v) for k, v in r.items()} for r in self.rows],
                "events": self.events, "monitor": self.monitor, "mode": self.mode,
                "directory": self.directory, "min_delta": self.min_delta,
                "threshold": self.threshold}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "History":
        return cls(rows=[{k: number_from_json(v) for k, v in r.items()}
                         for r in data.get("rows", [])],
                   events=[dict(e) for e in data.get("events", [])],
                   monitor=data.get("monitor"), mode=data.get("mode", "auto"),
                   directory=data.get("directory"), min_delta=data.get("min_delta", 0.0),
                   threshold=data.get("threshold"))

    def to_csv(self, path) -> None:
        """One row per epoch, one column per metric."""
        names = ["epoch"] + self.metric_names
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=names, extrasaction="ignore")
            writer.writeheader()
            for row in self.rows:
                writer.writerow(row)

    def table(self) -> str:
        """A fixed-width table like the tutorial's, the best epoch marked with ``*``."""
        names = self.metric_names
        header = "epoch  " + "  ".join(f"{n:>12}" for n in names)
        lines = [header, "-" * len(header)]
        best = self.best_epoch
        for row in self.rows:
            cells = "  ".join(f"{row.get(n, math.nan):>12.4f}" for n in names)
            mark = " *" if row["epoch"] == best else ""
            lines.append(f"{int(row['epoch']):>5}  {cells}{mark}")
        if best is not None:
            lines.append(f"* best {self.monitor}: epoch {best}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def plot(self, path, *, metrics: str | Sequence[str] | None = None,
             title: str | None = None, log_scale: bool = False) -> None:
        """Loss curves (train and validation) over epochs, the best epoch marked and labelled;
        accuracy-like metrics in a second panel. Saved to ``path`` (.png, .svg, .pdf).

        Args:
          metrics: the metric, or metrics, to draw (default: all).
          title: default ``training history: <checkpoint directory>``.
          log_scale: loss axes on a log scale (for losses that fall by decades).
        """
        from jaxckpt.plotting import plot_history

        if isinstance(metrics, str):  # one name, not its letters
            metrics = (metrics,)
        plot_history(self, path, metrics=metrics, title=title, log_scale=log_scale)
