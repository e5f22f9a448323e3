"""``History``: the per-epoch record of a ``fit`` run, as a table, CSV and a loss-curve plot."""

from __future__ import annotations

import csv
import dataclasses
import math
from typing import Any

from jaxckpt.policy import resolve_mode

__all__ = ["History"]


@dataclasses.dataclass
class History:
    """Per-epoch metrics (``rows``) and notable events (resume, rollback, early stop).

    ``rows[i]`` is ``{"epoch": i + 1, "loss": ..., "accuracy": ..., "val_loss": ..., ...}``.
    ``monitor`` names the metric that picks the best epoch (``val_loss`` by default).
    """

    rows: list[dict[str, float]] = dataclasses.field(default_factory=list)
    events: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    monitor: str | None = "val_loss"
    mode: str = "auto"

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
        """The epoch with the best finite monitored value (the first one on ties)."""
        if not self.monitor:
            return None
        mode = resolve_mode(self.monitor, self.mode)
        scored = [(r[self.monitor], int(r["epoch"])) for r in self.rows
                  if self.monitor in r and math.isfinite(r[self.monitor])]
        if not scored:
            return None
        sign = 1.0 if mode == "min" else -1.0
        return min(scored, key=lambda t: (sign * t[0], t[1]))[1]

    # -- export --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """``{"epoch": [...], "loss": [...], ...}`` plus ``events`` (JSON-able)."""
        out: dict[str, Any] = {"epoch": self.epochs}
        for name in self.metric_names:
            out[name] = self.metric(name)
        out["events"] = list(self.events)
        return out

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "events": self.events, "monitor": self.monitor,
                "mode": self.mode}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "History":
        return cls(rows=[dict(r) for r in data.get("rows", [])],
                   events=[dict(e) for e in data.get("events", [])],
                   monitor=data.get("monitor"), mode=data.get("mode", "auto"))

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

    def plot(self, path, *, metrics: tuple[str, ...] | None = None, title: str | None = None
             ) -> None:
        """Loss curves (train and validation) with the best epoch marked; saved to ``path``.

        With accuracy-like metrics present, they get a second panel.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = self.metric_names
        loss_names = [n for n in (metrics or names) if "loss" in n]
        other = [n for n in (metrics or names) if n not in loss_names and not n.startswith("_")]
        panels = [p for p in (loss_names, other) if p]
        fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
        best = self.best_epoch
        for ax, group in zip(axes[0], panels):
            for name in group:
                ax.plot(self.epochs, self.metric(name), marker="o", markersize=3, label=name)
            if best is not None:
                ax.axvline(best, color="tab:red", linestyle="--", linewidth=1,
                           label=f"best epoch {best}")
                if self.monitor in group:
                    value = self.rows[self.epochs.index(best)][self.monitor]
                    ax.scatter([best], [value], s=90, color="tab:red", zorder=5)
                    ax.annotate(f"{self.monitor} {value:.4g}", (best, value),
                                textcoords="offset points", xytext=(6, 8), color="tab:red")
            ax.set_xlabel("epoch")
            ax.set_ylabel(" / ".join(group) if len(group) < 3 else "value")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(title or "training history")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
