"""What checkpointing costs a training loop: jaxckpt against raw Orbax and the hardware floor.

Synopsis::

    python bench/overhead.py --quick --json out.json     # 3 small sizes, ~17 min on 2 cores
    python bench/overhead.py --sizes 128 512 2048        # state sizes in MiB (params + Adam)
    python bench/overhead.py --sizes 4096 16384 --dir /mnt/fast   # a GPU host, another disk

Each case runs in a fresh subprocess: a train state of random values (parameters plus
Adam moments), a jitted train step that donates it, and, in the same process and in
interleaved rounds, jaxckpt's ``CheckpointManager`` and a raw Orbax ``CheckpointManager``
saving it. The figures, what each means and the current results: bench/README.md.
The pieces live in ``bench/ckptbench/`` (workload, measure, savers, phases, figures,
cases, runner, report).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ckptbench import measure, report, runner  # noqa: E402
from ckptbench.cases import TUNING_VARIANTS, child_main  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    quick, full = runner.QUICK, runner.FULL
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"smaller sizes and cases (sizes {quick['sizes']} MiB)")
    p.add_argument("--json", metavar="PATH", help="write every figure to this JSON file")
    p.add_argument("--markdown", metavar="PATH",
                   help="write the tables as Markdown (as in bench/README.md)")
    p.add_argument("--sizes", type=float, nargs="+", metavar="MiB",
                   help=f"train-state sizes in MiB, params + Adam (default {full['sizes']})")
    p.add_argument("--dir", default=None,
                   help="where checkpoints and the disk-bandwidth file go (default: a new "
                        "temporary directory); a gs:// URL also works")
    p.add_argument("--interval", type=float, default=None, metavar="S",
                   help="seconds of training between saves; K = interval / step time "
                        f"(default {full['interval']}, --quick {quick['interval']})")
    p.add_argument("--steps", type=int, default=None, metavar="K",
                   help="save every K steps (overrides --interval)")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds of each measurement; figures are their medians "
                        f"(default {full['rounds']}, --quick {quick['rounds']})")
    p.add_argument("--blocking-reps", type=int, default=None,
                   help="extra saves of each kind for the blocking statistics (default "
                        f"{full['blocking_reps']}, --quick {quick['blocking_reps']})")
    p.add_argument("--layers", type=int, default=16, help="layers of the model (default 16)")
    p.add_argument("--batch", type=int, default=128, help="rows per train step (default 128)")
    p.add_argument("--leaves", type=int, default=None, metavar="N",
                   help="at least N arrays in the many-small-arrays case (default "
                        f"{full['leaves']}, --quick {quick['leaves']})")
    p.add_argument("--no-leaves", action="store_true", help="skip the many-small-arrays case")
    p.add_argument("--auto-size", type=float, default=None, metavar="MiB",
                   help="state size of the every='auto' run")
    p.add_argument("--auto-budget", type=float, default=0.05,
                   help="overhead_budget of the every='auto' run (default 0.05: the library "
                        "default 0.01 needs 5x longer runs to see a few saves)")
    p.add_argument("--auto-steps", type=int, default=None,
                   help="steps in each timed window of the every='auto' run")
    p.add_argument("--no-auto", action="store_true", help="skip the every='auto' run")
    p.add_argument("--tuning-size", type=float, default=None, metavar="MiB",
                   help="state size of the Orbax options comparison")
    p.add_argument("--tuning-variants", type=int, default=None, metavar="N",
                   help="compare the first N Orbax storage variants (default: all "
                        f"{len(TUNING_VARIANTS)}; with --quick none unless this is given)")
    p.add_argument("--no-tuning", action="store_true", help="skip the Orbax options comparison")
    p.add_argument("--no-prefault", action="store_true",
                   help="do not touch and free memory before each timed operation (on a VM "
                        "that hands free pages back to its host, timings then vary ~2x)")
    p.add_argument("--keep-logs", action="store_true", help="keep the subprocess logs")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _work_dir(directory: str | None) -> str:
    """A fresh directory for this run's checkpoints (a prefix under a gs:// URL)."""
    if directory is None:
        return tempfile.mkdtemp(prefix="jaxckpt-bench-")
    if measure.is_url(directory):
        return directory.rstrip("/") + f"/jaxckpt-bench-{os.getpid()}-{int(time.time())}"
    Path(directory).mkdir(parents=True, exist_ok=True)
    return tempfile.mkdtemp(prefix="jaxckpt-bench-", dir=directory)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        child_main(json.loads(args.child))
        return 0
    if args.worker:
        from ckptbench.workers import serve

        serve(json.loads(args.worker))
        return 0
    from rich.console import Console

    base = _work_dir(args.dir)
    logs = Path(tempfile.mkdtemp(prefix="jaxckpt-bench-logs-"))
    settings, jobs = runner.plan(args, base, logs)
    settings = {k: v for k, v in settings.items() if k != "dir"} | {
        "dir": args.dir or "(temporary)", "auto_budget": args.auto_budget}
    command = " ".join([os.path.basename(sys.executable), "bench/overhead.py"]
                       + (argv if argv is not None else sys.argv[1:]))
    result = runner.new_result(command, measure.machine(args.dir or base), settings)
    out = Console()
    try:
        failed = runner.run_all(os.path.abspath(__file__), jobs, result, logs,
                                Console(stderr=True))
    finally:
        measure.rmtree(base)
    report.print_tables(result, out)
    out.print(f"elapsed {result['elapsed_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=measure.json_default))
        out.print(f"wrote {args.json}")
    if args.markdown:
        Path(args.markdown).write_text(report.markdown(result))
        out.print(f"wrote {args.markdown}")
    if failed:
        out.print(f"[red]failed: {failed}; logs in {logs}[/]")
        return 1
    if not args.keep_logs:
        shutil.rmtree(logs, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
