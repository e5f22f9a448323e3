"""The ``jaxckpt`` command: inspect, verify, plot and prune a checkpoint directory.

Synopsis::

    jaxckpt ls /tmp/run/checkpoints            # kept checkpoints, why kept, size, integrity
    jaxckpt best /tmp/run/checkpoints --json   # {"step": 45, "metrics": {...}}
    jaxckpt plot /tmp/run/checkpoints -o curves.png
    jaxckpt prune /tmp/run/checkpoints --keep-best 1 --keep-latest 1 --dry-run

Everything here goes through :class:`jaxckpt.CheckpointManager`; the CLI decides nothing
the library does not (retention is :meth:`CheckpointPolicy.kept`). Read-only commands open
the directory with ``read_only=True``: they never write, delete, clean up or lock.
Exit status: 0 success, 1 ``verify`` found a bad checkpoint, 2 an error (one line on stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import re
import select
import sys
import tempfile
import textwrap
import warnings
from typing import Any, Sequence

__all__ = ["main", "plan_prune", "parse_bytes"]

EXIT_OK, EXIT_BAD_CHECKPOINT, EXIT_ERROR = 0, 1, 2
EXIT_SIGPIPE = 128 + 13  # the reader of stdout went away, as a shell reports SIGPIPE
_PROG = "jaxckpt"


class CliError(Exception):
    """A user-facing error: printed as ``jaxckpt: error: <message>``, exit status 2."""


# -- opening a directory ----------------------------------------------------------------


def _check_checkpoint_dir(directory: str):
    """The directory as an epath, or a CliError naming what is wrong with it."""
    from etils import epath

    from jaxckpt.format import LOCK_FILE
    from jaxckpt.manager import HISTORY_FILE

    path = epath.Path(directory)
    if "://" not in directory:
        path = path.resolve()  # Orbax writes (prune) only to absolute paths
    else:
        from jaxckpt.storage import forget_cached_listings
        forget_cached_listings(path)  # main() may run twice in one process
    if not path.exists():
        raise CliError(f"{directory}: no such directory.")
    if not path.is_dir():
        raise CliError(f"{directory} is a file, not a checkpoint directory.")
    entries = list(path.iterdir())  # one listing for every question below
    # Empty, or holding jaxckpt's lock: a manager opened it and maybe nothing was committed
    # yet (a run killed before or during its first save leaves the lock and Orbax's
    # temporary directory): no checkpoints, no error.
    if not entries or any(p.name == LOCK_FILE for p in entries) or \
            (path / HISTORY_FILE).exists() or any(_is_step_dir(p) for p in entries):
        return path
    from jaxckpt.catalog import other_naming, other_naming_message

    theirs = other_naming(path, [p.name for p in entries])
    if theirs:
        raise CliError(other_naming_message(directory, theirs))
    nested = sorted(p.name for p in entries if p.is_dir() and (p / HISTORY_FILE).exists())
    hint = f"; did you mean {path / nested[0]}?" if nested else (
        " (pass the directory given to CheckpointManager).")
    raise CliError(f"{directory} is not a jaxckpt checkpoint directory: no {HISTORY_FILE} and "
                   f"no step directories{hint}")


def _is_step_dir(path) -> bool:
    from jaxckpt.format import step_of

    return step_of(path.name) is not None and path.is_dir()


def _open(directory: str, *, read_only: bool = True, monitor: str | None = None,
          mode: str | None = None, adopt: bool = False):
    """A CheckpointManager on ``directory`` with its stored policy; with ``--monitor``
    (``--mode``), that policy ranked by another metric, its keep counts unchanged (a
    directory plain Orbax wrote stores no monitor)."""
    path = _check_checkpoint_dir(directory)
    from jaxckpt.manager import CheckpointManager

    if monitor is None and mode is not None:
        raise CliError("--mode needs --monitor NAME (the metric it ranks).")
    if adopt and not read_only:  # checkpoints plain Orbax wrote store no policy
        from jaxckpt.policy import CheckpointPolicy
        return CheckpointManager(path, CheckpointPolicy(
            monitor=monitor, mode=mode or "auto", keep_best=1 if monitor else 0,
            keep_latest=1), adopt=True)
    mngr = CheckpointManager(path, None, read_only=read_only)
    if monitor is None:
        return mngr
    with mngr:
        stored = mngr.policy
        recorded = sorted({name for h in mngr.history() for name in h["metrics"]})
    if recorded and monitor not in recorded:
        raise CliError(f"--monitor {monitor!r} was never recorded in {path}; its metrics "
                       f"are {recorded}.")
    policy = stored if (monitor, mode) == (stored.monitor, None) else dataclasses.replace(
        stored, monitor=monitor, mode=mode or "auto", keep_best=max(stored.keep_best, 1),
        min_delta=0.0, initial_value_threshold=None)
    return CheckpointManager(path, policy, read_only=read_only)


# -- what each checkpoint is --------------------------------------------------------------


def step_bytes(path) -> int:
    """Total size of the files under ``path`` (an epath, so ``gs://`` works too)."""
    from jaxckpt.storage import walk_files  # not epath's walk: it loses gs:// on the way

    return sum(size for _, size in walk_files(path))


def _verdicts(mngr, *, checksums: bool = True) -> dict[int, Any]:
    """The verdict of every step in the directory, after checking each now (a step that
    fails is set aside by the manager: never best, latest or deleted)."""
    mngr.verify(checksums=checksums)
    return mngr.verdicts()


def _status(verdict: Any, checksums: bool = True) -> str:
    if verdict is None:
        return "unknown"
    if verdict.incomplete:
        return "incomplete"
    if verdict.problems:
        return "corrupt"
    if not verdict.has_manifest:
        return "orbax, no manifest" if verdict.writer == "orbax" else "unverified"
    return "ok" if checksums else "ok (sizes)"


def _corrupt(verdicts: dict[int, Any]) -> dict[int, list[str]]:
    return {s: list(v.problems) for s, v in verdicts.items() if _status(v) == "corrupt"}


def _checkpoints(mngr, *, checksums: bool) -> list[dict[str, Any]]:
    """One dict per checkpoint on disk: step, epoch, metrics, kept, bytes, time, integrity.

    A checkpoint that fails verification is listed too: the manager has set it aside
    (never best, latest or deleted), so it has no reason to be kept.
    """
    verdicts = _verdicts(mngr, checksums=checksums)  # first: it sets corrupt steps aside
    entries = {e["step"]: e for e in mngr.entries()}
    reasons = mngr.kept_reasons()
    kept = set(mngr.steps())
    best, latest = mngr.best_step(), mngr.latest_step()
    times = {r.step: r.time for r in mngr.records()}  # Orbax's commit time for its steps
    rows = []
    for step in sorted(kept | set(_corrupt(verdicts))):
        entry = {"time": times.get(step), **entries.get(step, {})}
        try:
            rows.append(_row(mngr, step, entry, verdicts[step], reasons,
                             kept, best, latest, checksums))
        except (FileNotFoundError, KeyError):
            if (mngr.directory / str(step)).exists():
                raise
            # deleted by the run writing there while this listing read it: not listed
    return rows


def _row(mngr, step, entry, verdict, reasons, kept, best, latest, checksums) -> dict:
    when = entry.get("time") or None
    status = _status(verdict, checksums)
    return {
        "step": step,
        "path": str(mngr.directory / str(step)),
        "epoch": entry.get("epoch"),
        "metrics": (mngr.metrics(step) if step in kept else entry.get("metrics")) or {},
        "kept": ([str(r) for r in reasons.get(step, ())] or _foreign(verdict) if step in kept
                 else ["set aside: corrupt"]),
        "best": step == best,
        "latest": step == latest,
        "bytes": step_bytes(mngr.directory / str(step)),
        "time": when,
        "written": _iso(when),
        "integrity": status,
        "problems": list(verdict.problems) if status == "corrupt" else [],
    }


def _sizes(directory, steps: list[int]) -> dict[int, int]:
    """``{step: bytes}``, leaving out a step deleted meanwhile (a dry run beside the run
    writing there, whose policy deletes what it replaced)."""
    out = {}
    for step in steps:
        try:
            out[step] = step_bytes(directory / str(step))
        except FileNotFoundError:
            if (directory / str(step)).exists():
                raise
    return out


def _foreign(verdict: Any) -> list[str]:
    # jaxckpt never deletes what plain Orbax wrote (unless adopted): kept whatever the policy
    return ["orbax's own"] if verdict is not None and verdict.writer == "orbax" else []


def _metric_order(names: Sequence[str], monitor: str | None) -> list[str]:
    """Monitored metric first, then its train counterpart, then the rest as first seen."""
    ordered = []
    for name in (monitor, _counterpart(monitor)):
        if name and name in names and name not in ordered:
            ordered.append(name)
    return ordered + [n for n in names if n not in ordered]


def _counterpart(metric: str | None) -> str | None:
    """``val_loss`` <-> ``loss``: the train/validation twin of a metric name."""
    from jaxckpt.plotting import counterpart  # one home for the pairing the plot also uses

    return counterpart(metric)


def _metric_names(dicts: Sequence[dict[str, float] | None]) -> list[str]:
    names: list[str] = []
    for d in dicts:
        names += [k for k in (d or {}) if k not in names]
    return names


# -- formatting ---------------------------------------------------------------------------


def _iso(t: float | None) -> str | None:
    if not t:
        return None
    return datetime.datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


def _when(t: float | None) -> str:
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "?"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def human_bytes(n: int) -> str:
    """``45056`` -> ``"44.0 KiB"``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_bytes(text: str) -> int:
    """``"1000"``, ``"500MB"`` (10^6), ``"1.5GiB"`` or ``"2G"`` (2^30, as ``du -h``) -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: give bytes (1000000) or a number with a unit "
            "(500MB, 1.5GiB, 2G).")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    """A plain fixed-width table (for pipes, logs and ``grep``)."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]

    def line(cells):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = ["-" * w if h else "" for h, w in zip(headers, widths)]
    return "\n".join([line(headers), line(rule)] +
                     [line(r) for r in rows])


def _mark(row: dict[str, Any]) -> str:
    return ", ".join(m for m in ("best", "latest") if row[m])


# -- commands -----------------------------------------------------------------------------


def cmd_ls(args) -> int:
    with _open(args.directory, monitor=args.monitor, mode=args.mode) as mngr:
        rows = _checkpoints(mngr, checksums=not args.quick)
        policy = mngr.policy
        ignored = _ignored(mngr)
        summary = {"directory": str(mngr.directory), "monitor": policy.monitor,
                   "mode": policy.resolved_mode if policy.monitor else None,
                   "keep_best": policy.keep_best, "keep_latest": policy.keep_latest,
                   "best_step": mngr.best_step(), "latest_step": mngr.latest_step(),
                   "best_path": _path_or_none(mngr, mngr.best_step()),
                   "latest_path": _path_or_none(mngr, mngr.latest_step()),
                   "checksums": not args.quick, "checkpoints": rows,
                   "ignored": ignored}
    if args.json:
        print(json.dumps(summary, indent=2))
        return EXIT_OK
    bad = [r for r in rows if r["problems"]]
    title = (f"{summary['directory']}: {len(rows)} checkpoint{'s' * (len(rows) != 1)}"
             + (f", monitor {policy.monitor} ({summary['mode']})" if policy.monitor else "")
             + f", best {_or_none(mngr.best_step())}, latest {_or_none(mngr.latest_step())}"
             + (f", {len(bad)} CORRUPT" if bad else ""))
    if not rows:
        print(f"{title}\n(no checkpoints)")
        _print_ignored(ignored)
        return EXIT_OK
    names = _metric_order(_metric_names([r["metrics"] for r in rows]), policy.monitor)
    headers = (["step", "epoch"] + names +
               ["kept as", "size", "written", "integrity", ""])
    cells = [[str(r["step"]), _or_none(r["epoch"], "-")] +
             [_num(r["metrics"].get(n)) for n in names] +
             [", ".join(r["kept"]) or "-", human_bytes(r["bytes"]), _when(r["time"]),
              r["integrity"], f"<- {_mark(r)}" if _mark(r) else ""] for r in rows]
    right = {0, 1, *range(2, 2 + len(names)), 3 + len(names)}
    if sys.stdout.isatty():
        _print_rich(title, headers, cells, right, rows)
    else:
        print(title)
        print(_table(headers, cells, right))
    for r in bad:
        print(f"step {r['step']} is corrupt: {'; '.join(r['problems'])}")
    _print_ignored(ignored)
    return EXIT_OK


def _ignored(mngr) -> list[dict[str, Any]]:
    """Entries named like a step that are not checkpoints (a file, an empty directory, a
    half-copied step), then a writer's unfinished work: never listed, restored, moved or
    deleted by a reader, but worth a line. Each: ``{"step", "name", "why"}``."""
    out = []
    for step, v in mngr.verdicts().items():
        if v.incomplete:
            why = "; ".join(p.removeprefix(".: ") for p in v.problems) or "incomplete"
            out.append({"step": step, "name": str(step),
                        "why": why + ("; the next writer removes it (an unfinished jaxckpt "
                                      "step)" if v.writer == "jaxckpt"
                                      else "; jaxckpt leaves it alone")})
    return out + _unfinished(mngr.directory)


def _unfinished(directory) -> list[dict[str, Any]]:
    """Orbax's temporary step directories and checkpoints being deleted: a writer's work
    in progress, or what a killed one left (the next writing open removes them)."""
    from jaxckpt import format as fmt
    from jaxckpt.storage import list_names
    out = []
    for name in sorted(list_names(directory)):
        if (found := fmt.unfinished(name)) is not None:
            what, step = found
            out.append({"step": step, "name": name,
                        "why": f"a {what} not finished: in progress, or left by a killed "
                               "writer; the next writing open removes it"})
    return out


def _print_ignored(ignored: list[dict[str, Any]]) -> None:
    for entry in ignored:
        print(f"ignored: {entry['name']} is not a checkpoint ({entry['why']})")


def _path_or_none(mngr, step: int | None) -> str | None:
    return None if step is None else str(mngr.checkpoint_path(step))


def _or_none(value: Any, none: str = "none") -> str:
    return none if value is None else str(value)


def _print_rich(title, headers, cells, right, rows) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False,
                  collapse_padding=True)
    for i, header in enumerate(headers):
        # On a narrow terminal only "kept as" and "written" wrap (at their spaces).
        table.add_column(header, justify="right" if i in right else "left",
                         no_wrap=header not in ("kept as", "written", ""),
                         min_width=10 if header == "written" else None)
    status_style = {"ok": "green", "ok (sizes)": "green", "corrupt": "bold red",
                    "unverified": "yellow"}
    for row, cell in zip(rows, cells):
        cell = list(cell)
        k = headers.index("integrity")
        cell[k] = f"[{status_style.get(row['integrity'], 'yellow')}]{cell[k]}[/]"
        cell[-1] = f"[bold]{_mark(row)}[/]"  # the row's colour marks it; no arrow needed
        style = "bold green" if row["best"] else ("cyan" if row["latest"] else None)
        table.add_row(*cell, style=style)
    Console().print(table)


def _verified_best(mngr) -> int | None:
    """The best step that passes a full verification, as ``restore("best")`` would read
    it: a damaged best is set aside (with a warning) and the next best checked."""
    checked: set[int] = set()
    while (step := mngr.best_step()) is not None and step not in checked:
        checked.add(step)
        problems = mngr.verify(step)[step]  # a damaged step is set aside: best_step() moves on
        if problems:
            warnings.warn(f"checkpoint {step} in {mngr.directory} is corrupt: "
                          f"{'; '.join(problems)}: set aside, never restored; the best "
                          "checkpoint that verifies is named instead.")
    return step


def cmd_best(args) -> int:
    with _open(args.directory, monitor=args.monitor, mode=args.mode) as mngr:
        step = _verified_best(mngr)
        if step is None:
            from jaxckpt.errors import CheckpointNotFoundError
            try:  # its message names why, and which metric to monitor
                mngr.checkpoint_path("best")
            except CheckpointNotFoundError as e:
                raise CliError(str(e)) from None
        metrics = mngr.metrics(step) or {}
        epoch = next((e["epoch"] for e in mngr.entries() if e["step"] == step), None)
        monitor, mode = mngr.policy.monitor, mngr.policy.resolved_mode
        path = str(mngr.checkpoint_path(step))
    if args.json:
        print(json.dumps({"step": step, "epoch": epoch, "monitor": monitor, "mode": mode,
                          "metrics": metrics, "path": path}, indent=2))
        return EXIT_OK
    epoch_text = f" (epoch {epoch})" if epoch is not None else ""
    print(f"best checkpoint: step {step}{epoch_text}, by {monitor} ({mode})")
    width = max(map(len, metrics), default=0)
    for name in _metric_order(list(metrics), monitor):
        print(f"  {name.ljust(width)}  {metrics[name]:.6g}")
    print(f"  in {path}")
    return EXIT_OK


def cmd_verify(args) -> int:
    with _open(args.directory, monitor=args.monitor, mode=args.mode) as mngr:
        checked = mngr.verify(args.step)  # names an unknown step itself
        verdicts = {s: v for s, v in mngr.verdicts().items() if s in checked}
        ignored = _ignored(mngr) if args.step is None else []
        directory = mngr.directory
    if not verdicts:
        raise CliError(f"no checkpoints in {directory} to verify.")
    for step, verdict in verdicts.items():
        status = _status(verdict)
        print(f"step {step}: " + ("ok" if status == "ok" else (
            "CORRUPT: " if status == "corrupt" else "") + verdict.describe()))
    _print_ignored(ignored)
    bad = sorted(_corrupt(verdicts))
    problems = verdicts
    if bad:
        print(f"{_PROG}: error: {len(bad)} of {len(problems)} checkpoint(s) in {directory} "
              f"failed verification: step(s) {', '.join(map(str, bad))}.", file=sys.stderr)
        return EXIT_BAD_CHECKPOINT
    unverified = [s for s, v in verdicts.items() if _status(v) != "ok"]
    print(f"{len(problems)} checkpoint(s) ok" + (
        f", of which {len(unverified)} unverified (no manifest: step(s) "
        f"{', '.join(map(str, unverified))})" if unverified else ""))
    return EXIT_OK


def cmd_plot(args) -> int:
    with _open(args.directory, monitor=args.monitor, mode=args.mode) as mngr:
        entries = mngr.entries()
        monitor, mode = mngr.policy.monitor, (mngr.policy.resolved_mode
                                              if mngr.policy.monitor else None)
        best, latest, directory = mngr.best_step(), mngr.latest_step(), mngr.directory
        corrupt = sorted(_corrupt(_verdicts(mngr, checksums=False)))  # sizes: a stat per file
    available = _metric_names([e["metrics"] for e in entries])
    if not available:
        raise CliError(f"{directory} has no metric history to plot.")
    names = args.metric or [n for n in (monitor, _counterpart(monitor)) if n in available] \
        or available
    unknown = [n for n in names if n not in available]
    if unknown:
        raise CliError(f"no metric {', '.join(map(repr, unknown))} in the history of "
                       f"{directory}; metrics: {', '.join(available)}.")
    from jaxckpt.plotting import plot_checkpoints  # matplotlib only for this command

    plot_checkpoints(entries, names, args.output, monitor=monitor, mode=mode, best=best,
                     latest=latest, corrupt=corrupt, title=str(directory),
                     log_scale=args.log_scale)
    print(f"wrote {args.output} ({', '.join(names)} over {len(entries)} steps; "
          f"best {_or_none(best)}, latest {_or_none(latest)})")
    return EXIT_OK


def plan_prune(records, sizes: dict[int, int], policy, max_bytes: int | None
               ) -> list[dict[str, Any]]:
    """Decide, for each checkpoint, keep or delete and why. Pure: no I/O.

    ``policy.kept(records)`` picks the candidates (best K union latest N). With a byte
    budget they are admitted in value order -- best #1, latest #1, best #2, latest #2, ...
    (a checkpoint with two reasons counts at its higher place) -- each one that still
    fits in ``max_bytes`` is kept, one that does not is deleted and the next is tried.

    Returns:
      One dict per checkpoint, by step: ``step, keep, reasons, why, bytes``.
    """
    reasons = policy.kept(records)
    order = {"best": 0, "latest": 1}

    def place(step: int) -> int:
        return min(2 * ((r.rank or 1) - 1) + order.get(r.kind, 2 * len(records))
                   for r in reasons[step])

    ranked = policy.ranked(records)
    value_rank = {r.step: i for i, r in enumerate(ranked, start=1)}
    decisions: dict[int, dict[str, Any]] = {}
    used = 0
    for order, step in enumerate(sorted(reasons, key=place), start=1):
        label = ", ".join(str(r) for r in reasons[step])
        size = sizes[step]
        if max_bytes is not None and used + size > max_bytes:
            decisions[step] = {"keep": False, "why": (
                f"{label}, but over the --max-bytes budget: {human_bytes(used)} already kept, "
                f"+{human_bytes(size)} > {human_bytes(max_bytes)}")}
            continue
        used += size
        budget = (f" ({_ordinal(order)} in value order; {human_bytes(used)} of "
                  f"{human_bytes(max_bytes)} used)" if max_bytes is not None else "")
        decisions[step] = {"keep": True, "why": label + budget}
    for record in records:
        if record.step in decisions:
            continue
        parts = []
        if policy.keep_best:
            parts.append(f"not among the best {policy.keep_best} by {policy.monitor} " + (
                f"(ranks #{value_rank[record.step]}, {record.value:.4g})"
                if record.step in value_rank else f"(no finite {policy.monitor})"
                if record.has_metrics else f"(saved without {policy.monitor})"))
        parts.append(f"not among the latest {policy.keep_latest}" if policy.keep_latest
                     else "--keep-latest 0")
        decisions[record.step] = {"keep": False, "why": "; ".join(parts)}
    return [{"step": s, "bytes": sizes[s], "reasons": [str(r) for r in reasons.get(s, ())],
             **decisions[s]}
            for s in sorted(decisions)]


def _corrupt_dir() -> str:
    from jaxckpt.format import CORRUPT_DIR

    return CORRUPT_DIR


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def cmd_prune(args) -> int:
    import dataclasses

    # A real prune holds the directory as its writer (a live run's lock makes it fail);
    # a dry run only reads.
    from jaxckpt.errors import CheckpointDirectoryError
    try:
        mngr = _open(args.directory, read_only=args.dry_run, monitor=args.monitor,
                     mode=args.mode)
    except CheckpointDirectoryError as e:
        if "plain Orbax" not in str(e):
            raise
        if not args.adopt:
            raise CliError(f"{e} jaxckpt prune deletes checkpoints it did not write only "
                           "when told: --dry-run shows what it would keep; add --adopt (with "
                           "--monitor NAME to keep the best by that metric) to prune "
                           "them.") from None
        # Only where the plain open refused: a directory jaxckpt wrote keeps its policy.
        mngr = _open(args.directory, read_only=False, monitor=args.monitor, mode=args.mode,
                     adopt=True)
    with mngr:
        # Checksums first: a corrupt copy must never be kept in place of a good one.
        corrupt = _corrupt(_verdicts(mngr))
        stored = mngr.policy
        keep_best = stored.keep_best if args.keep_best is None else args.keep_best
        keep_latest = stored.keep_latest if args.keep_latest is None else args.keep_latest
        if keep_best and not stored.monitor:
            raise CliError(f"{mngr.directory} monitors no metric, so there is no best to keep: "
                           "use --keep-best 0.")
        try:
            policy = dataclasses.replace(stored, keep_best=keep_best, keep_latest=keep_latest)
        except ValueError as e:
            raise CliError(f"{e} (--keep-best {keep_best} --keep-latest {keep_latest})") from e
        # intact checkpoints only: corrupt ones are set aside
        sizes = _sizes(mngr.directory, mngr.steps())
        steps = sorted(sizes)
        if not steps:
            print(f"{mngr.directory}: no intact checkpoints, nothing to prune.")
            return EXIT_OK
        records = [r for r in mngr.records(policy) if r.step in sizes]
        plan = plan_prune(records, sizes, policy, args.max_bytes)
        doomed = [d["step"] for d in plan if not d["keep"]]
        if len(doomed) == len(plan):
            raise CliError(f"--max-bytes {args.max_bytes} is smaller than every checkpoint "
                           f"(smallest {human_bytes(min(sizes.values()))}): prune would delete "
                           f"all {len(plan)}; nothing was deleted.")
        best_now = mngr.best_step()
        budget = (f" --max-bytes {args.max_bytes} ({human_bytes(args.max_bytes)})"
                  if args.max_bytes is not None else "")
        print(f"{mngr.directory}: --keep-best {keep_best} --keep-latest {keep_latest}{budget}"
              f"{' (dry run: nothing is deleted)' if args.dry_run else ''}")
        if best_now in doomed:
            _warn_best_deleted(records, doomed, best_now, policy, args.dry_run)
        if not args.dry_run:
            for step in doomed:
                mngr.delete(step)
    verbs = ("would keep", "would delete") if args.dry_run else ("kept", "deleted")
    width = max(len(v) for v in verbs)
    for step, found in sorted(corrupt.items()):
        print(f"  {'left alone'.ljust(width)}  step {step}: corrupt, set aside by jaxckpt "
              f"(moved to {_corrupt_dir()}/ by the next save): {'; '.join(found)}")
    for d in plan:
        verb = verbs[0] if d["keep"] else verbs[1]
        note = "  [THE BEST CHECKPOINT]" if not d["keep"] and d["step"] == best_now else ""
        print(f"  {verb.ljust(width)}  step {str(d['step']).rjust(len(str(steps[-1])))}"
              f"  {human_bytes(d['bytes']).rjust(10)}  {d['why']}{note}")
    freed = sum(d["bytes"] for d in plan if not d["keep"])
    kept = sum(d["bytes"] for d in plan if d["keep"])
    print(f"{verbs[1]} {len(doomed)} of {len(plan)} checkpoint(s), {human_bytes(freed)}; "
          f"{len(plan) - len(doomed)} kept, {human_bytes(kept)}")
    return EXIT_OK


def _warn_best_deleted(records, doomed, best_now, policy, dry_run: bool) -> None:
    value = next(r.value for r in records if r.step == best_now)
    survivor = policy.best([r for r in records if r.step not in doomed])
    left = "would be" if dry_run else "is"
    after = (f"the best left {left} step {survivor.step} ({policy.monitor} "
             f"{survivor.value:.4g})" if survivor else
             f"no checkpoint with a finite {policy.monitor} {left} left")
    print(f"{_PROG}: warning: step {best_now} is the best checkpoint ({policy.monitor} "
          f"{value:.4g}) and {'would be' if dry_run else 'is being'} deleted; {after}.",
          file=sys.stderr)


def cmd_demo(args) -> int:
    try:
        from jaxckpt.demo import run
    except ModuleNotFoundError as e:
        if e.name not in ("jaxckpt.demo",):
            raise
        raise CliError("this jaxckpt install has no demo (jaxckpt.demo is missing).") from e
    # Absolute: Orbax writes only to absolute paths.
    workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="jaxckpt-demo-"))
    print(f"demo: {args.epochs} epochs on the digits dataset in {workdir}")
    result = run(workdir, args.epochs, args.seed)
    ckpt = os.path.join((result or {}).get("workdir", workdir), "checkpoints")
    print(f"demo done. Inspect what it kept:\n  {_PROG} ls {ckpt}\n"
          f"  {_PROG} plot {ckpt} -o curves.png")
    return EXIT_OK


# -- the parser ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog=_PROG, formatter_class=fmt,
        description="Inspect, verify, plot and prune jaxckpt checkpoint directories.",
        epilog="examples:\n"
               "  jaxckpt ls /tmp/run/checkpoints\n"
               "  jaxckpt best /tmp/run/checkpoints --json\n"
               "  jaxckpt verify /tmp/run/checkpoints\n"
               "  jaxckpt plot /tmp/run/checkpoints -o curves.png\n"
               "  jaxckpt prune /tmp/run/checkpoints --keep-best 1 --keep-latest 1 --dry-run\n"
               "  jaxckpt demo --workdir /tmp/jaxckpt-demo --epochs 20\n\n"
               "exit status: 0 ok, 1 verify found a bad checkpoint, 2 error, 141 its\n"
               "output's reader went away (jaxckpt ls DIR | head).\n"
               "Run 'jaxckpt COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name, help, epilog, func):
        p = sub.add_parser(name, help=help, description=textwrap.fill(help, 78),
                           epilog="examples:\n" + epilog, formatter_class=fmt)
        p.set_defaults(func=func)
        return p

    def ranking(p):
        p.add_argument("--monitor", metavar="NAME",
                       help="rank by this metric instead of the directory's stored policy "
                            "(for directories plain Orbax wrote: it stores no monitor)")
        p.add_argument("--mode", choices=("min", "max"),
                       help="with --monitor: whether lower or higher is better (default: "
                            "from the metric's name)")

    def directory(p):
        p.add_argument("directory", metavar="DIR",
                       help="checkpoint directory (the one given to CheckpointManager; "
                            "local path or gs://...)")

    p = command("ls", "List the kept checkpoints: step, epoch, metrics, why kept, size, "
                "time written, integrity; best and latest marked.",
                "  jaxckpt ls /tmp/run/checkpoints\n"
                "  jaxckpt ls /tmp/run/checkpoints --json | jq '.checkpoints[].step'\n"
                "  jaxckpt ls gs://bucket/run/checkpoints --quick\n\n"
                "A table on a terminal, plain text when piped, JSON with --json.\n"
                "integrity: ok (sizes, small files' CRC-32C and each array's fingerprint\n"
                "match the manifest written at commit), corrupt (they do not; jaxckpt sets\n"
                "the checkpoint aside: never restored, best, latest or deleted), unverified\n"
                "(no manifest), orbax, no manifest (written by plain Orbax).", cmd_ls)
    directory(p)
    ranking(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--quick", action="store_true",
                   help="check file sizes only, not checksums or array fingerprints (a stat "
                        "per file instead of reading every byte: fast on large or remote "
                        "checkpoints)")

    p = command("best", "Show the best checkpoint by the monitored metric and its metrics.",
                "  jaxckpt best /tmp/run/checkpoints\n"
                "  jaxckpt best /tmp/run/checkpoints --json   "
                "# {\"step\": 45, \"metrics\": {\"val_loss\": 0.61, ...}, ...}", cmd_best)
    directory(p)
    ranking(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = command("verify", "Check every checkpoint (or one) against the manifest written when "
                "it was committed: sizes, small files' CRC-32C, every array's fingerprint (each byte is "
                "read once); exit 1 naming each bad one.",
                "  jaxckpt verify /tmp/run/checkpoints\n"
                "  jaxckpt verify /tmp/run/checkpoints --step 45\n"
                "  jaxckpt verify gs://bucket/run/checkpoints || echo 'restore from elsewhere'",
                cmd_verify)
    directory(p)
    ranking(p)
    p.add_argument("--step", type=int, metavar="N", help="check only checkpoint N")

    p = command("plot", "Plot the metric history of every recorded step (kept or not) as "
                "curves; kept checkpoints filled, deleted ones hollow, best and latest marked.",
                "  jaxckpt plot /tmp/run/checkpoints -o curves.png\n"
                "  jaxckpt plot /tmp/run/checkpoints -o acc.png --metric val_acc "
                "--metric acc\n\n"
                "Default metrics: the monitored one and its train twin (val_loss and loss).",
                cmd_plot)
    directory(p)
    ranking(p)
    p.add_argument("-o", "--output", required=True, metavar="FILE.png",
                   help="image to write (.png, .svg, .pdf)")
    p.add_argument("--metric", action="append", metavar="NAME",
                   help="metric to plot; repeat for several (default: the monitored one and "
                        "its train/validation twin)")
    p.add_argument("--log-scale", action="store_true", help="loss axes on a log scale")

    p = command("prune", "Apply a retention policy to an existing directory: keep the best K "
                "and latest N, optionally within a disk budget; delete the rest.",
                "  jaxckpt prune /tmp/run/checkpoints --keep-best 1 --keep-latest 1 --dry-run\n"
                "  jaxckpt prune /tmp/run/checkpoints --keep-best 3 --keep-latest 2\n"
                "  jaxckpt prune /tmp/run/checkpoints --keep-best 2 --keep-latest 1 "
                "--max-bytes 20GiB\n\n"
                "Best is ranked by the directory's own monitored metric and mode. With\n"
                "--max-bytes, checkpoints are admitted in value order -- best #1, latest #1,\n"
                "best #2, latest #2, ... -- each one kept if it still fits (sizes are the\n"
                "files under each step directory), otherwise deleted. Prune never deletes\n"
                "every checkpoint, and says so when it deletes the best one. It verifies\n"
                "checksums first: a corrupt checkpoint is left alone and never counted as\n"
                "kept. It takes the directory's writer lock, so it fails while a run is\n"
                "writing there. The directory's stored policy is not changed.",
                cmd_prune)
    directory(p)
    p.add_argument("--keep-best", type=_non_negative, metavar="K",
                   help="keep the K best by the monitored metric (default: the directory's "
                        "policy)")
    p.add_argument("--keep-latest", type=_non_negative, metavar="N",
                   help="keep the N newest (default: the directory's policy)")
    p.add_argument("--max-bytes", type=parse_bytes, metavar="B",
                   help="disk budget for the kept checkpoints: bytes, or 500MB, 1.5GiB, 2G")
    p.add_argument("--dry-run", action="store_true",
                   help="delete nothing; explain for each checkpoint why it would be kept or "
                        "deleted")
    p.add_argument("--adopt", action="store_true",
                   help="also prune checkpoints plain Orbax wrote (never without this); "
                        "rank them with --monitor")
    ranking(p)

    p = command("demo", "Run the seven-step digits example: train a small CNN keeping the "
                "best epoch by val_loss and the latest, then evaluate the best model. Run it "
                "again with the same --workdir and it resumes.",
                "  jaxckpt demo\n"
                "  jaxckpt demo --workdir /tmp/jaxckpt-demo --epochs 20\n"
                "  jaxckpt ls /tmp/jaxckpt-demo/checkpoints   # then look at what it kept",
                cmd_demo)
    p.add_argument("--workdir", metavar="DIR",
                   help="where to write checkpoints and plots (default: a new temporary "
                        "directory)")
    p.add_argument("--epochs", type=_positive, default=20, metavar="N",
                   help="epochs to train (default 20)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    return parser


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int >= 0")
    return value


def _positive(text: str) -> int:
    value = _non_negative(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int >= 1")
    return value


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jaxckpt")
    except PackageNotFoundError:
        return "unknown"


# -- entry point --------------------------------------------------------------------------


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = " ".join(str(message).split())
    print(f"{_PROG}: warning: {text}", file=sys.stderr)


@contextlib.contextmanager
def _quiet(args):
    """Library chatter off, warnings on one line each, for the duration of one command.

    The manager's log lines are for run logs; what a user of the CLI must know, it also
    says with ``warnings.warn``. Orbax logs through absl (a read-only open warns twice
    that it is read-only). Commands that report integrity themselves (ls, verify, prune)
    drop the manager's "checkpoint N is corrupt" warnings: their output says it.
    """
    saved = [(name, logging.getLogger(name).level) for name in ("jaxckpt", "absl")]
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            logging.getLogger("absl").setLevel(logging.ERROR)
            if args.command != "demo":  # the demo's training log stays as it is
                logging.getLogger("jaxckpt").setLevel(logging.ERROR)
            if args.command in ("ls", "verify", "prune"):
                warnings.filterwarnings("ignore", message=r"checkpoint \d+ in .* is corrupt")
            yield
    finally:
        for name, level in saved:
            logging.getLogger(name).setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``jaxckpt`` command line; return the exit status.

    Args:
      argv: the arguments after the program name (default: ``sys.argv[1:]``).
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, a usage error: argparse already printed
        return e.code if isinstance(e.code, int) else EXIT_ERROR
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    if args.command != "demo" and "jax" not in sys.modules:
        # Inspecting needs no accelerator; claiming one would take its memory from (or,
        # on a TPU host, fail beside) the training run that owns it.
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    try:
        with _quiet(args):
            status = args.func(args)
        sys.stdout.flush()  # here, so that a reader gone away is caught below
        return status
    except BrokenPipeError as e:
        # Ours when the reader of stdout went away; any other pipe's is an error.
        return _reader_gone() if _stdout_gone() else _error(e)
    except (CliError, OSError, ValueError, RuntimeError) as e:
        return _error(e)
    except KeyboardInterrupt:
        print(f"{_PROG}: interrupted", file=sys.stderr)
        return 130


def _error(e: Exception) -> int:
    """One line on stderr: jaxckpt's own errors each name the problem and the fix."""
    message = " ".join(str(e).split()) or type(e).__name__
    print(f"{_PROG}: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def _stdout_gone() -> bool:
    """Whether stdout is a pipe that nobody reads any more (POLLERR on its write end)."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & select.POLLERR for _, event in poll.poll(0))
    except (OSError, ValueError, AttributeError):  # not a file (a notebook, a capture)
        return False


def _reader_gone() -> int:
    """``jaxckpt ls DIR | head``: the reader closed the pipe. Stop quietly, as a tool
    killed by SIGPIPE does (Python would otherwise report the error again at exit)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
