"""What one process measures of its own saver: one operation per function.

A function takes a :class:`Context` (the workload, this process's saver, the save
interval) and returns plain, JSON-able numbers. ``rounds`` runs them in one process per
kind (``workers``), interleaved; ``figures`` turns the numbers into ratios.
"""

from __future__ import annotations

import dataclasses
import functools
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
    host: list | None = None  # a host copy of the state (device_to_host's last)
    reference: list | None = None  # the state a restore must equal (before_reads)

    def back_pages(self) -> None:
        """Backed free pages for the next timed operation: as many as its page cache and
        a copy of the state can take (see ``measure.back_free_pages``)."""
        if self.prefault:
            measure.back_free_pages(2 * self.w.state_bytes + 64 * measure.MiB)

    @property
    def kind(self) -> str:
        """This process's saver ("none": the loop without one, and the floors)."""
        return next(iter(self.savers), "none")

    def wait(self, kind: str) -> None:
        """Wait for the write, then for what it replaced to be removed (``settled``), so
        that nothing of this operation runs on into the next one's measurement."""
        self.savers[kind].wait()
        self.savers[kind].settled()

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


def sampled(fn):
    """``fn(ctx, ...)`` with an RSS sampler in ``ctx.rss``, started for the call when the
    context has none: a worker samples only while it is measured, and an idle worker's
    sampler thread does not take the cores the measured one uses."""
    @functools.wraps(fn)
    def run(ctx: Context, *args, **kwargs):
        if ctx.rss is not None:
            return fn(ctx, *args, **kwargs)
        ctx.rss = measure.RssSampler()
        try:
            return fn(ctx, *args, **kwargs)
        finally:
            ctx.rss.close()
            ctx.rss = None
    return run


@sampled
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
        ctx.wait(kind)  # a removal left running is charged to this period
    end = time.perf_counter()
    return {"s": end - start, "cpu_s": time.process_time() - cpu0, "blocked": blocked,
            "first_step": first, "peak_rss": ctx.rss.peak(start, end), "rss_before": before,
            "peak_private": ctx.rss.peak(start, end, private=True),
            "private_before": private_before}


@sampled
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
            ctx.wait(other)
    loop_peak = max(rss_train, *(b["peak_rss"] for b in loops))
    loop_private = max(private_train, *(b["peak_private"] for b in loops))
    return {"rss_train": rss_train, "private_train": private_train, "loop": loops[0],
            "loops": loops, "period": p,
            "loop_peak_over_rest": loop_peak - rss_train,
            "peak_over_rest": p["peak_rss"] - rss_train,
            "peak_extra_rss": p["peak_rss"] - loop_peak,
            "peak_extra_private": p["peak_private"] - loop_private}


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


def warm(ctx: Context) -> None:
    """One save and its wait, outside every figure: thread pools and files exist."""
    ctx.save(ctx.kind)
    ctx.wait(ctx.kind)


def blocking_save(ctx: Context) -> float:
    """One more async save for the blocking statistics: how long ``save()`` blocked."""
    blocked = ctx.save(ctx.kind)
    ctx.w.run(1)
    ctx.wait(ctx.kind)
    return blocked


def idle_write(ctx: Context) -> list[float]:
    """Wall and CPU seconds of one full write: save, then wait, no training meanwhile.

    The wall time ends when ``wait()`` returns (what the user waits for); the CPU time
    once what the save replaced is removed from the disk too (``settled``): the same work
    for both kinds, wherever it runs.
    """
    ctx.w.run(1)  # fresh buffers: on GPU a second save would reuse the host copy
    measure.settle()
    ctx.back_pages()
    saver = ctx.savers[ctx.kind]
    cpu, start = time.process_time(), time.perf_counter()
    ctx.save(ctx.kind)
    saver.wait()
    wall = time.perf_counter() - start
    saver.settled()
    return [wall, time.process_time() - cpu]


def disk_write(ctx: Context, path: str) -> float:
    """The disk's plain sequential write bandwidth, of a host copy as big as the state
    (``device_to_host`` keeps it)."""
    measure.settle()
    ctx.back_pages()
    return measure.disk_write(ctx.host, path)


def disk_read(ctx: Context, path: str) -> float:
    ctx.back_pages()
    return measure.disk_read(path)  # evicts the file's pages itself


def remove(ctx: Context, paths: list[str]) -> None:
    for path in paths:
        measure.remove(path)


def bytes_on_disk(ctx: Context) -> int | None:
    return measure.tree_bytes(ctx.savers[ctx.kind].step_dir(ctx.last_step[ctx.kind]))


def before_reads(ctx: Context) -> None:
    """A last save, with a host copy of the state it saves: each restore is checked bit
    for bit against it (the steps after the save donate the saved buffers)."""
    ctx.w.run(1)
    ctx.reference = ctx.w.host_copy()
    warm(ctx)
    ctx.w.run(2)


def cold_restore(ctx: Context, local: bool) -> dict:
    """Seconds of one restore of the newest checkpoint from a cold page cache, and
    whether it equals the saved state (None without a reference copy)."""
    import jax
    import numpy as np

    saver = ctx.savers[ctx.kind]
    if local:
        measure.drop_page_cache(saver.directory)
    ctx.back_pages()
    t = time.perf_counter()
    restored = saver.restore(ctx.last_step[ctx.kind], ctx.w.abstract())
    jax.block_until_ready(restored)
    s = time.perf_counter() - t
    exact = None
    if ctx.reference is not None:
        leaves = jax.tree.leaves(restored)
        exact = len(leaves) == len(ctx.reference) and all(
            np.array_equal(np.asarray(a), b) for a, b in zip(leaves, ctx.reference))
    return {"s": s, "exact": exact}


def warm_restore_and_verify(ctx: Context, local: bool) -> dict:
    """A restore from a warm page cache, and a cold ``verify()`` (jaxckpt)."""
    import jax

    saver = ctx.savers[ctx.kind]
    t = time.perf_counter()
    jax.block_until_ready(saver.restore(ctx.last_step[ctx.kind], ctx.w.abstract()))
    warm_s = time.perf_counter() - t
    verify_s = verify_bytes = None
    if local:
        measure.drop_page_cache(saver.directory)
        verify_bytes = measure.tree_bytes(saver.directory)
        t = time.perf_counter()
        saver.verify()
        verify_s = time.perf_counter() - t
    return {"warm_s": warm_s, "verify_cold_s": verify_s, "verify_cold_bytes": verify_bytes}


def leaf_save(ctx: Context) -> list[float]:
    """Many small leaves: seconds of one save and its wait, and how long it blocked."""
    ctx.w.run(1)
    ctx.back_pages()
    held = []

    def write():
        held.append(ctx.save(ctx.kind))
        ctx.savers[ctx.kind].wait()

    wall = measure.timed(write)[0]
    ctx.savers[ctx.kind].settled()
    return [wall, held[0]]


def leaf_restore(ctx: Context, local: bool) -> float:
    return cold_restore(ctx, local)["s"]


