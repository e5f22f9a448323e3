"""What checkpointing costs a training loop: jaxckpt against raw Orbax and the hardware floor.

Synopsis::

    python bench/overhead.py --quick --json out.json     # 3 small sizes, < 5 min on 2 cores
    python bench/overhead.py --sizes 128 512 2048        # state sizes in MiB (params + Adam)
    python bench/overhead.py --sizes 4096 16384 --dir /mnt/fast   # a GPU host, another disk

For each state size a fresh subprocess (so host-memory figures start clean) builds a train
state of random values (parameters plus Adam moments), jit-compiles a real train step that
donates the state, and measures in the same run:

* ``throughput_ratio``: steps/s with a jaxckpt async save every K steps ÷ without saving.
  Blocks of K steps without saving (A), with a jaxckpt save (B) and with a raw Orbax save
  (C) are interleaved, so load from other processes hits all three alike. A B block is one
  full period of "save every K steps": the save call, K steps, and any wait for the write.
* ``blocking_over_d2h``: median time ``save()`` blocks ÷ a plain device-to-host copy of the
  state. On CPU ``jax.device_get`` is a zero-copy view, so the floor is a real copy
  (``np.array(x, copy=True)``); on GPU/TPU it is ``jax.device_get``. Both are reported.
* ``policy_over_orbax``: jaxckpt's median blocking per save ÷ that of a raw
  ``orbax.checkpoint.CheckpointManager`` with jaxckpt's own options and handlers.
* ``persist_over_disk``: bytes/s of a full background write (save, then wait, no training)
  ÷ the disk's sequential write bandwidth (the same bytes to one file, fsync'd), each pair
  measured back to back so both see the same disk and host load.
* ``restore_over_disk``: bytes/s of a cold restore ÷ the disk's cold sequential read
  bandwidth, paired the same way; "cold" = the files' pages evicted with
  ``posix_fadvise(DONTNEED)`` (no root needed; ``drop_caches`` would hit every process).
* ``peak_ram_over_state``: peak host RSS during the process's first save (training goes on
  meanwhile) minus the RSS of the same loop just before, ÷ state bytes: what checkpointing
  adds to a run's peak memory. RSS is sampled every 2 ms in a thread.

plus synchronous saves, p50/p95 blocking, the step after a save, and the raw figures. An
``every="auto"`` run checks that the interval the manager picks holds its overhead budget,
and a tuning run compares Orbax storage options (compression, OCDBT, zarr3) on the same state.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

PROGRESS = "@@bench "  # child -> parent progress lines on stdout
_MiB = 2 ** 20

TARGETS = {  # ratio: (comparison, target) on CPU
    "throughput_ratio": (">=", 0.97),
    "blocking_over_d2h": ("<=", 1.2),
    "policy_over_orbax": ("<=", 1.05),
    "persist_over_disk": (">=", 0.7),
    "restore_over_disk": (">=", 0.7),
    "peak_ram_over_state": ("<=", 1.2),
}

QUICK = dict(sizes=[32.0, 128.0, 512.0], interval=4.0, rounds=2, blocking_reps=4,
             auto_size=32.0, tuning_size=64.0)
FULL = dict(sizes=[128.0, 512.0, 2048.0], interval=6.0, rounds=2, blocking_reps=4,
            auto_size=128.0, tuning_size=256.0)


# ======================================================================================
# child side: runs one job (a size, the every="auto" run or the tuning run) in a fresh
# process and writes its result as JSON.
# ======================================================================================


def _emit(desc: str, advance: int = 1) -> None:
    print(PROGRESS + json.dumps({"desc": desc, "advance": advance}), flush=True)


class RssSampler:
    """Samples this process's resident set size in a thread (peak memory of a window)."""

    def __init__(self, period_s: float = 0.002):
        import psutil
        self._proc = psutil.Process()
        self._period = period_s
        self._lock = threading.Lock()
        self._samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            sample = (time.perf_counter(), self._proc.memory_info().rss)
            with self._lock:
                self._samples.append(sample)
            time.sleep(self._period)

    def now(self) -> int:
        return self._proc.memory_info().rss

    def peak(self, start: float, end: float) -> int:
        with self._lock:
            inside = [rss for t, rss in self._samples if start <= t <= end]
        return max(inside) if inside else self.now()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _drop_page_cache(path: Path) -> None:
    """Evict a file's (or a tree's) pages, so the next read comes from the disk."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)  # only clean pages can be evicted
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _is_url(directory: str) -> bool:
    return "://" in directory


def _tree_bytes(directory: str) -> int | None:
    if _is_url(directory):
        return None
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


_CHUNK = 64 * _MiB


def _disk_write(host_leaves, path: str) -> float:
    """Bytes/s of writing ``host_leaves`` sequentially to one new file, fsync included.

    For a URL (gs://...) the bytes go as one object through etils.epath.
    """
    import numpy as np

    flat = [np.ascontiguousarray(x).reshape(-1).view(np.uint8) for x in host_leaves]
    n = sum(x.size for x in flat)
    if _is_url(path):
        from etils import epath
        blob = b"".join(x.tobytes() for x in flat)
        t = time.perf_counter()
        epath.Path(path).write_bytes(blob)
        return n / (time.perf_counter() - t)
    t = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for x in flat:
            mv = memoryview(x)
            for o in range(0, x.size, _CHUNK):
                f.write(mv[o:o + _CHUNK])
        os.fsync(f.fileno())
    return n / (time.perf_counter() - t)


def _disk_read(path: str) -> float:
    """Bytes/s of reading a file sequentially with its pages evicted from the cache first."""
    import numpy as np

    if _is_url(path):
        from etils import epath
        t = time.perf_counter()
        n = len(epath.Path(path).read_bytes())
        return n / (time.perf_counter() - t)
    _drop_page_cache(Path(path))
    n = os.path.getsize(path)
    out = np.empty(n, np.uint8)
    mv = memoryview(out)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        o = 0
        while o < n:
            got = f.readinto(mv[o:o + _CHUNK])
            if not got:
                break
            o += got
    return n / (time.perf_counter() - t)


def _remove(path: str) -> None:
    if _is_url(path):
        from etils import epath
        epath.Path(path).unlink()
    else:
        os.remove(path)


def _model(size_mb: float, layers: int, batch: int):
    """A train state of about ``size_mb`` MiB (params + Adam) and a jitted, donating step.

    The model is a stack of ``layers`` square tanh layers of width d; a step draws a batch
    of ``batch`` random rows, back-propagates a mean-square loss through every layer and
    applies Adam: about 6 * batch * params flops, plus Adam's pass over 3 * params floats.
    """
    import jax
    import jax.numpy as jnp
    import optax

    import jaxckpt

    params_n = max(1, int(size_mb * _MiB / 12))  # f32 params + two f32 Adam moments
    width = max(8, int(math.sqrt(params_n / layers)))
    layers = max(1, round(params_n / width ** 2))
    tx = optax.adam(1e-4)

    @jax.jit
    def init(key):
        keys = jax.random.split(key, 3 * layers)
        params = {f"layer{i:03d}": jax.random.normal(keys[i], (width, width)) / math.sqrt(width)
                  for i in range(layers)}
        state = jaxckpt.TrainState.create(params=params, tx=tx, rng=0)
        adam = state.opt_state[0]
        # Random moments, not zeros: zeros compress to nothing and make every write free.
        mu = {k: 1e-3 * jax.random.normal(keys[layers + i], (width, width))
              for i, k in enumerate(sorted(params))}
        nu = {k: 1e-6 * jax.random.uniform(keys[2 * layers + i], (width, width))
              for i, k in enumerate(sorted(params))}
        opt_state = (adam._replace(mu=mu, nu=nu),) + tuple(state.opt_state[1:])
        return state.replace(opt_state=opt_state)

    def loss_fn(params, x):
        h = x
        for k in sorted(params):
            h = jnp.tanh(h @ params[k])
        return jnp.mean(h * h)

    def step(state):
        x = jax.random.normal(state.step_rng(), (batch, width))
        loss, grads = jax.value_and_grad(loss_fn)(state.params, x)
        return state.apply_gradients(grads), loss

    state = init(jax.random.key(0))
    step = jax.jit(step, donate_argnums=0)
    return state, step, {"width": width, "layers": layers, "params": layers * width ** 2,
                         "batch": batch, "flops_per_step": 6 * batch * layers * width ** 2}


def _state_handler_info(handler) -> dict:
    impl = getattr(handler, "_impl", handler)
    info = {"handler": type(handler).__name__}
    for attr in ("_use_ocdbt", "_use_zarr3", "_use_compression", "_save_concurrent_bytes",
                 "_restore_concurrent_bytes"):
        for obj in (impl, getattr(impl, "_handler_impl", None)):
            if obj is not None and hasattr(obj, attr):
                value = getattr(obj, attr)
                info[attr.lstrip("_")] = value if isinstance(value, (bool, int, type(None))) \
                    else str(value)
                break
    return info


def _raw_orbax_like(jm, directory: str):
    """A raw ``orbax.checkpoint.CheckpointManager`` with jaxckpt's options and handlers.

    Reads them from the jaxckpt manager's Orbax manager (private attributes, so that a
    change to jaxckpt's Orbax configuration is compared like for like).
    """
    import orbax.checkpoint as ocp

    options = dataclasses.replace(jm._ocp._options)
    return ocp.CheckpointManager(directory, options=options, item_handlers=_items(jm._ocp))


def _items(orbax_manager) -> dict:
    """The item handlers an Orbax CheckpointManager was built with, by item name."""
    registry = orbax_manager._checkpointer._handler._handler_registry._registry
    return {name: h for (name, _), h in registry.items() if name in ("state", "meta",
                                                                      "data_state")}


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def _run_size(cfg: dict) -> dict:
    """All measurements for one state size (see the module docstring)."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    import jaxckpt

    local = not _is_url(cfg["dir"])
    base = cfg["dir"].rstrip("/") + f"/size-{cfg['size_mb']:g}"
    if local:
        Path(base).mkdir(parents=True, exist_ok=True)
    med = statistics.median
    rss = RssSampler()
    _emit("building state")
    state, step, model = _model(cfg["size_mb"], cfg["layers"], cfg["batch"])
    leaves = jax.tree.leaves(state)
    state_bytes = sum(x.nbytes for x in leaves)
    platform_name = next(iter(leaves[0].devices())).platform
    on_cpu = platform_name == "cpu"
    last_loss = None

    def run(n: int) -> None:
        nonlocal state, last_loss
        for _ in range(n):
            state, last_loss = step(state)
        jax.block_until_ready(state)

    _emit("compiling")
    run(2)
    t, n = time.perf_counter(), 0
    while n < 3 or time.perf_counter() - t < min(2.0, cfg["interval"] / 2):
        run(1)
        n += 1
    step_s = (time.perf_counter() - t) / n
    every = cfg["steps"] or max(2, round(cfg["interval"] / step_s))

    policy = jaxckpt.CheckpointPolicy(monitor="loss", keep_best=1, keep_latest=1)
    jm = jaxckpt.CheckpointManager(f"{base}/jaxckpt", policy)
    om = _raw_orbax_like(jm, f"{base}/orbax")
    handler_info = _state_handler_info(_items(jm._ocp)["state"])
    gstep = 0
    # Time jaxckpt's call into Orbax too: save() minus it is jaxckpt's own bookkeeping,
    # free of Orbax's much larger run-to-run variance.
    inner: list[float] = []
    orbax_save = jm._ocp.save

    def timed_orbax_save(*args, **kwargs):
        t = time.perf_counter()
        try:
            return orbax_save(*args, **kwargs)
        finally:
            inner.append(time.perf_counter() - t)

    jm._ocp.save = timed_orbax_save
    own: list[float] = []
    last_step: dict[str, int] = {}

    def save(kind: str) -> float:
        """One save of the current state; returns how long the call blocked."""
        nonlocal gstep
        gstep += every
        last_step[kind] = gstep
        loss = float(last_loss)  # the step is finished: blocking is the save's own
        t0 = time.perf_counter()
        if kind == "jaxckpt":
            n = len(inner)
            jm.save(gstep, state, metrics={"loss": loss})
            if len(inner) > n:
                own.append(time.perf_counter() - t0 - inner[-1])
        else:
            om.save(gstep, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave({"step": gstep, "metrics": {"loss": loss}})))
        return time.perf_counter() - t0

    def finish(kind: str) -> None:
        jm.wait() if kind == "jaxckpt" else om.wait_until_finished()

    def period(kind: str) -> dict:
        """One period of "save every K steps": the save, K steps, any wait for the write."""
        before = rss.now()
        cpu0, start = time.process_time(), time.perf_counter()
        blocked = save(kind) if kind != "none" else 0.0
        t1 = time.perf_counter()
        run(1)
        first = time.perf_counter() - t1
        run(every - 1)
        if kind != "none":
            finish(kind)
        end = time.perf_counter()
        return {"s": end - start, "cpu_s": time.process_time() - cpu0, "blocked": blocked,
                "first_step": first, "peak_rss": rss.peak(start, end), "rss_before": before}

    # The first save of the process, while training: the user's real peak host memory
    # (one-time thread pools and buffers included) over the same loop without saving.
    _emit("first save (memory)")
    run(1)
    time.sleep(0.05)
    rss_train = rss.now()
    first_save = period("jaxckpt")
    first_extra = first_save["peak_rss"] - rss_train
    save("orbax")  # warm raw Orbax's pools too, outside every figure
    finish("orbax")

    blocks: dict[str, list[dict]] = {"none": [], "jaxckpt": [], "orbax": []}
    kinds = ["none", "jaxckpt", "orbax"]
    for r in range(cfg["rounds"]):
        for kind in kinds[r % 3:] + kinds[:r % 3]:  # rotate, so no kind always goes first
            _emit(f"round {r + 1}/{cfg['rounds']}: {kind}")
            blocks[kind].append(period(kind))

    # More saves for the blocking statistics, alternating jaxckpt and raw Orbax.
    _emit("blocking")
    blocking = {"jaxckpt": [b["blocked"] for b in blocks["jaxckpt"]],
                "orbax": [b["blocked"] for b in blocks["orbax"]]}
    for i in range(cfg["blocking_reps"]):
        for kind in (("jaxckpt", "orbax") if i % 2 == 0 else ("orbax", "jaxckpt")):
            blocking[kind].append(save(kind))
            run(1)
            finish(kind)

    _emit("sync saves")
    sync = []
    with jaxckpt.CheckpointManager(f"{base}/sync", policy, async_save=False) as sm:
        for i in range(2):
            run(1)
            t = time.perf_counter()
            sm.save(gstep + i + 1, state, metrics={"loss": 0.0})
            sync.append(time.perf_counter() - t)
    gstep += 2
    if local:
        shutil.rmtree(f"{base}/sync", ignore_errors=True)

    _emit("device-to-host")
    # Each copy is of fresh buffers (a step in between): a jax.Array caches its host
    # value, so a second device_get of the same array copies nothing.
    d2h_get, d2h_copy = [], []
    for _ in range(3):
        run(1)
        t = time.perf_counter()
        got = jax.device_get(jax.tree.leaves(state))
        d2h_get.append(time.perf_counter() - t)
        del got
    host = None
    for _ in range(3):
        host = None  # free the previous copy first, as a save would have
        run(1)
        t = time.perf_counter()
        host = [np.array(x, copy=True) for x in jax.tree.leaves(state)]
        d2h_copy.append(time.perf_counter() - t)
    d2h_floor = med(d2h_copy if on_cpu else d2h_get)

    # A full background write with nothing to compete with it, each next to a plain
    # sequential write of as many bytes, so that both see the same disk and host load.
    persist = {"jaxckpt": [], "orbax": []}
    disk_files, disk_write = [], []
    for i in range(2):
        _emit(f"writes {i + 1}/2")
        disk_files.append(f"{base}/disk-bandwidth-{i}.bin")
        disk_write.append(_disk_write(host, disk_files[-1]))
        for kind in (("jaxckpt", "orbax") if i % 2 == 0 else ("orbax", "jaxckpt")):
            run(1)  # fresh buffers: on GPU a second save would reuse the cached host copy
            t = time.perf_counter()
            save(kind)
            finish(kind)
            persist[kind].append(time.perf_counter() - t)
    orbax_step = last_step["orbax"]
    on_disk = _tree_bytes(f"{base}/jaxckpt/{last_step['jaxckpt']}/state")
    del host

    _emit("reads")
    run(1)
    reference = [np.array(x, copy=True) for x in jax.tree.leaves(state)]
    gstep += every
    jm.save(gstep, state, metrics={"loss": 0.0})
    run(2)  # they donate the saved buffers: the checkpoint must still hold the old values
    jm.wait()
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
    step_dir = f"{base}/jaxckpt/{gstep}"
    orbax_dir = f"{base}/orbax/{orbax_step}"
    disk_read, restore_cold, orbax_restore_cold, exact = [], [], [], True
    for i, path in enumerate(disk_files):
        disk_read.append(_disk_read(path))
        for kind in (("jaxckpt", "orbax") if i % 2 == 0 else ("orbax", "jaxckpt")):
            if local:
                _drop_page_cache(Path(step_dir if kind == "jaxckpt" else orbax_dir))
            t = time.perf_counter()
            if kind == "jaxckpt":
                restored = jm.restore(gstep, target=target)
            else:
                restored = om.restore(orbax_step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target)))["state"]
            jax.block_until_ready(restored)
            (restore_cold if kind == "jaxckpt" else orbax_restore_cold).append(
                time.perf_counter() - t)
            if kind == "jaxckpt":
                exact = exact and all(np.array_equal(np.asarray(a), b)
                                      for a, b in zip(jax.tree.leaves(restored), reference))
            del restored
    for path in disk_files:
        _remove(path)
    t = time.perf_counter()
    jax.block_until_ready(jm.restore(gstep, target=target))
    restore_warm = time.perf_counter() - t
    verify_cold = None
    if local:
        _drop_page_cache(Path(step_dir))
        t = time.perf_counter()
        jm.verify(gstep)
        verify_cold = time.perf_counter() - t
    disk = {"write_Bps": med(disk_write), "read_Bps": med(disk_read),
            "write_Bps_all": disk_write, "read_Bps_all": disk_read, "bytes": state_bytes,
            "method": ("one object PUT / GET via etils.epath" if not local else
                       "the state's bytes in 64 MiB writes to one file, then fsync; read in "
                       "64 MiB reads after posix_fadvise(DONTNEED) evicted its pages")}
    del reference
    jm.close()
    om.close()
    rss.close()
    if local:
        shutil.rmtree(base, ignore_errors=True)

    def sps(kind):
        return every * len(blocks[kind]) / sum(b["s"] for b in blocks[kind])

    base_sps, jax_sps, orbax_sps = sps("none"), sps("jaxckpt"), sps("orbax")
    per_round = [n["s"] / j["s"] for n, j in zip(blocks["none"], blocks["jaxckpt"])]
    save_cost = med(blocks["jaxckpt"][i]["s"] for i in range(cfg["rounds"])) - med(
        b["s"] for b in blocks["none"])
    jax_block, orbax_block = med(blocking["jaxckpt"]), med(blocking["orbax"])
    persist_Bps = state_bytes / med(persist["jaxckpt"])
    restore_Bps = state_bytes / med(restore_cold)
    transient = {k: [b["peak_rss"] - b["rss_before"] for b in blocks[k]]
                 for k in ("jaxckpt", "orbax")}
    ratios = {
        "throughput_ratio": jax_sps / base_sps,
        "blocking_over_d2h": jax_block / d2h_floor,
        "policy_over_orbax": jax_block / orbax_block,
        "persist_over_disk": persist_Bps / disk["write_Bps"],
        "restore_over_disk": restore_Bps / disk["read_Bps"],
        "peak_ram_over_state": first_extra / state_bytes,
    }
    raw = {
        "platform": platform_name,
        "model": model,
        "step_s": step_s,
        "save_every_steps": every,
        "save_interval_s": every * step_s,
        "rounds": cfg["rounds"],
        "steps_per_s": {"no_checkpoint": base_sps, "jaxckpt_async": jax_sps,
                        "orbax_async": orbax_sps},
        "orbax_throughput_ratio": orbax_sps / base_sps,
        "throughput_ratio_per_round": per_round,
        "save_cost_training_s": save_cost,
        # None when noise made the periods with a save no slower than those without.
        "interval_for_0.97_s": save_cost / 0.03 if save_cost > 0 else None,
        "period_s": {k: [b["s"] for b in v] for k, v in blocks.items()},
        "period_cpu_s": {k: [b["cpu_s"] for b in v] for k, v in blocks.items()},
        "save_cpu_s": med(b["cpu_s"] for b in blocks["jaxckpt"]) - med(
            b["cpu_s"] for b in blocks["none"]),
        "orbax_save_cpu_s": med(b["cpu_s"] for b in blocks["orbax"]) - med(
            b["cpu_s"] for b in blocks["none"]),
        "first_step_after_save_s": {k: med(b["first_step"] for b in v)
                                    for k, v in blocks.items()},
        "save_blocking_s": {k: {"p50": med(v), "p95": _pct(v, 0.95), "n": len(v), "all": v}
                            for k, v in blocking.items()},
        "jaxckpt_own_s": {"p50": med(own), "p95": _pct(own, 0.95), "all": own,
                          "note": "save() minus its call into Orbax's save()"},
        "sync_save_blocking_s": {"p50": med(sync), "p95": _pct(sync, 0.95), "all": sync},
        "d2h_s": {"floor": d2h_floor,
                  "floor_is": "np.array(x, copy=True)" if on_cpu else "jax.device_get",
                  "numpy_copy_p50": med(d2h_copy), "numpy_copy_all": d2h_copy,
                  "device_get_p50": med(d2h_get), "device_get_all": d2h_get,
                  "device_get_note": ("zero-copy view of the CPU buffer: no floor" if on_cpu
                                      else "real device-to-host copy")},
        "persist_s": persist,
        "persist_Bps": persist_Bps,
        "orbax_persist_Bps": state_bytes / med(persist["orbax"]),
        "bytes_on_disk": on_disk,
        "disk": disk,
        "restore_cold_s": restore_cold,
        "restore_warm_s": restore_warm,
        "restore_Bps": restore_Bps,
        "restore_exact": exact,
        "verify_cold_s": verify_cold,
        "orbax_restore_cold_s": orbax_restore_cold,
        "orbax_restore_Bps": state_bytes / med(orbax_restore_cold),
        "rss_train_bytes": rss_train,
        "first_save_peak_extra_rss_bytes": first_extra,
        "first_save_period_s": first_save["s"],
        "per_save_transient_rss_bytes": transient,
        "orbax_per_save_transient_over_state": max(transient["orbax"]) / state_bytes,
        "jaxckpt_per_save_transient_over_state": max(transient["jaxckpt"]) / state_bytes,
        "state_handler": handler_info,
    }
    return {"size_mb": cfg["size_mb"], "state_bytes": state_bytes, "ratios": ratios, "raw": raw}


def _run_auto(cfg: dict) -> dict:
    """``every="auto"``: does the interval the manager picks hold the overhead budget?

    The manager is called at every step and decides itself. After calibration (until it
    has chosen ``every_n_steps`` and re-chosen it once), a window of two intervals with the
    manager is timed between two equal windows without it; the overhead is the extra time
    per step, which ``overhead_budget`` bounds.
    """
    import jax

    import jaxckpt

    base = cfg["dir"].rstrip("/") + "/auto"
    _emit("building state")
    state, step, model = _model(cfg["size_mb"], cfg["layers"], cfg["batch"])
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))

    def run(n, mngr=None, first=0, deadline=None):
        nonlocal state
        saves, done = 0, 0
        for i in range(n):
            state, loss = step(state)
            done += 1
            if mngr is not None:
                saves += bool(mngr.save(first + i, state))
            if deadline is not None and time.perf_counter() > deadline:
                break
        jax.block_until_ready(state)
        return saves, done

    _emit("compiling")
    run(2)
    t = time.perf_counter()
    run(5)
    step_s = (time.perf_counter() - t) / 5
    policy = jaxckpt.CheckpointPolicy(every="auto", overhead_budget=cfg["auto_budget"],
                                      keep_latest=1)
    mngr = jaxckpt.CheckpointManager(base, policy)
    # Calibration, as a user's run starts: the manager saves at once to measure the cost,
    # picks an interval, and re-picks it at each commit as its step-time estimate
    # settles. The timed window starts after the first re-pick.
    _emit("calibrating")
    gstep, calib_saves = 1, 0
    t_cal = time.perf_counter()
    deadline = t_cal + max(60.0, 100 * step_s)
    while mngr.every_n_steps is None and time.perf_counter() < deadline:
        calib_saves += run(1, mngr, gstep)[0]
        gstep += 1
    first_every, first_at = mngr.every_n_steps, gstep - 1
    resaved = 0
    while first_every is not None and not resaved and time.perf_counter() < deadline:
        resaved = run(1, mngr, gstep)[0]
        calib_saves += resaved
        gstep += 1
    mngr.wait()
    every = mngr.every_n_steps
    calibration = {"first_every_n_steps": first_every, "first_chosen_after_steps": first_at,
                   "settled_every_n_steps": every, "steps": gstep - 1, "saves": calib_saves,
                   "s": time.perf_counter() - t_cal}
    if every is None:
        mngr.close()
        raise RuntimeError(f"every='auto' chose no interval within {gstep - 1} steps.")
    window = cfg["auto_steps"] or max(10, 2 * every + 1)
    _emit(f"baseline ({window} steps)")
    t = time.perf_counter()
    run(window)
    base1 = time.perf_counter() - t
    _emit(f"every='auto' ({window} steps)")
    # A broken interval could save at every step; cap the window at 3x the budgeted time.
    cap = time.perf_counter() + 3 * base1 * (1 + cfg["auto_budget"]) + 10.0
    t = time.perf_counter()
    saves, done = run(window, mngr, gstep, deadline=cap)
    mngr.wait()
    auto_s = time.perf_counter() - t
    final_every = mngr.every_n_steps
    gstep += done
    _emit(f"baseline ({window} steps)")
    t = time.perf_counter()
    run(window)
    base2 = time.perf_counter() - t
    from etils import epath
    stored = {}
    history_file = epath.Path(base) / jaxckpt.manager.HISTORY_FILE
    if history_file.exists():  # the manager's own record of its cost estimate
        stored = json.loads(history_file.read_text())
    mngr.close()
    shutil.rmtree(base, ignore_errors=True) if not _is_url(cfg["dir"]) else None
    base_step = (base1 + base2) / (2 * window)
    overhead = (auto_s / done) / base_step - 1.0
    return {
        "size_mb": cfg["size_mb"], "state_bytes": state_bytes, "model": model,
        "overhead_budget": cfg["auto_budget"], "mtbf_hours": None,
        "step_s": step_s, "calibration": calibration, "chosen_every_n_steps": every,
        "final_every_n_steps": final_every,
        "save_cost_s_estimate": stored.get("save_cost_s"),
        "window_steps": window, "window_steps_done": done, "window_saves": saves,
        "expected_window_saves": [done // max(every, final_every),
                                  math.ceil(done / min(every, final_every))],
        "baseline_s": [base1, base2], "auto_s": auto_s,
        "measured_overhead": overhead,
        "budget_held": overhead <= cfg["auto_budget"],
    }


TUNING_VARIANTS = {  # name: PyTreeCheckpointHandler options (None: StandardCheckpointHandler())
    "orbax default (zarr2+OCDBT+zstd)": None,
    "no compression": dict(use_compression=False),
    "no compression, no OCDBT": dict(use_compression=False, use_ocdbt=False),
    "zarr3, no compression": dict(use_zarr3=True, use_compression=False),
    "zarr3 + zstd": dict(use_zarr3=True),
}
QUICK_TUNING = list(TUNING_VARIANTS)[:3]


def _run_tuning(cfg: dict) -> dict:
    """One Orbax storage variant on a train state, in a fresh process.

    Measures the first save's peak extra host memory while training goes on (fresh
    process, so nothing is pre-allocated), the first step after it, then idle writes
    (wall and CPU seconds: on a small host the background write runs on the cores the
    training step uses) and a cold restore.
    """
    import jax
    import orbax.checkpoint as ocp

    options = TUNING_VARIANTS[cfg["variant"]]
    path = cfg["dir"].rstrip("/") + f"/tuning-{abs(hash(cfg['variant'])) % 10**6}"
    _emit("building state")
    rss = RssSampler()
    state, step, model = _model(cfg["size_mb"], cfg["layers"], cfg["batch"])

    def run(n):
        nonlocal state
        for _ in range(n):
            state, _ = step(state)
        jax.block_until_ready(state)

    run(2)
    t = time.perf_counter()
    run(3)
    step_s = (time.perf_counter() - t) / 3
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
    if options is None:
        handler = ocp.StandardCheckpointHandler()
        save_args = ocp.args.StandardSave
        restore_args = ocp.args.StandardRestore(target)
    else:
        handler = ocp.PyTreeCheckpointHandler(**options)
        save_args = ocp.args.PyTreeSave
        restore_args = ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))
    mngr = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(
        max_to_keep=1, enable_async_checkpointing=True), item_handlers={"state": handler})

    _emit("first save (memory)")
    time.sleep(0.05)
    rss0 = rss.now()
    t0 = time.perf_counter()
    mngr.save(0, args=ocp.args.Composite(state=save_args(state)))
    t1 = time.perf_counter()
    run(1)
    first_step = time.perf_counter() - t1
    run(2)
    mngr.wait_until_finished()
    first_extra = rss.peak(t0, time.perf_counter()) - rss0

    _emit("idle writes")
    walls, cpus = [], []
    for i in range(1, 1 + cfg["tuning_reps"]):
        run(1)
        c, t = time.process_time(), time.perf_counter()
        mngr.save(i, args=ocp.args.Composite(state=save_args(state)))
        mngr.wait_until_finished()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    last = cfg["tuning_reps"]
    on_disk = _tree_bytes(f"{path}/{last}")
    _emit("cold restore")
    if not _is_url(cfg["dir"]):
        _drop_page_cache(Path(path) / str(last))
    t = time.perf_counter()
    restored = mngr.restore(last, args=ocp.args.Composite(state=restore_args))["state"]
    jax.block_until_ready(restored)
    restore_s = time.perf_counter() - t
    del restored
    mngr.close()
    rss.close()
    if not _is_url(cfg["dir"]):
        shutil.rmtree(path, ignore_errors=True)
    return {"variant": cfg["variant"], "options": options, "size_mb": cfg["size_mb"],
            "state_bytes": state_bytes, "step_s": step_s,
            "first_save_peak_extra_rss_bytes": first_extra,
            "first_save_peak_ram_over_state": first_extra / state_bytes,
            "first_step_after_save_s": first_step,
            "persist_s": statistics.median(walls), "persist_s_all": walls,
            "persist_Bps": state_bytes / statistics.median(walls),
            "cpu_s": statistics.median(cpus), "cpu_s_all": cpus,
            "bytes_on_disk": on_disk, "cold_restore_s": restore_s,
            "restore_Bps": state_bytes / restore_s}


def _child_main(cfg: dict) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    job = {"size": _run_size, "auto": _run_auto, "tuning": _run_tuning}[cfg["job"]]
    result = job(cfg)
    from importlib.metadata import version

    import jax
    dev = jax.devices()[0]
    result["device"] = {"platform": dev.platform, "kind": dev.device_kind,
                        "count": jax.device_count(), "jax": jax.__version__,
                        "orbax_checkpoint": version("orbax-checkpoint"),
                        "tensorstore": version("tensorstore")}
    Path(cfg["out"]).write_text(json.dumps(result, indent=1, default=_json_default))


def _json_default(x):
    if hasattr(x, "item"):
        return x.item()
    return str(x)


# ======================================================================================
# parent side: plans the jobs, runs each in a subprocess, shows progress, writes results.
# ======================================================================================


def _machine(directory: str) -> dict:
    import psutil

    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    disk = None
    if not _is_url(directory):
        best = None
        for part in psutil.disk_partitions(all=True):
            if directory.startswith(part.mountpoint) and (
                    best is None or len(part.mountpoint) > len(best.mountpoint)):
                best = part
        if best is not None:
            usage = shutil.disk_usage(directory)
            dev = os.path.basename(best.device)
            rotational = Path(f"/sys/block/{dev}/queue/rotational")
            disk = {"device": best.device, "mountpoint": best.mountpoint, "fstype": best.fstype,
                    "total_bytes": usage.total, "free_bytes": usage.free,
                    "rotational": rotational.read_text().strip() if rotational.exists() else None}
    return {"hostname": platform.node(), "nproc": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "cpu_model": cpu, "ram_bytes": psutil.virtual_memory().total,
            "load_avg_at_start": os.getloadavg(), "cpu_pressure_at_start": _cpu_pressure(),
            "python": platform.python_version(),
            "dir": directory, "disk": disk}


def _cpu_pressure() -> str | None:
    """Linux PSI: the share of time some task waited for a CPU (other load on the host)."""
    try:
        return Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except OSError:
        return None


def _units(cfg: dict) -> int:
    if cfg["job"] == "size":
        return 9 + 3 * cfg["rounds"]
    if cfg["job"] == "auto":
        return 6
    return 4


def _run_child(cfg: dict, progress, task, log_path: Path) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(cfg)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        try:
            for line in proc.stdout:
                if line.startswith(PROGRESS):
                    msg = json.loads(line[len(PROGRESS):])
                    progress.update(task, advance=msg["advance"],
                                    description=f"{cfg['label']}: {msg['desc']}")
            proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    if proc.returncode != 0 or not Path(cfg["out"]).exists():
        tail = log_path.read_text().strip().splitlines()[-25:]
        return {"error": f"exit code {proc.returncode}", "log_tail": tail}
    progress.update(task, completed=_units(cfg), description=f"{cfg['label']}: done")
    return json.loads(Path(cfg["out"]).read_text())


def _summary(sizes: list[dict]) -> dict:
    out = {}
    for key, (op, target) in TARGETS.items():
        values = {f"{s['size_mb']:g}": s["ratios"][key] for s in sizes if "ratios" in s}
        if not values:
            continue
        worst = min(values.values()) if op == ">=" else max(values.values())
        out[key] = {"by_size_mb": values, "worst": worst, "target": f"{op} {target}",
                    "met": worst >= target if op == ">=" else worst <= target}
    return out


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _report(result: dict) -> list[dict]:
    """The results as plain tables (title, columns, rows; ``ok`` marks a met target),
    rendered by rich on the terminal and as Markdown for bench/README.md."""
    tables = []
    sizes = [s for s in result["sizes"] if "ratios" in s]
    ms = lambda x: f"{1e3 * x:.1f} ms"  # noqa: E731
    gbs = lambda x: f"{x / 1e9:.2f} GB/s"  # noqa: E731
    if sizes:
        columns = ["ratio", "target"] + [_fmt_bytes(s["state_bytes"]) for s in sizes]
        rows, ok = [], []
        for key, (op, target) in TARGETS.items():
            values = [s["ratios"][key] for s in sizes]
            rows.append([key, f"{op} {target}"] + [f"{v:.3f}" for v in values])
            ok.append([None, None] + [v >= target if op == ">=" else v <= target
                                      for v in values])
        tables.append({"title": "ratios (targets are for CPU)", "columns": columns,
                       "rows": rows, "ok": ok})

        raw = []

        def row(name, fn):
            raw.append([name] + [fn(s["raw"]) for s in sizes])

        row("layers x width, batch rows", lambda w: f"{w['model']['layers']} x "
            f"{w['model']['width']}, {w['model']['batch']}")
        row("step time", lambda w: ms(w["step_s"]))
        row("save every K steps (interval)", lambda w: f"{w['save_every_steps']} "
            f"({w['save_interval_s']:.1f} s)")
        row("steps/s: none / jaxckpt / orbax", lambda w: " / ".join(
            f"{v:.2f}" for v in w["steps_per_s"].values()))
        row("throughput ratio per round", lambda w: " ".join(
            f"{v:.2f}" for v in w["throughput_ratio_per_round"]))
        row("raw Orbax throughput ratio", lambda w: f"{w['orbax_throughput_ratio']:.3f}")
        row("training time lost per save", lambda w: ms(w["save_cost_training_s"]))
        row("interval for ratio 0.97", lambda w: "-" if w["interval_for_0.97_s"] is None
            else f"{w['interval_for_0.97_s']:.0f} s")
        row("CPU s per save: jaxckpt / orbax", lambda w: (
            f"{w['save_cpu_s']:.2f} / {w['orbax_save_cpu_s']:.2f}"))
        for kind in ("jaxckpt", "orbax"):
            row(f"{kind} async save() blocks p50 / p95", lambda w, k=kind: (
                f"{ms(w['save_blocking_s'][k]['p50'])} / {ms(w['save_blocking_s'][k]['p95'])}"))
        row("of which jaxckpt's own (p50 / p95)", lambda w: (
            f"{ms(w['jaxckpt_own_s']['p50'])} / {ms(w['jaxckpt_own_s']['p95'])}"))
        row("sync save() blocks p50", lambda w: ms(w["sync_save_blocking_s"]["p50"]))
        row("step after save: none / jaxckpt / orbax", lambda w: " / ".join(
            ms(v) for v in w["first_step_after_save_s"].values()))
        row("d2h floor: np.array copy p50 (first)", lambda w: (
            f"{ms(w['d2h_s']['numpy_copy_p50'])} ({ms(w['d2h_s']['numpy_copy_all'][0])})"))
        row("jax.device_get p50", lambda w: ms(w["d2h_s"]["device_get_p50"]))
        row("idle full write: jaxckpt / orbax", lambda w: (
            f"{gbs(w['persist_Bps'])} / {gbs(w['orbax_persist_Bps'])}"))
        row("disk: write+fsync / cold read", lambda w: (
            f"{gbs(w['disk']['write_Bps'])} / {gbs(w['disk']['read_Bps'])}"))
        row("cold restore: jaxckpt / orbax", lambda w: (
            f"{gbs(w['restore_Bps'])} / {gbs(w['orbax_restore_Bps'])}"))
        row("cold verify (CRC-32C of all files)", lambda w: (
            ms(w["verify_cold_s"]) if w["verify_cold_s"] is not None else "-"))
        row("restored bit-exact", lambda w: str(w["restore_exact"]))
        row("bytes on disk", lambda w: _fmt_bytes(w["bytes_on_disk"]))
        row("first save: peak extra RSS", lambda w: _fmt_bytes(
            w["first_save_peak_extra_rss_bytes"]))
        row("later saves: extra RSS jaxckpt / orbax", lambda w: (
            f"{_fmt_bytes(max(w['per_save_transient_rss_bytes']['jaxckpt']))} / "
            f"{_fmt_bytes(max(w['per_save_transient_rss_bytes']['orbax']))}"))
        tables.append({"title": "raw figures", "rows": raw,
                       "columns": ["figure"] + [_fmt_bytes(s["state_bytes"]) for s in sizes]})

    auto = result.get("auto")
    if auto and "error" not in auto:
        lo, hi = auto["expected_window_saves"]
        cost = auto["save_cost_s_estimate"]
        cal = auto["calibration"]
        tables.append({
            "title": f"every='auto' ({_fmt_bytes(auto['state_bytes'])} state, step "
                     f"{ms(auto['step_s'])})",
            "columns": ["budget", "every_n_steps: first, settled -> end", "save cost estimate",
                        "saves in window (expected)", "measured overhead", "held"],
            "rows": [[f"{auto['overhead_budget']:.1%}",
                      f"{cal['first_every_n_steps']}, {auto['chosen_every_n_steps']} -> "
                      f"{auto['final_every_n_steps']}",
                      f"{cost:.2f} s" if cost is not None else "-",
                      f"{auto['window_saves']} ({lo}-{hi})" if lo != hi else
                      f"{auto['window_saves']} ({lo})",
                      f"{auto['measured_overhead']:.1%}",
                      "yes" if auto["budget_held"] else "no"]],
            "ok": [[None] * 5 + [auto["budget_held"]]]})
    tuning = result.get("tuning")
    if tuning:
        rows = []
        for name, v in tuning["variants"].items():
            if "error" in v:
                rows.append([name, "failed"] + [""] * 5)
                continue
            rows.append([name, f"{v['first_save_peak_ram_over_state']:.2f} x state",
                         f"{ms(v['first_step_after_save_s'])} (step {ms(v['step_s'])})",
                         f"{v['persist_s']:.2f} s ({gbs(v['persist_Bps'])})",
                         f"{v['cpu_s']:.2f}", _fmt_bytes(v["bytes_on_disk"]),
                         f"{v['cold_restore_s']:.2f} s ({gbs(v['restore_Bps'])})"])
        tables.append({
            "title": f"Orbax storage options ({_fmt_bytes(tuning.get('state_bytes'))} state; "
                     "raw Orbax, a fresh process each)",
            "columns": ["variant", "first save: peak extra RSS", "step after save",
                        "idle full write", "CPU s / write", "on disk", "cold restore"],
            "rows": rows})
    return tables


def _print_tables(result: dict, console) -> None:
    from rich.table import Table

    for spec in _report(result):
        t = Table(title=spec["title"])
        for i, c in enumerate(spec["columns"]):
            t.add_column(c, justify="left" if i == 0 else "right")
        oks = spec.get("ok") or [[None] * len(r) for r in spec["rows"]]
        for r, ok in zip(spec["rows"], oks):
            t.add_row(*[c if o is None else f"[{'green' if o else 'red'}]{c}[/]"
                        for c, o in zip(r, ok)])
        console.print(t)
    tuned = (result.get("tuning") or {}).get("variants", {})
    for name, job in [("auto", result.get("auto"))] + [
            (f"tuning {k}", v) for k, v in tuned.items()] + [
            (f"size {s.get('size_mb')}", s) for s in result["sizes"]]:
        if job and "error" in job:
            console.print(f"[red]{name} failed ({job['error']}):[/]\n" + "\n".join(
                job.get("log_tail", [])))


def markdown(result: dict) -> str:
    """The results as Markdown: the machine, the command, then every table."""
    m = result["machine"]
    dev = next((s.get("device") for s in result["sizes"] if s.get("device")), None) or {}
    disk = m.get("disk") or {}
    lines = [
        f"`{result['command']}` — {result['started']}, {result['elapsed_s']:.0f} s",
        "",
        f"- machine: {m['nproc']} CPUs ({m['cpu_model']}), "
        f"{_fmt_bytes(m['ram_bytes'])} RAM; device {dev.get('kind', '?')} "
        f"({dev.get('platform', '?')}); jax {dev.get('jax', '?')}, orbax-checkpoint "
        f"{dev.get('orbax_checkpoint', '?')}, tensorstore {dev.get('tensorstore', '?')}",
        f"- disk: {disk.get('device', '?')} {disk.get('fstype', '')} "
        f"{_fmt_bytes(disk.get('total_bytes'))}" if disk else f"- storage: {m['dir']}",
        f"- load average at start / end: {', '.join(f'{x:.2f}' for x in m['load_avg_at_start'])}"
        f" / {', '.join(f'{x:.2f}' for x in m.get('load_avg_at_end', []))}; CPU pressure at "
        f"start: `{m.get('cpu_pressure_at_start')}`",
        "",
    ]
    for spec in _report(result):
        lines += [f"**{spec['title']}**", "",
                  "| " + " | ".join(spec["columns"]) + " |",
                  "|" + "|".join("---" if i == 0 else "---:"
                                 for i in range(len(spec["columns"]))) + "|"]
        oks = spec.get("ok") or [[None] * len(r) for r in spec["rows"]]
        for r, ok in zip(spec["rows"], oks):
            lines.append("| " + " | ".join(
                c if o is None else (f"{c} ✓" if o else f"**{c}** ✗")
                for c, o in zip(r, ok)) + " |")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"smaller sizes and shorter blocks (sizes {QUICK['sizes']} MiB)")
    p.add_argument("--json", metavar="PATH", help="write every figure to this JSON file")
    p.add_argument("--markdown", metavar="PATH",
                   help="write the tables as Markdown (as in bench/README.md)")
    p.add_argument("--sizes", type=float, nargs="+", metavar="MiB",
                   help=f"train-state sizes in MiB, params + Adam (default {FULL['sizes']})")
    p.add_argument("--dir", default=None,
                   help="where checkpoints and the disk-bandwidth file go (default: a new "
                        "temporary directory); a gs:// URL also works")
    p.add_argument("--interval", type=float, default=None, metavar="S",
                   help="seconds of training between saves; K = interval / step time "
                        f"(default {FULL['interval']}, --quick {QUICK['interval']})")
    p.add_argument("--steps", type=int, default=None, metavar="K",
                   help="save every K steps (overrides --interval)")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds of (none, jaxckpt, orbax) blocks")
    p.add_argument("--blocking-reps", type=int, default=None,
                   help="extra saves of each kind for the blocking statistics (default "
                        f"{FULL['blocking_reps']}, --quick {QUICK['blocking_reps']})")
    p.add_argument("--layers", type=int, default=16, help="layers of the model (default 16)")
    p.add_argument("--batch", type=int, default=128, help="rows per train step (default 128)")
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
                   help="compare only the first N Orbax variants (default: 3 with --quick, "
                        f"else all {len(TUNING_VARIANTS)})")
    p.add_argument("--no-tuning", action="store_true", help="skip the Orbax options comparison")
    p.add_argument("--keep-logs", action="store_true", help="keep the subprocess logs")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        _child_main(json.loads(args.child))
        return 0
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn,
                               TextColumn, TimeElapsedColumn)

    preset = QUICK if args.quick else FULL
    sizes = args.sizes or preset["sizes"]
    interval = args.interval or preset["interval"]
    rounds = args.rounds or preset["rounds"]
    own_dir = args.dir is None
    if own_dir:
        base = tempfile.mkdtemp(prefix="jaxckpt-bench-")
    elif _is_url(args.dir):
        base = args.dir.rstrip("/") + f"/jaxckpt-bench-{os.getpid()}-{int(time.time())}"
    else:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
        base = tempfile.mkdtemp(prefix="jaxckpt-bench-", dir=args.dir)
    work = Path(tempfile.mkdtemp(prefix="jaxckpt-bench-logs-"))
    common = dict(dir=base, interval=interval, steps=args.steps, rounds=rounds,
                  blocking_reps=(preset["blocking_reps"] if args.blocking_reps is None
                                 else args.blocking_reps),
                  layers=args.layers, batch=args.batch, quick=args.quick)
    jobs = [dict(common, job="size", size_mb=s, label=f"{s:g} MiB") for s in sizes]
    if not args.no_tuning:
        size = args.tuning_size or (preset["tuning_size"] if not args.sizes else min(sizes))
        variants = QUICK_TUNING if args.quick else list(TUNING_VARIANTS)
        for variant in variants[:args.tuning_variants or len(variants)]:
            jobs.append(dict(common, job="tuning", size_mb=size, tuning_reps=2, variant=variant,
                             label=f"Orbax {variant}, {size:g} MiB"))
    if not args.no_auto:
        size = args.auto_size or (preset["auto_size"] if not args.sizes else min(sizes))
        jobs.append(dict(common, job="auto", size_mb=size, auto_budget=args.auto_budget,
                         auto_steps=args.auto_steps, label=f"every='auto', {size:g} MiB"))
    for i, job in enumerate(jobs):
        job["out"] = str(work / f"job{i}.json")

    console = Console(stderr=True)
    out_console = Console()
    result: dict[str, Any] = {
        "benchmark": "jaxckpt checkpoint overhead", "version": 1,
        "command": " ".join([os.path.basename(sys.executable), "bench/overhead.py"] +
                            (argv if argv is not None else sys.argv[1:])),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": _machine(base if not _is_url(base) else args.dir),
        "config": {k: v for k, v in common.items() if k != "dir"} | {
            "sizes_mb": sizes, "dir": args.dir or "(temporary)",
            "auto_budget": args.auto_budget},
        "targets": {k: f"{op} {v}" for k, (op, v) in TARGETS.items()},
        "sizes": [], "tuning": None, "auto": None,
    }
    start = time.perf_counter()
    try:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                      MofNCompleteColumn(), TimeElapsedColumn(), console=console) as progress:
            tasks = [progress.add_task(j["label"], total=_units(j), start=False) for j in jobs]
            for job, task in zip(jobs, tasks):
                progress.start_task(task)
                t_job = time.perf_counter()
                res = _run_child(job, progress, task, work / f"{Path(job['out']).stem}.log")
                res["job_elapsed_s"] = time.perf_counter() - t_job
                if job["job"] == "size":
                    result["sizes"].append(res if "error" not in res else
                                           {"size_mb": job["size_mb"], **res})
                elif job["job"] == "tuning":
                    result["tuning"] = result["tuning"] or {
                        "size_mb": job["size_mb"], "variants": {},
                        "note": "raw Orbax CheckpointManager, one fresh process per variant"}
                    result["tuning"]["variants"][job["variant"]] = res
                    result["tuning"].setdefault("state_bytes", res.get("state_bytes"))
                else:
                    result[job["job"]] = res
    finally:
        if _is_url(base):
            from etils import epath
            if epath.Path(base).exists():
                epath.Path(base).rmtree()
        else:
            shutil.rmtree(base, ignore_errors=True)
    result["elapsed_s"] = time.perf_counter() - start
    result["machine"]["load_avg_at_end"] = os.getloadavg()
    result["machine"]["cpu_pressure_at_end"] = _cpu_pressure()
    result["summary"] = _summary(result["sizes"])
    if result["auto"] and "error" not in result["auto"]:
        result["summary"]["auto_budget_held"] = {
            "budget": result["auto"]["overhead_budget"],
            "measured_overhead": result["auto"]["measured_overhead"],
            "met": result["auto"]["budget_held"]}
    _print_tables(result, out_console)
    out_console.print(f"elapsed {result['elapsed_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=_json_default))
        out_console.print(f"wrote {args.json}")
    if args.markdown:
        Path(args.markdown).write_text(markdown(result))
        out_console.print(f"wrote {args.markdown}")
    def job_result(j):
        if j["job"] == "size":
            return next(s for s in result["sizes"] if s["size_mb"] == j["size_mb"])
        if j["job"] == "tuning":
            return result["tuning"]["variants"][j["variant"]]
        return result[j["job"]]

    failed = [j["label"] for j in jobs if "error" in job_result(j)]
    if not args.keep_logs and not failed:
        shutil.rmtree(work, ignore_errors=True)
    elif failed:
        out_console.print(f"[red]failed: {failed}; logs in {work}[/]")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
