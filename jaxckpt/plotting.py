"""Every plot jaxckpt draws: a run's history (``History.plot``) and a checkpoint directory's
metrics (``jaxckpt plot``).

Both use epochs on the x axis, with integer ticks (the checkpoint plot adds the steps on a
second axis when it can map one to the other); the best value is labelled inside the axes;
the run's directory is in the title; ``log_scale`` puts loss axes on a log scale.

Figures are ``matplotlib.figure.Figure`` objects saved directly: pyplot is never imported
and ``matplotlib.use`` never called, so the caller's backend (a notebook's, say) is left
as it was. matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

__all__ = ["history_figure", "plot_history", "checkpoints_figure", "plot_checkpoints",
           "counterpart"]

_PALETTE = ["tab:blue", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive"]


def counterpart(metric: str | None) -> str | None:
    """``val_loss`` <-> ``loss``: the train/validation twin of a metric name."""
    if not metric:
        return None
    return metric[4:] if metric.startswith("val_") else f"val_{metric}"


# -- a run's history ---------------------------------------------------------------------------


def history_figure(history, *, metrics: Sequence[str] | None = None, log_scale: bool = False,
                   title: str | None = None):
    """Per-epoch curves of a :class:`~jaxckpt.History`: losses in one panel, other metrics
    in a second, the best epoch marked and labelled. Returns the Figure."""
    from matplotlib.figure import Figure

    names = [n for n in (metrics or history.metric_names) if not n.startswith("_")]
    unknown = [n for n in names if n not in history.metric_names]
    if unknown:
        raise ValueError(f"no metric {unknown} in the history; it has {history.metric_names}.")
    losses = [n for n in names if "loss" in n]
    panels = [p for p in (losses, [n for n in names if n not in losses]) if p]
    if not panels:
        raise ValueError("the history has no epochs with metrics to plot.")
    fig = Figure(figsize=(6.5 * len(panels), 4.4), dpi=110, layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    epochs, best = history.epochs, history.best_epoch
    mode = _mode(history.monitor, history.mode)
    for ax, group in zip(axes, panels):
        for i, name in enumerate(group):
            ax.plot(epochs, history.metric(name), marker="o", markersize=3,
                    color=_PALETTE[i % len(_PALETTE)], label=name)
        if best is not None:
            ax.axvline(best, color="tab:green", linestyle="--", linewidth=1,
                       label=f"best epoch ({best})")
            if history.monitor in group:
                value = history.rows[epochs.index(best)][history.monitor]
                ax.plot([best], [value], marker="*", markersize=15, color="gold",
                        markeredgecolor="black", linestyle="none", zorder=5)
                _note(ax, f"best {history.monitor}: {value:.4g}\nat epoch {best}", mode)
        _epoch_axis(ax)
        _y_axis(ax, group, log_scale)
        ax.legend(loc="best", fontsize=9, framealpha=0.9)
    fig.suptitle(title or _run_title("training history", history.directory), fontsize=11)
    return fig


def plot_history(history, path: str | os.PathLike, **kwargs: Any) -> None:
    """Save :func:`history_figure` to ``path`` (.png, .svg, .pdf)."""
    history_figure(history, **kwargs).savefig(os.fspath(path))


# -- a checkpoint directory ---------------------------------------------------------------


def checkpoints_figure(entries: Sequence[Mapping[str, Any]], names: Sequence[str], *,
                       monitor: str | None, mode: str | None, best: int | None,
                       latest: int | None, title: str, corrupt: Sequence[int] = (),
                       log_scale: bool = False):
    """Curves of ``names`` over every recorded step of a checkpoint directory.

    ``entries`` are ``CheckpointManager.entries()``. Kept checkpoints are filled circles,
    deleted ones hollow, corrupt ones (set aside) red crosses; the best gets a star, and
    the best and latest a vertical line and a label inside the axes. A metric and its
    train/validation twin share a panel. The x axis is epochs when every entry with
    metrics has one and steps map to epochs evenly (a Trainer's run); otherwise steps.
    """
    from matplotlib.figure import Figure

    panels: list[list[str]] = []
    for name in names:
        twin = next((p for p in panels if counterpart(name) in p), None)
        (twin.append(name) if twin is not None else panels.append([name]))
    spe = _steps_per_epoch(entries)
    x_of = (lambda step: step / spe) if spe else (lambda step: step)
    fig = Figure(figsize=(9, 2.4 + 2.8 * len(panels)), dpi=110, layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    xs = [x_of(e["step"]) for e in entries]
    for ax, panel in zip(axes, panels):
        notes = []
        for i, name in enumerate(panel):
            color = _PALETTE[i % len(_PALETTE)]
            primary = name == monitor or (monitor not in panel and i == 0)
            # Only entries that carry the metric: mid-epoch saves have none, and a NaN
            # between two epochs would cut the curve into dots.
            pts = [(x, _value(e, name)) for x, e in zip(xs, entries)
                   if not math.isnan(_value(e, name))]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color,
                    linewidth=2 if primary else 1.4, alpha=1 if primary else 0.8,
                    label=name + (f" (monitored, {mode})" if name == monitor else ""))
            if not primary:
                continue
            _checkpoint_markers(ax, entries, name, color, corrupt, x_of)
            for label, step in (("best", best), ("latest", latest)):
                if step is None or (label == "best" and name != monitor) or \
                        (label == "latest" and latest == best and name == monitor):
                    continue
                y = _value(next((e for e in entries if e["step"] == step), {}), name)
                if label == "best" and not math.isnan(y):
                    ax.plot([x_of(best)], [y], marker="*", markersize=17, color="gold",
                            markeredgecolor="black", zorder=6, linestyle="none")
                if not math.isnan(y):
                    notes.append(f"{label}: {_where(step, spe)}, {name} {y:.4g}")
        for step, color in ((best, "tab:green"), (latest, "tab:gray")):
            if step is not None:
                ax.axvline(x_of(step), color=color, linestyle="--", linewidth=1, zorder=1)
        if notes:
            _note(ax, "\n".join(notes), mode)
        _y_axis(ax, panel, log_scale)
        handles, _ = ax.get_legend_handles_labels()
        if ax is axes[0]:  # the checkpoint key once, in the top panel
            handles += _checkpoint_key(entries, corrupt, best, latest)
        ax.legend(handles=handles, loc="best", fontsize=9, framealpha=0.9)
    if spe:
        _epoch_axis(axes[-1])
        top = axes[0].secondary_xaxis("top", functions=(lambda e: e * spe, lambda s: s / spe))
        top.set_xlabel(f"step ({spe:g} per epoch)")
    else:
        axes[-1].set_xlabel("step")
    n_kept = sum(e["kept"] for e in entries)
    fig.suptitle(f"{_run_title('checkpoints', title)}\n{len(entries)} recorded steps, "
                 f"{n_kept} checkpoint{'s' * (n_kept != 1)} kept", fontsize=11)
    return fig


def plot_checkpoints(entries, names, output: str | os.PathLike, **kwargs: Any) -> None:
    """Save :func:`checkpoints_figure` to ``output`` (.png, .svg, .pdf)."""
    checkpoints_figure(entries, names, **kwargs).savefig(os.fspath(output))


# -- shared pieces ------------------------------------------------------------------------


def _mode(monitor: str | None, mode: str | None) -> str:
    from jaxckpt.policy import resolve_mode

    return resolve_mode(monitor, mode or "auto") if monitor else "min"


def _run_title(what: str, directory: str | None) -> str:
    return f"{what}: {directory}" if directory else what


def _epoch_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)


def _y_axis(ax, names: Sequence[str], log_scale: bool) -> None:
    ax.set_ylabel(" / ".join(names) if len(names) < 3 else "value")
    ax.grid(alpha=0.3)
    if log_scale and any("loss" in n for n in names):
        ax.set_yscale("log")


def _note(ax, text: str, mode: str | None) -> None:
    """A label in a corner of the axes (never outside them): a minimised curve falls to the
    lower right, so the upper right is free; a maximised one leaves the lower right."""
    top = mode != "max"
    ax.text(0.98, 0.97 if top else 0.03, text, transform=ax.transAxes, ha="right",
            va="top" if top else "bottom", fontsize=9, zorder=7,
            bbox={"boxstyle": "round,pad=0.3", "fc": "white", "ec": "0.6", "alpha": 0.9})


def _steps_per_epoch(entries: Sequence[Mapping[str, Any]]) -> float | None:
    """Steps per epoch when every entry with metrics has an epoch and all agree."""
    measured = [e for e in entries if e.get("metrics")]
    if not measured or any(not e.get("epoch") for e in measured):
        return None
    ratios = {e["step"] / e["epoch"] for e in measured}
    return ratios.pop() if len(ratios) == 1 else None


def _where(step: int, spe: float | None) -> str:
    if spe and float(step / spe).is_integer():
        return f"epoch {int(step / spe)} (step {step})"
    return f"step {step}"


def _value(entry: Mapping[str, Any], name: str) -> float:
    value = (entry.get("metrics") or {}).get(name)
    return math.nan if value is None else float(value)


def _checkpoint_markers(ax, entries, name, color, corrupt, x_of) -> None:
    shrink = max(min(1.0, (120 / max(len(entries), 1)) ** 0.5), 0.5)  # long runs: smaller
    for kept, fill in ((False, "white"), (True, color)):
        pts = [(x_of(e["step"]), _value(e, name)) for e in entries
               if e["saved"] and e["kept"] == kept and e["step"] not in corrupt]
        if pts:
            ax.plot(*zip(*pts), marker="o", markersize=(6 if kept else 4.5) * shrink,
                    linestyle="none", color=color, markerfacecolor=fill,
                    markeredgewidth=1.2 * shrink, zorder=4)
    pts = [(x_of(e["step"]), _value(e, name)) for e in entries if e["step"] in corrupt]
    if pts:
        ax.plot(*zip(*pts), marker="X", markersize=10, linestyle="none", color="tab:red",
                markeredgecolor="black", zorder=5)


def _checkpoint_key(entries, corrupt, best, latest) -> list:
    from matplotlib.lines import Line2D

    n_deleted = sum(e["saved"] and not e["kept"] for e in entries) - len(corrupt)
    key = [Line2D([], [], marker="o", color="black", linestyle="none", markersize=7,
                  label=f"kept checkpoint ({sum(e['kept'] for e in entries)})"),
           Line2D([], [], marker="o", color="black", markerfacecolor="white",
                  linestyle="none", markersize=7, label=f"deleted checkpoint ({n_deleted})")]
    if corrupt:
        key.append(Line2D([], [], marker="X", color="tab:red", markeredgecolor="black",
                          linestyle="none", markersize=9,
                          label=f"corrupt, set aside ({len(corrupt)})"))
    if best is not None:
        key.append(Line2D([], [], color="tab:green", linestyle="--", marker="*", markersize=12,
                          markerfacecolor="gold", markeredgecolor="black",
                          label=f"best (step {best})"))
    if latest is not None:
        key.append(Line2D([], [], color="tab:gray", linestyle="--",
                          label=f"latest (step {latest})"))
    return key
