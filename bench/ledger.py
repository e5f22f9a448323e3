"""What a ``save()`` call that writes nothing costs, and whether it stays flat over a run.

Synopsis::

    python bench/ledger.py --calls 100000 --json ledger.json --markdown ledger.md

A training loop calls ``save(step, state, metrics=...)`` at every step and lets the
policy decide. Here the policy keeps the best ``val_loss`` and is due every 10**9 steps;
the first call is a new best and writes, every later one brings a worse ``val_loss``, so
none of them writes: each costs only the decision and the metric history. The calls are
timed one by one and reported per window of ``--window`` calls (default: a tenth of the
calls), so growth with the length of the run is visible: the cost of a call that writes
nothing must not depend on how many came before it. Public jaxckpt API only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ckptbench import measure  # noqa: E402
from ckptbench.report import markdown_table  # noqa: E402

TARGET = ("last_over_first_p50", "<=", 1.5)  # "flat", with room for timer noise


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=100_000, help="save() calls (default 100000)")
    p.add_argument("--window", type=int, default=None,
                   help="calls per reported window (default: calls / 10)")
    p.add_argument("--max-seconds", type=float, default=900.0,
                   help="stop early past this (a manager whose calls grow costlier may not "
                        "finish); the windows done are still reported (default 900)")
    p.add_argument("--dir", default=None, help="checkpoint directory (default: a new temp dir)")
    p.add_argument("--json", metavar="PATH", help="write every figure to this JSON file")
    p.add_argument("--markdown", metavar="PATH", help="write the table as Markdown")
    return p.parse_args(argv)


def time_calls(directory: str, calls: int, max_seconds: float, on_progress) -> dict:
    """Per-call seconds of ``calls`` save() calls, and what the manager recorded."""
    import jax.numpy as jnp
    import numpy as np

    import jaxckpt

    policy = jaxckpt.CheckpointPolicy(monitor="val_loss", keep_best=1, every_n_steps=10 ** 9)
    state = {"w": jnp.arange(16, dtype=jnp.float32)}
    seconds = np.zeros(calls)
    wrote = np.zeros(calls, dtype=bool)
    cpu = np.zeros(calls)  # process CPU (every thread) after each call: background work too
    deadline = time.perf_counter() + max_seconds
    done = 0
    mngr = jaxckpt.CheckpointManager(directory, policy)
    cpu0 = time.process_time()
    try:
        for i in range(calls):
            metrics = {"val_loss": 1.0 + 1e-6 * i, "loss": 1.0}  # worse after the first
            t = time.perf_counter()
            wrote[i] = mngr.save(i + 1, state, metrics=metrics)
            seconds[i] = time.perf_counter() - t
            cpu[i] = time.process_time()
            done = i + 1
            if done % 1000 == 0:
                on_progress(1000)
                if time.perf_counter() > deadline:
                    break
        t = time.perf_counter()
        mngr.wait()
        wait_s = time.perf_counter() - t
        history = len(mngr.history())
    finally:
        t = time.perf_counter()
        mngr.close()
        close_s = time.perf_counter() - t
    cpu_per_call = np.diff(np.concatenate([[cpu0], cpu[:done]]))
    return {"seconds": seconds[:done], "wrote": wrote[:done], "cpu_s": cpu_per_call,
            "wait_s": wait_s,
            "close_s": close_s, "history_entries": history}


def windows(seconds, wrote, cpu, window: int) -> list[dict]:
    """p50 / p99 / mean / max of the calls that did not write, per window of calls, and
    the process's CPU seconds per call over the window (background threads included)."""
    out = []
    for start in range(0, len(seconds), window):
        s = seconds[start:start + window][~wrote[start:start + window]]
        if len(s) == 0:
            continue
        out.append({"first_call": start + 1, "last_call": min(start + window, len(seconds)),
                    "calls": len(s),
                    "p50_s": measure.pct(s.tolist(), 0.5), "p99_s": measure.pct(s.tolist(), 0.99),
                    "mean_s": float(s.mean()), "max_s": float(s.max()),
                    "cpu_s_per_call": float(cpu[start:start + window].mean())})
    return out


def summarize(seconds, wrote, cpu, window: int) -> dict:
    """The windows, the run's p50 / p99, and last window over first (flatness)."""
    ws = windows(seconds, wrote, cpu, window)
    quiet = seconds[~wrote].tolist()
    first, last = ws[0], ws[-1]
    return {"windows": ws, "p50_s": measure.pct(quiet, 0.5), "p99_s": measure.pct(quiet, 0.99),
            "calls_not_written": len(quiet), "calls_written": int(wrote.sum()),
            "ratios": {"last_over_first_p50": last["p50_s"] / first["p50_s"],
                       "last_over_first_p99": last["p99_s"] / first["p99_s"]}}


def table(result: dict) -> dict:
    us = lambda x: f"{1e6 * x:.1f} µs"  # noqa: E731
    rows = [[f"{w['first_call']:,}-{w['last_call']:,}", us(w["p50_s"]),
             us(w["p99_s"]), us(w["mean_s"]), us(w["max_s"]), us(w["cpu_s_per_call"])]
            for w in result["windows"]]
    rows.append(["all", us(result["p50_s"]), us(result["p99_s"]), "", "", ""])
    return {"title": "save() calls that write nothing", "rows": rows,
            "columns": ["calls", "p50", "p99", "mean", "max", "CPU per call (all threads)"]}


def markdown(result: dict) -> str:
    key, op, target = TARGET
    r = result["ratios"][key]
    ok = r <= target
    lines = [f"`{result['command']}` — {result['started']}, {result['elapsed_s']:.0f} s; "
             f"load average at start / end {result['load']['start']['load_avg'][0]:.2f} / "
             f"{result['load']['end']['load_avg'][0]:.2f}", "",
             f"- {result['calls_done']:,} of {result['config']['calls']:,} calls "
             f"({'finished' if result['finished'] else 'stopped at --max-seconds'}); "
             f"{result['calls_written']} wrote; history entries after the run: "
             f"{result['history_entries']:,}; close(): {result['close_s']:.2f} s",
             f"- p50 last window / first window: {r:.2f} (target {op} {target}: "
             f"{'met' if ok else 'missed'}); p99: {result['ratios']['last_over_first_p99']:.2f}",
             ""]
    return "\n".join(lines + markdown_table(table(result)) + [""])


def main(argv=None) -> int:
    args = parse_args(argv)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    window = args.window or max(1, args.calls // 10)
    directory = args.dir or tempfile.mkdtemp(prefix="jaxckpt-ledger-")
    load_start = measure.load()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    t0 = time.perf_counter()
    with Progress("save() calls", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True)) as bar:
        task = bar.add_task("calls", total=args.calls)
        timed = time_calls(directory, args.calls, args.max_seconds,
                           lambda n: bar.update(task, advance=n))
    elapsed = time.perf_counter() - t0
    if args.dir is None:
        measure.rmtree(directory)
    done = len(timed["seconds"])
    result = {
        "benchmark": "jaxckpt save() calls that write nothing",
        "command": " ".join(["python", "bench/ledger.py"]
                            + (argv if argv is not None else sys.argv[1:])),
        "started": started, "elapsed_s": elapsed,
        "machine": {"nproc": os.cpu_count(), **measure.versions()},
        "load": {"start": load_start, "end": measure.load()},
        "config": {"calls": args.calls, "window": window, "max_seconds": args.max_seconds,
                   "policy": "CheckpointPolicy(monitor='val_loss', keep_best=1, "
                             "every_n_steps=10**9)",
                   "metrics": "val_loss 1.0 + 1e-6 * call (worse after the first), loss"},
        "targets": {TARGET[0]: f"{TARGET[1]} {TARGET[2]}"},
        "calls_done": done, "finished": done == args.calls,
        "wait_s": timed["wait_s"], "close_s": timed["close_s"],
        "history_entries": timed["history_entries"],
        **summarize(timed["seconds"], timed["wrote"], timed["cpu_s"], window),
    }
    from rich.table import Table

    spec = table(result)
    t = Table(title=spec["title"])
    for c in spec["columns"]:
        t.add_column(c, justify="right")
    for row in spec["rows"]:
        t.add_row(*row)
    console = Console()
    console.print(t)
    console.print(f"last / first window p50: {result['ratios']['last_over_first_p50']:.2f}; "
                  f"{done:,} calls in {elapsed:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=measure.json_default))
    if args.markdown:
        Path(args.markdown).write_text(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
