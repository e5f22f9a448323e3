"""The parent side: plan the cases, run each in a fresh subprocess, collect the results.

The child is ``bench/overhead.py --child CFG``; it reports progress on its stdout
(``progress``) and writes its result as JSON. A failed case is recorded with the tail
of its log, and the other cases still run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ckptbench import measure, progress, report, savers
from ckptbench.cases import TUNING_VARIANTS, units

# --quick takes 15 rounds and 12 extra blocking pairs: with 3 and 5, a figure's median moved
# by more than its target's margin between runs on this shared 2-core machine. Fifteen (7,
# then 9, until session 20, when one run's per-round throughput quotients spread over
# 0.88-1.27): a narrower median, and each of the three kinds of period in each position of
# a round equally often.
QUICK = dict(sizes=[32.0, 128.0, 512.0], interval=4.0, rounds=15, blocking_reps=12,
             auto_size=32.0, tuning_size=64.0, leaves=1000)
FULL = dict(sizes=[128.0, 512.0, 2048.0], interval=6.0, rounds=3, blocking_reps=4,
            auto_size=128.0, tuning_size=256.0, leaves=4000)


def plan(args, base: str, work: Path) -> tuple[dict, list[dict]]:
    """The common settings and one config per case, in the order they run."""
    preset = QUICK if args.quick else FULL
    sizes = args.sizes or preset["sizes"]
    common = dict(dir=base, interval=args.interval or preset["interval"], steps=args.steps,
                  rounds=args.rounds or preset["rounds"],
                  blocking_reps=(preset["blocking_reps"] if args.blocking_reps is None
                                 else args.blocking_reps),
                  layers=args.layers, batch=args.batch, quick=args.quick,
                  prefault=not args.no_prefault)
    jobs = []
    for s in sizes:
        jobs.append(dict(common, job="size", size_mb=s, label=f"{s:g} MiB"))
        jobs.append(dict(common, job="first", size_mb=s,
                         label=f"raw Orbax's first save, {s:g} MiB"))
    if not args.no_leaves:
        n = args.leaves or preset["leaves"]
        jobs.append(dict(common, job="leaves", leaves=n, label=f"{n} small arrays"))
    # --quick leaves the storage-options study out unless --tuning-variants asks for it.
    if not args.no_tuning and (not args.quick or args.tuning_variants):
        size = args.tuning_size or (preset["tuning_size"] if not args.sizes else min(sizes))
        for variant in list(TUNING_VARIANTS)[:args.tuning_variants or len(TUNING_VARIANTS)]:
            jobs.append(dict(common, job="tuning", size_mb=size, tuning_reps=2, variant=variant,
                             label=f"Orbax {variant}, {size:g} MiB"))
    if not args.no_auto:
        size = args.auto_size or (preset["auto_size"] if not args.sizes else min(sizes))
        jobs.append(dict(common, job="auto", size_mb=size, auto_budget=args.auto_budget,
                         auto_steps=args.auto_steps, label=f"every='auto', {size:g} MiB"))
    for i, job in enumerate(jobs):
        job["out"] = str(work / f"job{i}.json")
    return common | {"sizes_mb": sizes}, jobs


def run_child(script: str, cfg: dict, bar, task, log_path: Path) -> dict:
    """Run one case in a fresh process; its result, or ``{"error", "log_tail"}``."""
    cmd = [sys.executable, script, "--child", json.dumps(cfg)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        try:
            for line in proc.stdout:
                msg = progress.parse(line)
                if msg is not None:
                    bar.update(task, advance=msg["advance"],
                               description=f"{cfg['label']}: {msg['desc']}")
            proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    if proc.returncode != 0 or not Path(cfg["out"]).exists():
        tail = log_path.read_text().strip().splitlines()[-25:]
        return {"error": f"exit code {proc.returncode}", "log_tail": tail}
    bar.update(task, completed=units(cfg), description=f"{cfg['label']}: done")
    return json.loads(Path(cfg["out"]).read_text())


def new_result(command: str, machine: dict, settings: dict) -> dict:
    return {"benchmark": "jaxckpt checkpoint overhead", "version": 2,
            "command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine, "config": settings, "targets": report.targets(),
            "orbax": savers.describe(),
            "sizes": [], "orbax_first_saves": [], "many_leaves": None, "tuning": None,
            "auto": None}


def record(result: dict, job: dict, res: dict) -> None:
    """File one case's result under its place in the result document."""
    if job["job"] == "size":
        result["sizes"].append(res if "error" not in res else {"size_mb": job["size_mb"], **res})
    elif job["job"] == "first":
        _beside_size(result, job["size_mb"], res)
    elif job["job"] == "leaves":
        result["many_leaves"] = res
    elif job["job"] == "tuning":
        result["tuning"] = result["tuning"] or {
            "size_mb": job["size_mb"], "variants": {},
            "note": "raw Orbax CheckpointManager, one fresh process per variant"}
        result["tuning"]["variants"][job["variant"]] = res
        result["tuning"].setdefault("state_bytes", res.get("state_bytes"))
    else:
        result["auto"] = res


def _beside_size(result: dict, size_mb: float, res: dict) -> None:
    """Raw Orbax's first save (its own process) filed with the size it belongs to."""
    result["orbax_first_saves"].append(res if "error" not in res else {"size_mb": size_mb, **res})
    size = next((s for s in result["sizes"] if s.get("size_mb") == size_mb and "raw" in s), None)
    if size is None or "error" in res:
        return
    jaxckpt = size["raw"]["first_save_peak_extra_private_bytes"]
    orbax = res["first"]["peak_extra_private"]
    size["raw"]["orbax_first_save_peak_extra_rss_bytes"] = res["first"]["peak_extra_rss"]
    size["raw"]["orbax_first_save_peak_extra_private_bytes"] = orbax
    size["raw"]["orbax_first_save_peak_over_rest_bytes"] = res["first"]["peak_over_rest"]
    size["raw"]["orbax_first_save_peak_ram_over_state"] = res["peak_ram_over_state"]
    size["raw"]["orbax_first_save_peak_rss_over_state"] = res["peak_rss_over_state"]
    if orbax > 0:  # a state too small to show in the RSS has no ratio
        size["ratios"]["first_save_peak_ram_over_orbax"] = jaxckpt / orbax


def run_all(script: str, jobs: list[dict], result: dict, work: Path, console) -> list[str]:
    """Run every case with a progress bar; returns the labels of those that failed."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn,
                               TextColumn, TimeElapsedColumn)

    failed = []
    start = time.perf_counter()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
        tasks = [bar.add_task(j["label"], total=units(j), start=False) for j in jobs]
        for job, task in zip(jobs, tasks):
            bar.start_task(task)
            t = time.perf_counter()
            res = run_child(script, job, bar, task, work / f"{Path(job['out']).stem}.log")
            res["job_elapsed_s"] = time.perf_counter() - t
            record(result, job, res)
            if "error" in res:
                failed.append(job["label"])
    result["elapsed_s"] = time.perf_counter() - start
    result["machine"]["load_avg_at_end"] = os.getloadavg()
    result["machine"]["cpu_pressure_at_end"] = measure.cpu_pressure()
    result["summary"] = report.summary(result)
    return failed
