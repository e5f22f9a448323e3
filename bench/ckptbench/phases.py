"""One measurement per function, each interleaving jaxckpt and raw Orbax alike.

A phase takes a :class:`Context` (the workload, both savers, the save interval) and
returns plain numbers; ``figures`` turns them into ratios. Orders are rotated or
alternated between rounds, so load from other processes hits every kind alike.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from ckptbench import measure
from ckptbench.progress import emit
from ckptbench.workload import Workload

KINDS = ("jaxckpt", "orbax")


@dataclasses.dataclass
class Context:
    w: Workload
    savers: dict[str, Any]  # kind -> JaxckptSaver / OrbaxSaver
    every: int  # steps of training between saves
    rss: measure.RssSampler | None
    prefault: bool = True  # measure.back_free_pages before each timed operation
    gstep: int = 0
    last_step: dict[str, int] = dataclasses.field(default_factory=dict)

    def back_pages(self) -> None:
        """Backed free pages for the next timed operation: as many as its page cache and
        a copy of the state can take (see ``measure.back_free_pages``)."""
        if self.prefault:
            measure.back_free_pages(2 * self.w.state_bytes + 64 * measure.MiB)

    def save(self, kind: str) -> float:
        """One save of the current state at a new step; returns how long it blocked.

        The metric saved improves at every save, so jaxckpt (best 1 + latest 1) replaces
        exactly one checkpoint per save, as raw Orbax (latest 2) does. With the training
        loss a save replaced 0, 1 or 2 checkpoints as the policy decided (deleting one of
        512 MiB takes ~0.35 s here), and medians compared different work.
        """
        self.gstep += self.every
        self.last_step[kind] = self.gstep
        self.w.loss()  # syncs with the step first: the blocking is the save's own
        return self.savers[kind].save(self.gstep, self.w.state, 1.0 / self.gstep)


def rotated(kinds, i: int) -> list:
    """``kinds`` starting at position ``i``: no kind always goes first."""
    kinds = list(kinds)
    i %= len(kinds)
    return kinds[i:] + kinds[:i]


def step_time(w: Workload, interval_s: float) -> float:
    """Seconds per step after compilation (at least 3 steps, up to ~2 s of them)."""
    emit("compiling")
    w.run(2)
    t, n = time.perf_counter(), 0
    while n < 3 or time.perf_counter() - t < min(2.0, interval_s / 2):
        w.run(1)
        n += 1
    return (time.perf_counter() - t) / n


def period(ctx: Context, kind: str) -> dict:
    """One period of "save every K steps": the save, K steps, any wait for the write.

    ``kind`` "none" is the same K steps without a save: the baseline.
    """
    ctx.back_pages()
    before, private_before = ctx.rss.now(), ctx.rss.now(private=True)
    cpu0, start = time.process_time(), time.perf_counter()
    blocked = ctx.save(kind) if kind != "none" else 0.0
    t1 = time.perf_counter()
    ctx.w.run(1)
    first = time.perf_counter() - t1
    ctx.w.run(ctx.every - 1)
    if kind != "none":
        ctx.savers[kind].wait()
    end = time.perf_counter()
    return {"s": end - start, "cpu_s": time.process_time() - cpu0, "blocked": blocked,
            "first_step": first, "peak_rss": ctx.rss.peak(start, end), "rss_before": before,
            "peak_private": ctx.rss.peak(start, end, private=True),
            "private_before": private_before}


def first_save(ctx: Context, kind: str = "jaxckpt") -> dict:
    """The process's first save of ``kind``, while training: the user's real peak memory
    (one-time thread pools and buffers included) over the same loop without saving. The
    other kinds' pools are warmed after it, outside every figure.

    The loop's own peak is measured first, over two periods of the same K steps without
    a save: a step's gradients and optimizer temporaries rise over the resident set at
    rest (by 0.3-0.9x the state at 32 MiB here), and a save does not cause them. Each
    figure comes twice: of the RSS, and of its private part (``measure.RssSampler``).
    """
    emit("first save (memory)")
    ctx.w.run(1)
    time.sleep(0.05)
    rss_train, private_train = ctx.rss.now(), ctx.rss.now(private=True)
    loops = [period(ctx, "none") for _ in range(2)]
    p = period(ctx, kind)
    for other in ctx.savers:
        if other != kind:
            ctx.save(other)
            ctx.savers[other].wait()
    loop_peak = max(rss_train, *(b["peak_rss"] for b in loops))
    loop_private = max(private_train, *(b["peak_private"] for b in loops))
    return {"rss_train": rss_train, "private_train": private_train, "loop": loops[0],
            "loops": loops, "period": p,
            "loop_peak_over_rest": loop_peak - rss_train,
            "peak_over_rest": p["peak_rss"] - rss_train,
            "peak_extra_rss": p["peak_rss"] - loop_peak,
            "peak_extra_private": p["peak_private"] - loop_private}


def interleaved_periods(ctx: Context, rounds: int) -> dict[str, list[dict]]:
    """``rounds`` rounds of (no save, jaxckpt, orbax) periods, the order rotated."""
    blocks: dict[str, list[dict]] = {"none": [], "jaxckpt": [], "orbax": []}
    for r in range(rounds):
        for kind in rotated(blocks, r):
            emit(f"round {r + 1}/{rounds}: {kind}")
            blocks[kind].append(period(ctx, kind))
    return blocks


def blocking_saves(ctx: Context, reps: int) -> dict[str, list[float]]:
    """More async saves for the blocking statistics, in alternating pairs."""
    emit("blocking")
    out: dict[str, list[float]] = {k: [] for k in KINDS}
    for i in range(reps):
        for kind in rotated(KINDS, i):
            out[kind].append(ctx.save(kind))
            ctx.w.run(1)
            ctx.savers[kind].wait()
    return out


def sync_saves(ctx: Context, saver, n: int = 2) -> list[float]:
    """Seconds of ``n`` synchronous saves (``async_save=False``)."""
    emit("sync saves")
    out = []
    for _ in range(n):
        ctx.w.run(1)
        ctx.gstep += 1
        out.append(saver.save(ctx.gstep, ctx.w.state, ctx.w.loss()))
    return out


def device_to_host(ctx: Context, n: int = 3) -> dict:
    """``jax.device_get`` and a real ``np.array(x, copy=True)`` of fresh buffers.

    A step runs before each copy: a jax.Array caches its host value, so a second
    device_get of the same array copies nothing. Returns the last real copy as ``host``.
    """
    import jax

    emit("device-to-host")
    w = ctx.w
    get, copy = [], []
    for _ in range(n):
        w.run(1)
        t = time.perf_counter()
        got = jax.device_get(jax.tree.leaves(w.state))
        get.append(time.perf_counter() - t)
        del got
    host = None
    for _ in range(n):
        host = None  # free the previous copy first, as a save would have
        w.run(1)
        ctx.back_pages()
        t = time.perf_counter()
        host = w.host_copy()
        copy.append(time.perf_counter() - t)
    return {"device_get": get, "copy": copy, "host": host}


def idle_writes(ctx: Context, host: list, base: str, reps: int) -> dict:
    """Full writes (save, then wait; no training meanwhile), each round next to a plain
    sequential write of as many bytes, so that both see the same disk and host load.

    Returns wall and CPU seconds per kind, the disk's write bandwidth per round, and the
    plain files (kept for ``cold_reads``).
    """
    wall: dict[str, list[float]] = {k: [] for k in KINDS}
    cpu: dict[str, list[float]] = {k: [] for k in KINDS}
    files, disk = [], []
    for i in range(reps):
        emit(f"writes {i + 1}/{reps}")
        files.append(f"{base}/disk-bandwidth-{i}.bin")
        measure.settle()
        ctx.back_pages()
        disk.append(measure.disk_write(host, files[-1]))
        for kind in rotated(KINDS, i):
            ctx.w.run(1)  # fresh buffers: on GPU a second save would reuse the host copy
            measure.settle()
            ctx.back_pages()

            def write(kind=kind):
                ctx.save(kind)
                ctx.savers[kind].wait()

            s, c = measure.timed(write)
            wall[kind].append(s)
            cpu[kind].append(c)
    return {"wall_s": wall, "cpu_s": cpu, "disk_write_Bps": disk, "files": files}


def cold_reads(ctx: Context, files: list[str], local: bool) -> dict:
    """Cold restores of each kind's newest checkpoint, each round next to a cold plain
    read of as many bytes; jaxckpt's restore is checked bit for bit against a copy taken
    before its save (the steps after the save donate the saved buffers).

    Each round restores in the order A B B A (B A A B the next round): whichever restore
    ran second in a round took 0.3-0.6 s longer at 512 MiB, for both kinds, and with one
    restore each per round the odd round decided which kind's median carried it."""
    import jax
    import numpy as np

    emit("reads")
    ctx.w.run(1)
    reference = ctx.w.host_copy()
    ctx.save("jaxckpt")
    ctx.w.run(2)
    ctx.savers["jaxckpt"].wait()
    target = ctx.w.abstract()
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    disk, exact = [], True
    for i, path in enumerate(files):
        ctx.back_pages()
        disk.append(measure.disk_read(path))  # evicts the file's pages itself
        order = rotated(KINDS, i)
        for kind in order + order[::-1]:
            saver = ctx.savers[kind]
            if local:
                measure.drop_page_cache(saver.directory)
            ctx.back_pages()
            t = time.perf_counter()
            restored = saver.restore(ctx.last_step[kind], target)
            jax.block_until_ready(restored)
            times[kind].append(time.perf_counter() - t)
            if kind == "jaxckpt":
                leaves = jax.tree.leaves(restored)
                exact = exact and len(leaves) == len(reference) and all(
                    np.array_equal(np.asarray(a), b) for a, b in zip(leaves, reference))
            del restored
    for path in files:
        measure.remove(path)
    jm = ctx.savers["jaxckpt"]
    t = time.perf_counter()
    jax.block_until_ready(jm.restore(ctx.last_step["jaxckpt"], target))
    warm = time.perf_counter() - t
    verify_s = verify_bytes = None
    if local:
        measure.drop_page_cache(jm.directory)
        verify_bytes = measure.tree_bytes(jm.directory)
        t = time.perf_counter()
        jm.verify()
        verify_s = time.perf_counter() - t
    return {"restore_s": times, "disk_read_Bps": disk, "exact": exact, "warm_s": warm,
            "verify_cold_s": verify_s, "verify_cold_bytes": verify_bytes}
