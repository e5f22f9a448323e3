"""What one fresh subprocess measures: a state size, many small leaves, auto, tuning.

Each case runs in its own process (started by ``runner``), so host-memory figures start
clean and one case's allocator state does not leak into the next. A case returns a
JSON-able dict; ``child_main`` adds the device, the versions and the host load.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ckptbench import figures, measure, phases, rounds, savers, workers, workload
from ckptbench.progress import emit

DISK_METHOD = {True: "the state's bytes in 64 MiB writes to one file, then fsync; read in "
                     "64 MiB reads after posix_fadvise(DONTNEED) evicted its pages",
               False: "one object PUT / GET via etils.epath"}

IDLE_ROUNDS = 12
"""At least this many rounds of idle writes and cold reads, the figures most exposed to
page and disk noise (7 until 2026-12-03: a 512 MiB median of 7 idle saves moved by
+-15 % between runs, three times the CPU target's margin; then 11). An even number: each
kind goes first in half of the rounds."""


def idle_rounds(period_rounds: int) -> int:
    """Rounds of idle writes and cold reads: as many as of periods, at least
    ``IDLE_ROUNDS``, and even."""
    n = max(period_rounds, IDLE_ROUNDS)
    return n + n % 2


def _base(cfg: dict, name: str) -> tuple[str, bool]:
    local = not measure.is_url(cfg["dir"])
    base = cfg["dir"].rstrip("/") + "/" + name
    if local:
        Path(base).mkdir(parents=True, exist_ok=True)
    return base, local


SCRIPT = str(Path(__file__).resolve().parents[1] / "overhead.py")


def _workers(cfg: dict, base: str, kinds: tuple[str, ...]) -> dict[str, workers.Worker]:
    return workers.start(SCRIPT, cfg | {"base": base}, kinds)


def _training(cfg: dict) -> tuple[workload.Workload, float, int]:
    """The state of ``cfg``'s size, its step time and the steps between two saves."""
    emit("building state")
    w = workload.mlp(cfg["size_mb"], cfg["layers"], cfg["batch"])
    step_s = phases.step_time(w, cfg["interval"])
    return w, step_s, cfg["steps"] or max(2, round(cfg["interval"] / step_s))


def run_size(cfg: dict) -> dict:
    """Every figure for one state size: the phases in order, then ``figures``. Each kind
    runs in a worker process of its own (``workers``), with the same state."""
    base, local = _base(cfg, f"size-{cfg['size_mb']:g}")
    emit("building state")
    sides = _workers(cfg, base, ("none", "jaxckpt", "orbax"))
    try:
        emit("compiling")
        step_s = sides["none"].call("step_time", interval_s=cfg["interval"])
        every = cfg["steps"] or max(2, round(cfg["interval"] / step_s))
        for side in sides.values():
            side.call("set_every", every=every)
        emit("first save (memory)")
        first = sides["jaxckpt"].call("first_save", kind="jaxckpt")
        sides["orbax"].call("warm")
        blocks = rounds.interleaved_periods(sides, cfg["rounds"])
        extra = rounds.blocking_saves(sides, cfg["blocking_reps"])
        emit("sync saves")
        sync = sides["jaxckpt"].call("sync_saves", directory=f"{base}/sync")
        emit("device-to-host")
        d2h = sides["none"].call("device_to_host")
        writes = rounds.idle_writes(sides, base, idle_rounds(cfg["rounds"]))
        on_disk = sides["jaxckpt"].call("bytes_on_disk")
        reads = rounds.cold_reads(sides, writes.pop("files"), local)
    finally:
        workers.close_all(sides)
        if local:
            measure.rmtree(base)
    info = sides["jaxckpt"].info
    ratios, raw = figures.size_figures({
        "state_bytes": info["state_bytes"], "every": every, "step_s": step_s,
        "on_cpu": info["platform"] == "cpu", "rounds": cfg["rounds"], "model": info["model"],
        "platform": info["platform"], "first": first, "blocks": blocks,
        "extra_blocking": extra, "sync": sync, "d2h": d2h, "writes": writes, "reads": reads,
        "bytes_on_disk": on_disk, "orbax": savers.describe(),
        "disk_method": DISK_METHOD[local]})
    raw["processes"] = {k: s.info["pid"] for k, s in sides.items()}
    return {"size_mb": cfg["size_mb"], "state_bytes": info["state_bytes"], "ratios": ratios,
            "raw": raw}


def run_first_save(cfg: dict) -> dict:
    """Raw Orbax's first save in a fresh process of its own, measured as ``run_size``
    measures jaxckpt's (same state, same save interval): what a user of plain Orbax
    pays for its one-time pools and the buffers the training step cannot reuse while
    the save holds them. Without it, jaxckpt's first save had no figure to stand beside.
    """
    base, local = _base(cfg, f"first-{cfg['size_mb']:g}")
    rss = measure.RssSampler()
    w, _, every = _training(cfg)
    saver = savers.OrbaxSaver(f"{base}/orbax")
    ctx = phases.Context(w, {"orbax": saver}, every, rss, prefault=cfg["prefault"])
    try:
        first = phases.first_save(ctx, "orbax")
    finally:
        saver.close()
        rss.close()
        if local:
            measure.rmtree(base)
    return {"size_mb": cfg["size_mb"], "state_bytes": w.state_bytes, "every": every,
            "first": first, "peak_ram_over_state": first["peak_extra_private"] / w.state_bytes,
            "peak_rss_over_state": first["peak_extra_rss"] / w.state_bytes}


def run_leaves(cfg: dict) -> dict:
    """A state of many small arrays: save (then wait) and cold restore, per leaf; each
    kind in a worker process of its own."""
    base, local = _base(cfg, "leaves")
    emit("building state")
    kinds = phases.KINDS
    sides = _workers(cfg, base, kinds)
    blocked = {k: [] for k in kinds}
    save_s = {k: [] for k in kinds}
    restore_s = {k: [] for k in kinds}
    try:
        emit("compiling")
        for kind in kinds:  # warm each side's thread pools, outside every figure
            sides[kind].call("warm")
        for r in range(cfg["rounds"]):
            emit(f"saves {r + 1}/{cfg['rounds']}")
            for kind in phases.rotated(kinds, r):
                s, held = sides[kind].call("leaf_save")
                save_s[kind].append(s)
                blocked[kind].append(held)
        on_disk = sides["jaxckpt"].call("bytes_on_disk")
        emit("restores")
        for r in range(cfg["rounds"]):
            for kind in phases.rotated(kinds, r):
                restore_s[kind].append(sides[kind].call("leaf_restore", local=local))
    finally:
        workers.close_all(sides)
        if local:
            measure.rmtree(base)
    info = sides["jaxckpt"].info
    ratios, raw = figures.leaves_figures({
        "n_leaves": info["n_leaves"], "state_bytes": info["state_bytes"],
        "model": info["model"], "blocked_s": blocked, "save_s": save_s,
        "restore_s": restore_s, "bytes_on_disk": on_disk})
    return {"n_leaves": info["n_leaves"], "state_bytes": info["state_bytes"],
            "ratios": ratios, "raw": raw}


def run_auto(cfg: dict) -> dict:
    """``every="auto"``: does the interval the manager picks hold the overhead budget?

    ``save()`` is called at every step and decides itself; the interval it chose is read
    from the steps where ``save()`` returned True (public API only). After calibration
    (the first save, to measure the cost, and the second, at the first chosen interval)
    a window of two intervals with the manager is timed between two equal windows
    without it; the overhead is the extra time per step, which ``overhead_budget`` bounds.
    """
    import jax

    import jaxckpt

    base, local = _base(cfg, "auto")
    emit("building state")
    w = workload.mlp(cfg["size_mb"], cfg["layers"], cfg["batch"])
    emit("compiling")
    w.run(2)
    t = time.perf_counter()
    w.run(5)
    step_s = (time.perf_counter() - t) / 5
    policy = jaxckpt.CheckpointPolicy(every="auto", overhead_budget=cfg["auto_budget"],
                                      keep_latest=1)
    mngr = jaxckpt.CheckpointManager(f"{base}/ckpt", policy)
    saved_at: list[int] = []
    gstep = 0

    def train(n: int, manager: bool, deadline: float | None = None) -> int:
        nonlocal gstep
        done = 0
        for _ in range(n):
            w.state, w.last_loss = w.step(w.state)
            gstep += 1
            done += 1
            if manager and mngr.save(gstep, w.state):
                saved_at.append(gstep)
            if deadline is not None and time.perf_counter() > deadline:
                break
        jax.block_until_ready(w.state)
        return done

    try:
        emit("calibrating")
        t_cal = time.perf_counter()
        deadline = t_cal + max(60.0, 100 * step_s)
        while len(saved_at) < 2 and time.perf_counter() < deadline:
            train(1, manager=True)
        mngr.wait()
        calibration = {"steps": gstep, "saves": list(saved_at), "s": time.perf_counter() - t_cal}
        if len(saved_at) < 2:
            raise RuntimeError(f"every='auto' saved at steps {saved_at} in {gstep} steps "
                               f"({calibration['s']:.0f} s): it chose no interval.")
        first_every = saved_at[1] - saved_at[0]
        window = cfg["auto_steps"] or max(10, 2 * first_every + 1)
        emit(f"baseline ({window} steps)")
        t = time.perf_counter()
        train(window, manager=False)
        base1 = time.perf_counter() - t
        emit(f"every='auto' ({window} steps)")
        # A broken interval could save at every step; cap the window at 3x the budget.
        cap = time.perf_counter() + 3 * base1 * (1 + cfg["auto_budget"]) + 10.0
        before = len(saved_at)
        t = time.perf_counter()
        done = train(window, manager=True, deadline=cap)
        mngr.wait()
        auto_s = time.perf_counter() - t
        emit(f"baseline ({window} steps)")
        t = time.perf_counter()
        train(window, manager=False)
        base2 = time.perf_counter() - t
    finally:
        mngr.close()
        if local:
            measure.rmtree(base)
    gaps = [b - a for a, b in zip(saved_at, saved_at[1:])]
    base_step = (base1 + base2) / (2 * window)
    overhead = (auto_s / done) / base_step - 1.0
    return {
        "size_mb": cfg["size_mb"], "state_bytes": w.state_bytes, "model": w.model,
        "overhead_budget": cfg["auto_budget"], "mtbf_hours": None, "step_s": step_s,
        "calibration": {**calibration, "first_every_n_steps": first_every},
        "chosen_every_n_steps": first_every, "final_every_n_steps": gaps[-1],
        "save_steps": saved_at, "save_gaps": gaps,
        "window_steps": window, "window_steps_done": done,
        "window_saves": len(saved_at) - before,
        "expected_window_saves": [done // max(gaps), math.ceil(done / min(gaps))],
        "baseline_s": [base1, base2], "auto_s": auto_s,
        "measured_overhead": overhead, "budget_held": overhead <= cfg["auto_budget"],
    }


TUNING_VARIANTS = {  # name: PyTreeCheckpointHandler options (None: StandardCheckpointHandler())
    "orbax default (zarr2+OCDBT+zstd)": None,
    "no compression": dict(use_compression=False),
    "no compression, no OCDBT": dict(use_compression=False, use_ocdbt=False),
    "zarr3, no compression": dict(use_zarr3=True, use_compression=False),
    "zarr3 + zstd": dict(use_zarr3=True),
}


def run_tuning(cfg: dict) -> dict:
    """One Orbax storage variant on a train state (raw Orbax only).

    The first save's peak extra host memory while training goes on (a fresh process, so
    nothing is pre-allocated), the first step after it, then idle writes (wall and CPU
    seconds: on a small host the background write runs on the cores the step uses) and
    a cold restore.
    """
    import jax
    import orbax.checkpoint as ocp

    options = TUNING_VARIANTS[cfg["variant"]]
    base, local = _base(cfg, f"tuning-{list(TUNING_VARIANTS).index(cfg['variant'])}")
    emit("building state")
    rss = measure.RssSampler()
    w = workload.mlp(cfg["size_mb"], cfg["layers"], cfg["batch"])
    w.run(2)
    t = time.perf_counter()
    w.run(3)
    step_s = (time.perf_counter() - t) / 3
    target = w.abstract()
    if options is None:
        handler, save_args = ocp.StandardCheckpointHandler(), ocp.args.StandardSave
        restore_args = ocp.args.StandardRestore(target)
    else:
        handler, save_args = ocp.PyTreeCheckpointHandler(**options), ocp.args.PyTreeSave
        restore_args = ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))
    mngr = ocp.CheckpointManager(base, options=ocp.CheckpointManagerOptions(
        max_to_keep=1, enable_async_checkpointing=True), item_handlers={"state": handler})
    try:
        emit("first save (memory)")
        time.sleep(0.05)
        rss0, private0 = rss.now(), rss.now(private=True)
        t0 = time.perf_counter()
        mngr.save(0, args=ocp.args.Composite(state=save_args(w.state)))
        t1 = time.perf_counter()
        w.run(1)
        first_step = time.perf_counter() - t1
        w.run(2)
        mngr.wait_until_finished()
        end = time.perf_counter()
        first_extra = rss.peak(t0, end) - rss0
        first_private = rss.peak(t0, end, private=True) - private0

        emit("idle writes")
        walls, cpus = [], []
        for i in range(1, 1 + cfg["tuning_reps"]):
            w.run(1)

            def write(i=i):
                mngr.save(i, args=ocp.args.Composite(state=save_args(w.state)))
                mngr.wait_until_finished()

            s, c = measure.timed(write)
            walls.append(s)
            cpus.append(c)
        last = cfg["tuning_reps"]
        on_disk = measure.tree_bytes(f"{base}/{last}")
        emit("cold restore")
        if local:
            measure.drop_page_cache(f"{base}/{last}")
        t = time.perf_counter()
        jax.block_until_ready(
            mngr.restore(last, args=ocp.args.Composite(state=restore_args))["state"])
        restore_s = time.perf_counter() - t
    finally:
        mngr.close()
        rss.close()
        if local:
            measure.rmtree(base)
    n = w.state_bytes
    return {"variant": cfg["variant"], "options": options, "size_mb": cfg["size_mb"],
            "state_bytes": n, "step_s": step_s,
            "first_save_peak_extra_rss_bytes": first_extra,
            "first_save_peak_extra_private_bytes": first_private,
            "first_save_peak_ram_over_state": first_private / n,
            "first_save_peak_rss_over_state": first_extra / n,
            "first_step_after_save_s": first_step,
            "persist_s": measure.median(walls), "persist_s_all": walls,
            "persist_Bps": n / measure.median(walls),
            "cpu_s": measure.median(cpus), "cpu_s_all": cpus,
            "bytes_on_disk": on_disk, "cold_restore_s": restore_s,
            "restore_Bps": n / restore_s}


CASES = {"size": run_size, "first": run_first_save, "leaves": run_leaves,
         "auto": run_auto, "tuning": run_tuning}


def units(cfg: dict) -> int:
    """How many progress messages a case sends (the length of its progress bar)."""
    return {"size": lambda: 7 + 4 * cfg["rounds"], "first": lambda: 3,
            "leaves": lambda: 3 + cfg["rounds"], "auto": lambda: 6,
            "tuning": lambda: 4}[cfg["job"]]()


def child_main(cfg: dict) -> None:
    """Run one case in this (fresh) process and write its result to ``cfg["out"]``."""
    load_start = measure.load()
    result = CASES[cfg["job"]](cfg)
    result["device"] = measure.versions()
    result["load"] = {"start": load_start, "end": measure.load()}
    Path(cfg["out"]).write_text(json.dumps(result, indent=1, default=measure.json_default))
