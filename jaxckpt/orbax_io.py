"""The only module that talks to Orbax: its manager for async saves, its checkpointer for
restores. Public Orbax API only.

Saves go through ``ocp.CheckpointManager`` (atomic finalize, async write, temporary
directory cleanup). Restores read item directories with a ``PyTreeCheckpointer``, so a
checkpoint restores the same whoever wrote it: jaxckpt (item ``state``) or plain Orbax
(``default``, or named items of a Composite save). A subtree restore hands Orbax only that
subtree (``partial_restore``): the other arrays' bytes are never read.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from jaxckpt import fingerprint, storage
from jaxckpt import format as fmt
from jaxckpt import target as target_lib
from jaxckpt.errors import CheckpointNotFoundError, RestoreStructureError
from jaxckpt.policy import CheckpointPolicy

__all__ = ["new_manager", "save", "close_quietly", "pytree_items", "item_metadata",
           "restore_item", "restore_state", "as_subtree"]

ORBAX_DEFAULT_ITEM = "default"
"""The item of a plain ``ocp.CheckpointManager`` saved without item names."""

log = logging.getLogger("jaxckpt")


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    """Orbax's PyTree handler without zstd, and without Orbax's per-array side files.

    Weights and Adam moments are float noise: zstd shrinks them ~9% yet costs ~1 CPU-s per
    GB on the training host, slows restore and holds a compressed copy of the state during
    the write (peak extra RAM 2.0x the state instead of 1.1x; bench/README.md). Files read
    back with either setting.

    Orbax's default array handler also records each array's sharding in ``_sharding`` (a
    TensorStore open and write per array) and its write shape in ``array_metadatas/``:
    ~0.9 ms of CPU per array per save (1,002 arrays: 3.1 -> 2.2 CPU-s per save). Neither is
    read by a restore that has a target: jaxckpt places arrays like its target or returns
    numpy. Plain Orbax does the same given a target; without one, ``StandardCheckpointer``
    returns numpy and ``PyTreeRestore()`` asks for shardings (docs/orbax.md).
    """
    handlers = ocp.type_handlers
    arrays = handlers.ArrayHandler(enable_write_sharding_file=False)
    registry = handlers.create_type_handler_registry(
        *[(t, handlers.get_type_handler(t)) for t in _SCALAR_AND_NUMPY_TYPES],
        (jax.Array, arrays))
    return ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry)


_SCALAR_AND_NUMPY_TYPES = (int, float, bytes, np.number, np.ndarray, str)
"""Leaf types saved with Orbax's own (global) handlers, as a plain Orbax save does."""


def new_manager(directory: epath.Path, *, async_save: bool, read_only: bool,
                policy: CheckpointPolicy) -> ocp.CheckpointManager:
    """An Orbax manager that saves what it is told and deletes nothing (jaxckpt decides).

    With a monitored metric, Orbax also stores each step's metrics in its ``metrics`` item,
    where a plain ``ocp.CheckpointManager(best_fn=...)`` finds them.
    """
    monitor = policy.monitor
    if not read_only:
        quiet_thread_tracebacks()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None,
        enable_async_checkpointing=async_save,
        # A local directory's leftovers are removed at open, before this manager exists
        # (storage.finish_deletions); Orbax's own clean-up runs on a thread that close()
        # does not wait for, and a process that exits at once may see it fail at shutdown.
        cleanup_tmp_directories=not read_only and storage.is_remote(directory),
        create=not read_only,
        read_only=read_only,
        best_fn=(lambda m: m[monitor]) if monitor else None,
        best_mode=policy.resolved_mode,
        # Do not read every step's metadata at start-up: one damaged step would make
        # the whole directory unusable (jaxckpt's catalog checks each step itself).
        lightweight_initialize=True,
        # Orbax makes the step directory in the background: the writer checks a local
        # directory first (storage.check_writable), since a failure there would leave
        # Orbax's writer waiting 300 s for it.
    )
    handlers = {fmt.STATE: _state_handler(), fmt.META: ocp.JsonCheckpointHandler(),
                fmt.DATA_STATE: ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict,
         data_state: dict | None, metrics: dict[str, float] | None) -> None:
    items = {fmt.STATE: ocp.args.PyTreeSave(state), fmt.META: ocp.args.JsonSave(meta)}
    if data_state is not None:
        items[fmt.DATA_STATE] = ocp.args.JsonSave(data_state)
    if metrics is not None:
        manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
        return
    # A save without metrics (mid-epoch, preemption) is meant; Orbax would log "did not
    # provide metrics" at each one. Only that record, only during this call, is dropped.
    absl_log = logging.getLogger("absl")
    absl_log.addFilter(_drop_no_metrics)
    try:
        manager.save(step, args=ocp.args.Composite(**items), force=True)
    finally:
        absl_log.removeFilter(_drop_no_metrics)


ASYNC_TIMEOUT_S = ocp.AsyncOptions().timeout_secs
"""How long Orbax's processes wait for each other at a commit (its default)."""


def process_count() -> int:
    """The processes of this job, for messages (a test stands in for many here)."""
    return jax.process_count()


def sync_processes(tag: str) -> None:
    """Wait until every process of a multi-process job gets here (nothing to wait for in
    one process). Every process makes the same calls in the same order, so each barrier
    gets the same name everywhere."""
    if jax.process_count() > 1:
        ocp.multihost.sync_global_processes(f"jaxckpt_{tag}_{next(_BARRIERS)}")


_BARRIERS = itertools.count()


def from_process_0(words: np.ndarray) -> np.ndarray:
    """Process 0's ``words`` (a small uint32 array) on every process, by one broadcast that
    every process makes at the same point; ``words`` itself in one process."""
    if process_count() == 1:
        return words
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(
        words, is_source=jax.process_index() == 0)).astype(np.uint32)


def meet_after_failure(tag: str, failure: BaseException) -> None:
    """:func:`sync_processes` on the way out of ``failure``: the other processes still
    meet this one. If the meeting fails too (another process is gone or stuck),
    ``failure`` stays the error raised, with the meeting's in a note."""
    try:
        sync_processes(tag)
    except Exception as e:
        failure.add_note(f"Then meeting the other processes failed as well: "
                         f"{type(e).__name__}: {e}")


def _drop_no_metrics(record: logging.LogRecord) -> bool:
    return "did not provide metrics" not in record.getMessage()


_THREAD_FAILED = ("_SignalingThread.run() raised an exception",
                  "Commit operations or the Commit callback in background save thread",
                  "Save Finalize thread")


def _one_line_per_failed_thread(record: logging.LogRecord) -> bool:
    """Orbax logs a failed background save once per thread it ran on, each with a
    traceback (three failed saves on a full disk printed 1,383 lines). jaxckpt raises the
    error at the next ``save()``/``wait()`` with what it means; the log keeps one line per
    thread, for the logs of a multi-process job."""
    if record.exc_info and any(m in str(record.msg) for m in _THREAD_FAILED):
        record.exc_info, record.exc_text, record.stack_info = None, None, None
    return True


def quiet_thread_tracebacks() -> None:
    """Install :func:`_one_line_per_failed_thread` on absl's logger (once)."""
    absl_log = logging.getLogger("absl")
    if _one_line_per_failed_thread not in absl_log.filters:
        absl_log.addFilter(_one_line_per_failed_thread)


def close_quietly(manager: ocp.CheckpointManager, reported: BaseException | None) -> None:
    """Close ``manager`` after a failed save.

    Orbax keeps a failed save's error in several places and raises it again at later
    calls: once per calling thread, and once per queued metadata write. Each close drains
    one; ``reported`` (the error being raised to the user) is not logged again.
    """
    for _ in range(5):
        try:
            manager.close()
            return
        except Exception as again:  # noqa: BLE001 - the error being reported, or logged
            if reported is None or (again is not reported and again is not reported.__cause__):
                log.error("another background error in %s: %r", manager.directory, again)


def pytree_items(step_dir: epath.Path) -> list[str]:
    """Items of a step that hold a PyTree (``state``, ``default``, or user-named)."""
    out = []
    for child in sorted(step_dir.iterdir(), key=lambda p: p.name):
        if child.name.startswith("ocdbt.process_"):
            continue  # a PyTree's own per-process data, not an item
        if child.is_dir() and ((child / "_METADATA").exists()
                               or (child / "manifest.ocdbt").exists()):
            out.append(child.name)
    return out


def is_bare_pytree(step_dir: epath.Path) -> bool:
    """A step saved by a bare Checkpointer (``ocp.StandardCheckpointer().save(DIR/step,
    state)``): the PyTree is the step directory itself, with no item."""
    return (step_dir / "_METADATA").exists()


def item_metadata(item_dir: epath.Path) -> Any:
    """The saved tree of an item: ``ArrayMetadata`` leaves (shape, dtype) and scalars."""
    # The handler, not a Checkpointer: that one looks for a step record inside the item
    # and logs a warning that it is missing (it never is there).
    meta = _settled_read(_read_handler().metadata, item_dir)
    meta = getattr(meta, "item_metadata", meta)
    return meta.tree if hasattr(meta, "tree") else meta


def restore_item(item_dir: epath.Path, abstract: Any, subtree: tuple[str, ...] = (),
                 check: fingerprint.Check | None = None) -> Any:
    """Read an item into ``abstract`` (``jax.ShapeDtypeStruct`` leaves with shardings);
    with ``subtree``, ``abstract`` is that subtree's and only its arrays are read.

    Arrays of up to a few MiB that this process holds whole are read by jaxckpt
    (:class:`_Placer`) straight into host buffers that their devices can take as they
    are, each checked against its fingerprint (``check``) and placed as soon as it is
    read, while the other reads go on. Orbax instead reads each array into a fresh numpy
    array, then copies it into a device buffer: on CPU that copy and the page faults of
    its new memory were a third of a cold 128 MiB restore's CPU time. Larger arrays go
    through Orbax, which overlaps their placement with the reads; so do arrays sharded
    across processes, each process reading its shards. ``check.tree`` then checks those
    where they are.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    leaves = [x for _, x in flat]
    placements = [_placed_after(x) for x in leaves]
    item = treedef.unflatten([x if s is None else jax.ShapeDtypeStruct(x.shape, x.dtype)
                              for x, s in zip(leaves, placements)])
    for key in reversed(subtree):
        item = {key: item}
    restore_args = ocp.checkpoint_utils.construct_restore_args(item)
    window = _read_window(item_dir, [x for x, s in zip(leaves, placements) if s is None])
    if not subtree and jax.process_count() == 1:
        _read_ahead(item_dir)
    prefix = tuple(jax.tree_util.DictKey(k) for k in subtree)
    placer = _Placer({prefix + path: (target_lib.path_str(path), s, x.size * x.dtype.itemsize)
                      for (path, x), s in zip(flat, placements) if s is not None}, check)
    token = _PLACER.set(placer)
    try:
        restored = _settled_read(
            ocp.Checkpointer(_read_handler(window)).restore, item_dir,
            args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                        partial_restore=bool(subtree)))
    finally:
        _PLACER.reset(token)
    for key in subtree:
        restored = restored[key]
    read = treedef.flatten_up_to(restored)
    # What the placer did not meet (read by another handler, or under another key path
    # than Orbax's) is still numpy: checked and copied into place now.
    left = [i for i, s in enumerate(placements) if s is not None and isinstance(read[i], np.ndarray)]
    if left:
        placed = placer.place([prefix + flat[i][0] for i in left], [read[i] for i in left])
        for i, array in zip(left, placed):
            read[i] = array
    return treedef.unflatten(read)


class _Placer:
    """Reads leaves into host buffers their devices can take without a copy, checks
    them, and places each batch as soon as it is read.

    ``leaves`` maps each leaf's key path, as Orbax names it (``ParamInfo.keypath``), to
    its path in the manifest, its sharding and its bytes. :class:`_SettledHandler` hands
    this placer the leaves Orbax's numpy handler would read; the read is Orbax's (its
    TensorStore spec, the same write of the stored array into a numpy array that Orbax's
    array handler does), into a 64-byte aligned buffer: on CPU ``jax.device_put`` then
    makes the buffer the device array's own instead of copying it. Leaves go in batches
    of up to ``_PLACE_BATCH_BYTES``, one ``device_put`` each: placed one by one, a
    restore of 1,000 small arrays took 0.89 s instead of 0.70.
    """

    def __init__(self, leaves: dict[tuple, tuple[str, jax.sharding.Sharding, int]],
                 check: fingerprint.Check | None):
        self.leaves = leaves
        self.check = check

    def place(self, keys: list[tuple], arrays: list[np.ndarray]) -> list[jax.Array]:
        """Check ``arrays`` (read for ``keys``), then put them on their devices."""
        if self.check is not None:
            for key, array in zip(keys, arrays):
                self.check.host(self.leaves[key][0], array)
        return jax.device_put(arrays, [self.leaves[key][1] for key in keys], may_alias=True)

    async def deserialize(self, inner: ocp.type_handlers.TypeHandler, infos, args) -> list:
        """``inner.deserialize(infos, args)``; the leaves this placer holds read and
        placed here, a batch as soon as it is read."""
        keys = [_keypath(info) for info in infos]
        ours = [j for j, key in enumerate(keys) if key in self.leaves]
        if not ours or type(inner) is not ocp.type_handlers.NumpyHandler:
            return await inner.deserialize(infos, args)
        args = list(args) if args else [ocp.type_handlers.RestoreArgs()] * len(infos)
        batches = _batches(ours, [self.leaves[keys[j]][2] for j in ours], _PLACE_BATCH_BYTES)
        rest = sorted(set(range(len(infos))) - set(ours))

        async def read_and_place(batch: list[int]) -> list[jax.Array]:
            arrays = await asyncio.gather(*(_read_aligned(infos[j], args[j]) for j in batch))
            return self.place([keys[j] for j in batch], arrays)

        async def read_rest() -> list:
            if not rest:
                return []
            return list(await inner.deserialize([infos[j] for j in rest],
                                                [args[j] for j in rest]))

        *placed, others = await asyncio.gather(*map(read_and_place, batches), read_rest())
        out: list[Any] = [None] * len(infos)
        for j, value in zip(itertools.chain(*batches, rest), itertools.chain(*placed, others)):
            out[j] = value
        return out


async def _read_aligned(info: ocp.type_handlers.ParamInfo,
                        arg: ocp.type_handlers.RestoreArgs) -> np.ndarray:
    """One stored array, read as Orbax's numpy handler reads it, into a new buffer
    aligned for a device array (XLA's CPU client aliases a host buffer only when it is
    64-byte aligned; numpy's and TensorStore's are 16)."""
    tspec = ocp.type_handlers.get_json_tspec_read(
        info, use_ocdbt=info.is_ocdbt_checkpoint,
        raise_array_data_missing_error=info.raise_array_data_missing_error)
    tspec = ocp.type_handlers.get_cast_tspec_deserialize(tspec, arg)
    store = await ts.open(ts.Spec(tspec), open=True, context=info.ts_context)
    out = _aligned_empty(tuple(store.shape), store.dtype.numpy_dtype)
    await ts.array(out).write(store)
    return out


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)


_ALIGN = 64


def _keypath(info: Any) -> tuple | None:
    keypath = getattr(info, "keypath", None)
    return tuple(keypath) if keypath is not None else None


_PLACER: contextvars.ContextVar[_Placer | None] = contextvars.ContextVar(
    "jaxckpt_placer", default=None)
"""The :class:`_Placer` of the restore in progress on this thread."""


def _read_handler(window: int | None = None) -> ocp.PyTreeCheckpointHandler:
    """Orbax's PyTree handler, reading through :class:`_SettledHandler`s, with at most
    ``window`` bytes of arrays in flight (None: Orbax's default, all of them)."""
    return ocp.PyTreeCheckpointHandler(
        type_handler_registry=_SETTLED_REGISTRY,
        restore_concurrent_gb=None if window is None else window / 1e9)


def _read_window(item_dir: epath.Path, leaves: list[Any]) -> int | None:
    """The bytes of arrays a local restore keeps in flight: a few arrays' worth.

    Each array Orbax reads passes through two fresh host buffers (tensorstore's read of
    the file, then the array it is decoded into) before its device copy. With every array
    in flight at once, each buffer is new memory the kernel must fault in page by page
    (~280k faults for 512 MiB, most of a cold restore's CPU time on a 2-core VM); with a
    few in flight, the buffers of finished arrays are reused. Remote storage keeps
    Orbax's default: there, concurrency hides each request's latency.
    """
    if storage.is_remote(item_dir):
        return None
    largest = max((x.size * x.dtype.itemsize for x in leaves
                   if isinstance(x, jax.ShapeDtypeStruct)), default=0)
    # Orbax refuses an array larger than the window.
    return max(_READ_WINDOW_BYTES, 2 * largest + 1)


_READ_WINDOW_BYTES = 64 << 20


def _read_ahead(item_dir: epath.Path) -> None:
    """Ask the kernel to read a local item's files into the page cache now, in the
    background (``posix_fadvise(WILLNEED)``), when they fit in free memory.

    A whole restore reads every byte of them anyway, but as many concurrent reads of a
    few MiB each, which a virtual disk serves slower than one sequential pass (measured
    here: 0.4-0.8 GB/s against 0.7-1.6 GB/s). Read ahead, a cold 512 MiB restore took
    0.62-0.82 s instead of 0.72-1.05 s. The data is still read from the disk once.
    """
    if storage.is_remote(item_dir) or not hasattr(os, "posix_fadvise"):
        return
    try:
        files = dict(storage.walk_files(item_dir))
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if sum(files.values()) > free // 2:
            return
        for rel in files:
            fd = os.open(os.path.join(item_dir, rel), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
    except (OSError, ValueError):
        return  # only a hint: the read reports what is wrong with these files


def _settled_read(read: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``read(*args, **kwargs)``, an Orbax read through :func:`_read_handler`, raising the
    first error of its leaves once every leaf's read has finished.

    What Orbax makes of the placeholders a failed batch returns (a result, or an error
    of its own) is dropped: the read's error is the one to raise.
    """
    failed: list[Exception] = []
    token = _FAILED_READS.set(failed)
    try:
        out = read(*args, **kwargs)
    except Exception:
        if not failed:
            raise
        out = None
    finally:
        _FAILED_READS.reset(token)
    if failed:
        raise failed[0]
    return out


_FAILED_READS: contextvars.ContextVar[list[Exception] | None] = contextvars.ContextVar(
    "jaxckpt_failed_reads", default=None)
"""Where :class:`_SettledHandler` puts the error of a failed batch (``_settled_read``'s)."""

_READ_TASKS: contextvars.ContextVar[set[asyncio.Task] | None] = contextvars.ContextVar(
    "jaxckpt_read_tasks", default=None)
"""The tasks a batch's read starts (see ``_track_tasks``)."""


class _SettledHandler(ocp.type_handlers.TypeHandler):
    """An Orbax type handler whose reads have all finished when one of them fails.

    Orbax runs each read in an event loop of its own and closes it as soon as the read
    raises. A leaf that fails (its step deleted meanwhile by a live writer's retention)
    makes ``asyncio.gather`` raise with the batch's other reads still in flight: they
    then finish on the closed loop, and asyncio prints "Event loop is closed" and
    "Future exception was never retrieved" tracebacks after jaxckpt has handled the
    error. Here a failed batch awaits its other reads, and hands its error
    to :func:`_settled_read` rather than to Orbax, which therefore waits for its other
    batches too (placeholders in their results stand for the failed leaves).
    """

    def __init__(self, inner: ocp.type_handlers.TypeHandler):
        self._inner = inner

    def __getattr__(self, name: str) -> Any:  # Orbax reads some handlers' own attributes
        if name == "_inner":
            raise AttributeError(name)
        return getattr(self._inner, name)

    def typestr(self) -> str:
        return self._inner.typestr()

    async def metadata(self, infos):
        return await _settle(lambda: self._inner.metadata(infos), len(infos))

    async def deserialize(self, infos, args=None):
        placer = _PLACER.get()
        if placer is None:
            return await _settle(lambda: self._inner.deserialize(infos, args), len(infos))
        return await _settle(lambda: placer.deserialize(self._inner, infos, args), len(infos))

    async def serialize(self, values, infos, args=None):
        return await self._inner.serialize(values, infos, args)

    def finalize(self, directory: epath.Path) -> None:
        self._inner.finalize(directory)


async def _settle(start: Callable[[], Any], count: int) -> Any:
    """Await ``start()``; when it raises, first await every task it started."""
    tasks: set[asyncio.Task] = set()
    _track_tasks(asyncio.get_running_loop())
    token = _READ_TASKS.set(tasks)
    try:
        return await start()
    except Exception as e:
        # Awaited, not cancelled: a read that has just finished on a tensorstore thread
        # still hands its result to this loop, cancelled or not.
        await asyncio.gather(*tasks, return_exceptions=True)
        failed = _FAILED_READS.get()
        if failed is None:
            raise
        failed.append(e)
        return [None] * count
    finally:
        _READ_TASKS.reset(token)
        # Each task's context holds this set: a cycle (set, task, context) that kept
        # every task's result, the arrays just read, alive until the garbage collector
        # ran, and the next restore faulted in fresh memory instead of reusing theirs.
        tasks.clear()


def _track_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Make ``loop`` (Orbax's own, for one read) add each task it creates to the
    ``_READ_TASKS`` of the code creating it: ``asyncio.gather`` keeps no list of them."""
    factory = loop.get_task_factory()
    if getattr(factory, "jaxckpt_tracks", False):
        return

    def tracked(loop, coro, **kwargs):
        task = (factory(loop, coro, **kwargs) if factory is not None else
                asyncio.Task(coro, loop=loop, **kwargs))
        started = _READ_TASKS.get()
        if started is not None:
            started.add(task)
        return task
    tracked.jaxckpt_tracks = True
    loop.set_task_factory(tracked)


class _SettledRegistry:
    """Orbax's global type handlers, each read through a :class:`_SettledHandler` (one
    per handler: Orbax batches the leaves of one handler together)."""

    def __init__(self):
        self._wrapped: dict[Any, _SettledHandler] = {}

    def get(self, ty: Any) -> _SettledHandler:
        inner = ocp.type_handlers.get_type_handler(ty)
        wrapped = self._wrapped.get(inner)
        if wrapped is None:
            wrapped = self._wrapped.setdefault(inner, _SettledHandler(inner))
        return wrapped

    def has(self, ty: Any) -> bool:
        return ocp.type_handlers.has_type_handler(ty)

    def add(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("jaxckpt reads with Orbax's global type handlers: register a "
                        "handler with ocp.type_handlers.register_type_handler.")


_SETTLED_REGISTRY = _SettledRegistry()


_PLACED_AFTER_MAX_BYTES = 4 << 20
"""The largest array jaxckpt reads and places itself (see ``restore_item``)."""

_PLACE_BATCH_BYTES = 4 << 20
"""Bytes of arrays checked, then placed, at a time: within a server CPU's cache."""


def _batches(items: list[int], sizes: list[int], limit: int) -> list[list[int]]:
    """``items`` in order, cut into runs of at most ``limit`` bytes (one item at least)."""
    out: list[list[int]] = []
    total = 0
    for item, size in zip(items, sizes):
        if not out or total + size > limit:
            out.append([])
            total = 0
        out[-1].append(item)
        total += size
    return out


def _placed_after(leaf: Any) -> jax.sharding.Sharding | None:
    """The sharding to place ``leaf`` with after reading it as numpy, or None to leave
    it to Orbax (not an array target, a large array, or one this process does not hold
    whole)."""
    if not isinstance(leaf, jax.ShapeDtypeStruct) or leaf.sharding is None or \
            leaf.size * leaf.dtype.itemsize > _PLACED_AFTER_MAX_BYTES:
        return None
    return leaf.sharding if _whole_here(leaf.sharding) else None


@target_lib.per_sharding
def _whole_here(sharding: jax.sharding.Sharding) -> bool:
    return sharding.is_fully_addressable


def as_subtree(subtree: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"params"`` or ``("params", "Dense_0")`` as a key path; None: the whole state."""
    if subtree is None:
        return ()
    path = (subtree,) if isinstance(subtree, str) else tuple(subtree)
    if not path or not all(isinstance(k, str) and k for k in path):
        raise TypeError(f"subtree must be a dict key or a tuple of dict keys, e.g. 'params' "
                        f"or ('params', 'Dense_0'); got {subtree!r}.")
    return path


def restore_state(step_dir: epath.Path, target: Any, *, step: int,
                  subtree: tuple[str, ...] = (), fingerprints: dict | None = None,
                  saved: "target_lib.SavedLeaves | None" = None) -> Any:
    """The state of the checkpoint in ``step_dir``, whoever wrote it, into ``target``.

    The state is item ``state`` (jaxckpt), ``default`` (a plain Orbax manager) or the
    step directory itself (a bare Orbax checkpointer's save). A plain Orbax Composite
    save of other PyTree items, or of more than one, is the dict of its PyTree items
    (``{"params": ..., "opt_state": ...}``), restored with a dict target of those keys;
    ``subtree``'s first key then names an item.

    ``fingerprints`` (a version-2 manifest's) are compared with the arrays just read;
    ``saved`` (its leaves' shapes and dtypes) checks ``target`` without reading Orbax's
    metadata of every array.

    Raises:
      RestoreStructureError: ``subtree`` is not in the checkpoint, or ``target`` does not
        fit it (each names the keys the checkpoint has).
      ArraysCorrupt: the restored arrays differ from their saved fingerprints.
    """
    if fingerprints is not None or saved is not None:  # jaxckpt's: its item is known
        return _restore_into(step_dir / fmt.STATE, target, step, subtree, fingerprints, saved)
    if is_bare_pytree(step_dir):
        return _restore_into(step_dir, target, step, subtree)
    items = pytree_items(step_dir)
    # The state is the item itself only when it is the only PyTree item: a plain Orbax
    # Composite(state=..., opt_state=...) is the dict of its items (taking "state" alone
    # lost every other item, silently).
    main = items[0] if items in ([fmt.STATE], [ORBAX_DEFAULT_ITEM]) else None
    if main is not None:
        ours = main == fmt.STATE
        return _restore_into(step_dir / main, target, step, subtree,
                             fingerprints if ours else None, saved if ours else None)
    if not items:
        raise CheckpointNotFoundError(
            f"checkpoint {step} in {step_dir.parent} holds no PyTree item (it has "
            f"{sorted(p.name for p in step_dir.iterdir())}); it cannot be restored as a state.")
    if subtree:
        if subtree[0] not in items:
            raise RestoreStructureError(
                f"subtree {subtree} is not in checkpoint {step} in {step_dir.parent}: it is a "
                f"plain Orbax Composite save with the items {items}.")
        return _restore_into(step_dir / subtree[0], target, step, subtree[1:])
    if target is None:
        target = dict.fromkeys(items)
    elif not (isinstance(target, Mapping) and sorted(target) == items):
        raise RestoreStructureError(
            f"checkpoint {step} in {step_dir.parent} is a plain Orbax Composite save with "
            f"the items {items}: pass a dict target with exactly these keys (each item's "
            "target), restore one item with subtree='<item>', or pass target=None.")
    return {n: _restore_into(step_dir / n, target[n], step, ()) for n in items}


def _restore_into(item_dir: epath.Path, target: Any, step: int,
                  subtree: tuple[str, ...], fingerprints: dict | None = None,
                  saved: "target_lib.SavedLeaves | None" = None) -> Any:
    prefix = "".join(f"{k}/" for k in subtree)
    leaves = saved.under(prefix) if saved and target is not None else None
    if leaves is None:
        leaves = _subtree_of(item_metadata(item_dir), subtree, step)
    plan = target_lib.restore_plan(leaves, target, step)
    check = fingerprint.Check(fingerprints, prefix) if fingerprints else None
    try:
        raw = restore_item(item_dir, plan.abstract, subtree, check)
    except ValueError as e:
        error = _structure_error(e, step)
        if error is None:
            raise
        raise error from None
    if check is not None:
        problems = check.tree(raw).problems
        if problems:
            raise ArraysCorrupt(step, tuple(f"{item_dir.name}/{p}" for p in problems))
    return plan.finish(raw)


def _structure_error(e: ValueError, step: int) -> RestoreStructureError | None:
    """Orbax's "tree structures do not match", for a target whose arrays all match the
    checkpoint but whose empty nodes do not (``optax.adamw`` for ``optax.adam``: the same
    moments, one more empty state in the chain)."""
    text = str(e)
    head = "tree structures do not match:"
    if head not in text:
        return None
    where = text.split(head, 1)[1].split("If this mismatch is intentional")[0].strip()
    # Orbax's "Source" is the item it was given (the target), its "Target" what is on disk.
    where = where.replace("- Source:", "- target:").replace("- Target:", "- checkpoint:")
    return RestoreStructureError(
        f"restore target does not match checkpoint {step}: every array matches, but the "
        f"containers around them differ:\n{where}\nOften a "
        "different optimizer chain with the same moments (optax.adamw for optax.adam). "
        "Build the target from the same model/optimizer config that wrote the checkpoint, "
        "or restore with target=None to get the saved arrays as numpy.")


class ArraysCorrupt(Exception):
    """Restored arrays differ from the fingerprints saved with them."""

    def __init__(self, step: int, problems: tuple[str, ...]):
        super().__init__("; ".join(problems))
        self.step, self.problems = step, problems


def _subtree_of(saved: Any, subtree: tuple[str, ...], step: int) -> Any:
    node = saved
    for depth, key in enumerate(subtree):
        if not isinstance(node, Mapping) or key not in node:
            where = "/".join(subtree[:depth]) or "the top level"
            has = (f"the keys {sorted(node)}" if isinstance(node, Mapping) else
                   f"a {type(node).__name__}, not a dict")
            raise RestoreStructureError(
                f"subtree {subtree} is not in checkpoint {step}: at {where} it holds {has}. "
                "Name dict keys of the saved state (restore with target=None to see them).")
        node = node[key]
    return node
