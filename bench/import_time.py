"""How long ``import jaxckpt`` and read-only CLI commands take, beside ``import orbax``.

Synopsis::

    python bench/import_time.py --json import.json --markdown import.md

Each command runs as a fresh subprocess, ``--reps`` times in interleaved rounds (the
order rotated), and the median wall time is reported. One more run of each, with
``PYTHONPROFILEIMPORTTIME=1``, lists which heavy modules it imported: a read-only
command must not load the data or plotting stack. ``jaxckpt ls`` reads a directory of
``--checkpoints`` checkpoints that the script writes first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ckptbench import measure  # noqa: E402
from ckptbench.report import markdown_table  # noqa: E402

HEAVY = ("tensorflow_datasets", "grain", "rich", "matplotlib", "tensorflow", "sklearn")
STACK = ("jax", "orbax", "flax", "optax")
TARGETS = {"import_jaxckpt_over_orbax": ("<=", 1.5), "ls_minus_import_s": ("<=", 1.5)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=7, help="runs of each command (default 7)")
    p.add_argument("--checkpoints", type=int, default=50,
                   help="checkpoints in the directory `jaxckpt ls` reads (default 50)")
    p.add_argument("--json", metavar="PATH", help="write every figure to this JSON file")
    p.add_argument("--markdown", metavar="PATH", help="write the table as Markdown")
    return p.parse_args(argv)


def write_checkpoints(directory: str, n: int) -> None:
    """``n`` small checkpoints with metrics, all kept, written with the public API."""
    import jax.numpy as jnp

    import jaxckpt

    policy = jaxckpt.CheckpointPolicy(monitor="val_loss", keep_best=1, keep_latest=n)
    state = {"w": jnp.ones((64, 64)), "b": jnp.zeros(64)}
    with jaxckpt.CheckpointManager(directory, policy) as mngr:
        for step in range(1, n + 1):
            mngr.save(step, state, metrics={"val_loss": 1.0 / step, "val_acc": step / n},
                      epoch=step)


def cli() -> list[str]:
    """The installed ``jaxckpt`` console script (what users run), else ``python -m``."""
    script = shutil.which("jaxckpt", path=os.path.dirname(sys.executable))
    return [script] if script else [sys.executable, "-m", "jaxckpt"]


def commands(directory: str) -> dict[str, list[str]]:
    py = sys.executable
    return {"python -c pass": [py, "-c", "pass"],
            "import orbax.checkpoint": [py, "-c", "import orbax.checkpoint"],
            "import jaxckpt": [py, "-c", "import jaxckpt"],
            "jaxckpt --version": cli() + ["--version"],
            "jaxckpt ls DIR": cli() + ["ls", directory]}


def run(cmd: list[str], env: dict | None = None) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    return time.perf_counter() - t, done


def imported(stderr: str) -> set[str]:
    """Top-level packages named in ``-X importtime`` output."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name and name != "imported package":
                names.add(name.split(".")[0])
    return names


def measure_all(cmds: dict[str, list[str]], reps: int, on_progress) -> dict:
    """Median seconds per command over interleaved rounds, and what each imported."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    times: dict[str, list[float]] = {k: [] for k in cmds}
    errors: dict[str, str] = {}
    names = list(cmds)
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            s, done = run(cmds[name], env)
            times[name].append(s)
            if done.returncode != 0:
                errors[name] = f"exit code {done.returncode}: {done.stderr.strip()[-500:]}"
            on_progress()
    modules = {}
    for name, cmd in cmds.items():
        _, done = run(cmd, {**env, "PYTHONPROFILEIMPORTTIME": "1"})
        found = imported(done.stderr)
        modules[name] = {"heavy": [m for m in HEAVY if m in found],
                         "stack": [m for m in STACK if m in found], "count": len(found)}
        on_progress()
    return {"seconds": {k: measure.spread(v) for k, v in times.items()},
            "modules": modules, "errors": errors}


def figures(m: dict) -> tuple[dict, dict]:
    p50 = {k: v["p50"] for k, v in m["seconds"].items()}
    ratios = {"import_jaxckpt_over_orbax": p50["import jaxckpt"] / p50["import orbax.checkpoint"],
              "version_over_import": p50["jaxckpt --version"] / p50["import jaxckpt"],
              "ls_over_import": p50["jaxckpt ls DIR"] / p50["import jaxckpt"]}
    diffs = {"ls_minus_import_s": p50["jaxckpt ls DIR"] - p50["import jaxckpt"],
             "version_minus_import_s": p50["jaxckpt --version"] - p50["import jaxckpt"],
             "import_jaxckpt_minus_orbax_s": p50["import jaxckpt"] - p50["import orbax.checkpoint"]}
    return ratios, diffs


def met(result: dict) -> dict[str, bool]:
    values = {**result["ratios"], **result["differences"]}
    return {k: values[k] <= t if op == "<=" else values[k] >= t
            for k, (op, t) in TARGETS.items()}


def tables(result: dict) -> list[dict]:
    rows = [[name, f"{1e3 * s['p50']:.0f} ms", f"{1e3 * min(s['all']):.0f} ms",
             ", ".join(result["modules"][name]["heavy"]) or "none",
             ", ".join(result["modules"][name]["stack"]) or "none"]
            for name, s in result["seconds"].items()]
    times = {"title": f"fresh subprocesses (median of {result['config']['reps']})",
             "columns": ["command", "p50", "min", "heavy modules imported", "stack imported"],
             "rows": rows}
    ok = met(result)
    values = {**result["ratios"], **result["differences"]}
    checks = {"title": "targets", "columns": ["figure", "target", "value"],
              "rows": [[k, f"{op} {t}" + (" s" if k.endswith("_s") else ""),
                        f"{values[k]:.2f}" + (" s" if k.endswith("_s") else "")]
                       for k, (op, t) in TARGETS.items()],
              "ok": [[None, None, ok[k]] for k in TARGETS]}
    return [times, checks]


def markdown(result: dict) -> str:
    lines = [f"`{result['command']}` — {result['started']}, {result['elapsed_s']:.0f} s; "
             f"load average at start / end {result['load']['start']['load_avg'][0]:.2f} / "
             f"{result['load']['end']['load_avg'][0]:.2f}; `ls` of "
             f"{result['config']['checkpoints']} checkpoints", ""]
    for spec in tables(result):
        lines += [f"**{spec['title']}**", ""] + markdown_table(spec) + [""]
    if result["errors"]:
        lines += [f"- failed: {k}: {v}" for k, v in result["errors"].items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    t0 = time.perf_counter()
    directory = tempfile.mkdtemp(prefix="jaxckpt-import-")
    try:
        write_checkpoints(directory, args.checkpoints)
        cmds = commands(directory)
        load_start = measure.load()
        with Progress("commands", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=Console(stderr=True)) as bar:
            task = bar.add_task("runs", total=len(cmds) * (args.reps + 1))
            m = measure_all(cmds, args.reps, lambda: bar.update(task, advance=1))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    ratios, diffs = figures(m)
    result = {
        "benchmark": "jaxckpt import and read-only CLI time",
        "command": " ".join(["python", "bench/import_time.py"]
                            + (argv if argv is not None else sys.argv[1:])),
        "started": started, "elapsed_s": time.perf_counter() - t0,
        "machine": {"nproc": os.cpu_count(), "python": sys.version.split()[0]},
        "load": {"start": load_start, "end": measure.load()},
        "config": {"reps": args.reps, "checkpoints": args.checkpoints,
                   "cli": cli(), "heavy": list(HEAVY)},
        "targets": {k: f"{op} {t}" for k, (op, t) in TARGETS.items()},
        "ratios": ratios, "differences": diffs, **m,
    }
    result["met"] = met(result)
    console = Console()
    from rich.table import Table

    for spec in tables(result):
        t = Table(title=spec["title"])
        for i, c in enumerate(spec["columns"]):
            t.add_column(c, justify="left" if i == 0 else "right")
        for row in spec["rows"]:
            t.add_row(*row)
        console.print(t)
    for name, err in m["errors"].items():
        console.print(f"[red]{name} failed: {err}[/]")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=measure.json_default))
    if args.markdown:
        Path(args.markdown).write_text(markdown(result))
    return 1 if m["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
