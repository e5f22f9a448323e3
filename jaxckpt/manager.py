"""``CheckpointManager``: jaxckpt's policy on top of Orbax's storage and async I/O.

Orbax writes each checkpoint (atomically: a checkpoint is visible only once complete)
and runs the write in the background. jaxckpt owns everything Orbax leaves to chance:
which steps are written, which are kept (best-K by metric union latest-N, computed by
:mod:`jaxckpt.policy`), the metric history of every step, and the tracker state that a
restarted process needs to know what the best checkpoint really is.

On disk, beside Orbax's step directories::

    DIR/jaxckpt.json        history + policy, rewritten atomically by the primary process
    DIR/<step>/state/       the state pytree (Orbax StandardSave)
    DIR/<step>/meta/        JSON: step, epoch, metrics, time (the step's own record)
    DIR/<step>/data_state/  JSON: the data iterator's state, when given
    DIR/<step>/jaxckpt_manifest.json  every file's size and CRC-32C (:mod:`jaxckpt.integrity`)
    DIR/jaxckpt.lock        the writing run's owner record and heartbeat (:mod:`jaxckpt.lock`)
    DIR/jaxckpt-corrupt/    checkpoints that failed verification, moved out of the way

Everything is JSON or tensorstore arrays: nothing loaded from a checkpoint can run code.

Fault tolerance, in short: a checkpoint is visible only once Orbax has committed it (a
writer killed mid-write leaves a temporary directory that readers ignore and the next
writer deletes). The manifest is computed in the background after the commit. A
checkpoint that fails verification (a file truncated, changed or missing; a manifest or
JSON file that does not parse or fails its schema) is *set aside*: never restored, never
best, never deleted; the next save of a writing manager moves it to ``jaxckpt-corrupt/``
so that the run can redo its steps. ``restore("latest")``/``("best")`` fall back to the
newest (best) checkpoint that verifies, with a warning. A checkpoint without a manifest
(the writer died between the commit and the manifest) is unverified but usable.
"""

from __future__ import annotations

import base64
import concurrent.futures
import itertools
import json
import logging
import math
import os
import threading
import time
import uuid
import warnings
from typing import Any, Callable, Literal, Mapping, NamedTuple, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxckpt import integrity
from jaxckpt import target as target_lib
from jaxckpt.errors import (CheckpointCorruptError, CheckpointDirectoryError,
                            CheckpointNotFoundError, CheckpointWriteError,
                            DirectoryLockedError, RestoreStructureError)
from jaxckpt.lock import DirectoryLock, describe, read_owner
from jaxckpt.policy import CheckpointPolicy, Record, auto_interval

__all__ = ["CheckpointManager", "Checkpoint", "HISTORY_FILE"]

log = logging.getLogger("jaxckpt")


class _OrbaxNoise(logging.Filter):
    """Drop Orbax's warnings about options jaxckpt sets on purpose (read-only inspection)."""

    EXPECTED = ("CheckpointManagerOptions.read_only=True", "Given directory is read only")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.EXPECTED)


logging.getLogger("absl").addFilter(_OrbaxNoise())

HISTORY_FILE = "jaxckpt.json"
CORRUPT_DIR = "jaxckpt-corrupt"
_BARRIERS = itertools.count()
_FORMAT = "jaxckpt/1"
_BYTES_KEY = "__bytes_b64__"

Which = Literal["latest", "best"] | int


class Checkpoint(NamedTuple):
    """A restored checkpoint: the state and everything saved beside it."""

    step: int
    state: Any
    metrics: dict[str, float] | None
    epoch: int | None
    data_state: Any


class _Entry(NamedTuple):
    step: int
    metrics: dict[str, float] | None
    epoch: int | None
    time: float
    saved: bool


class CheckpointManager:
    """Saves a state pytree asynchronously and keeps the checkpoints a policy asks for.

    Synopsis::

        policy = jaxckpt.CheckpointPolicy(monitor="val_loss", keep_best=1, keep_latest=1)
        with jaxckpt.CheckpointManager("/tmp/run/checkpoints", policy) as mngr:
            for epoch in range(1, 51):
                state, metrics = train_epoch(state)
                mngr.save(epoch, state, metrics=metrics)
            best = mngr.restore("best", target=state)

    Args:
      directory: a local path or a ``gs://`` URL; created if missing.
      policy: a :class:`CheckpointPolicy`. None keeps the latest checkpoint only, or,
        when reopening a directory, the policy it was written with.
      async_save: write in the background; ``save`` returns once the state is copied
        off the device. A failed background write is raised by the next ``save``/``wait``.
        With several processes, checkpoints a save replaces are deleted at the next
        ``save``/``wait``/``close``, on the calling thread: Orbax's delete ends in a
        collective, which must not run beside the training step's.
      read_only: inspect only: never writes, deletes, locks or cleans the directory.
      clock: the time source for ``every_seconds`` (injectable for tests).

    Raises:
      DirectoryLockedError: another live run writes to ``directory`` (names it). One
        multi-process JAX job is one writer: only process 0 takes the lock.
      CheckpointDirectoryError: ``directory`` is a file or not writable.
    """

    def __init__(self, directory: str | os.PathLike, policy: CheckpointPolicy | None = None,
                 async_save: bool = True, *, read_only: bool = False,
                 clock: Callable[[], float] = time.time):
        if "://" not in os.fspath(directory):  # Orbax requires absolute local paths
            directory = os.path.abspath(os.fspath(directory))
        self._dir = epath.Path(directory)
        self._read_only = read_only
        self._clock = clock
        self._async = async_save
        self._primary = jax.process_index() == 0
        _check_directory(self._dir, read_only=read_only)
        stored = _read_history_file(self._dir)
        if policy is None:
            policy = (CheckpointPolicy(**stored["policy"]) if stored and stored.get("policy")
                      else CheckpointPolicy())
        if not isinstance(policy, CheckpointPolicy):
            raise TypeError(f"policy must be a jaxckpt.CheckpointPolicy, got {type(policy)}.")
        self.policy = policy
        self._entries: list[_Entry] = _entries_from_json(stored)
        self._records: dict[int, Record] = {}
        # Steps that failed verification: out of every decision until moved aside.
        self._corrupt: dict[int, list[str]] = {}
        # Before Orbax: its start-up deletes temporary directories, which are another
        # live writer's in-flight checkpoints until the lock says that writer is gone.
        self._dirlock = None if read_only else self._lock_directory()
        try:
            self._ocp = self._new_orbax()
            for step in self._ocp.all_steps():
                problems, _ = self._check(step, checksums=False)  # sizes: a stat per file
                if problems:
                    self._set_aside(step, problems, warn=True)
                else:
                    self._records[step] = self._record_from_meta(step)
            if self._primary and not read_only:
                _remove_stale_temp_files(self._dir)
        except BaseException:
            if self._dirlock is not None:
                self._dirlock.release()
            raise
        self._start_time = clock()
        self._last_save_time = stored.get("last_save_time") if stored else None
        self._auto_every: int | None = stored.get("auto_every") if stored else None
        self._save_cost_s: float | None = stored.get("save_cost_s") if stored else None
        if not self._entries:  # no history file: rebuild what the checkpoints remember
            self._entries = [self._entry_from_meta(s) for s in sorted(self._records)]
        # Background work (commit wait, deletions, history writes) runs in one FIFO thread,
        # so history snapshots land on disk in the order they were taken.
        self._futures: list[concurrent.futures.Future] = []
        # Multi-process: Orbax's delete() ends with a device-collective barrier, which
        # deadlocks against the training step's collectives when run from a thread (the
        # two processes interleave them differently). The worker leaves deletions here;
        # the calling thread applies them where every process makes the same calls.
        self._deferred_deletes: list[int] = []
        self._delete_in_background = jax.process_count() == 1
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxckpt")
        self._lock = threading.Lock()
        self._last_call: tuple[float, int] | None = None
        self._auto_started = False
        self._warned_no_metrics = False
        self._step_time_s: float | None = None
        self._closed = False

    # -- public properties --------------------------------------------------------------

    @property
    def directory(self) -> epath.Path:
        return self._dir

    def latest_step(self) -> int | None:
        """The newest kept checkpoint's step, or None when there is none."""
        return max(self._records) if self._records else None

    def best_step(self) -> int | None:
        """The best kept checkpoint's step by the monitored metric (None without one)."""
        best = self.policy.best(self._records.values())
        return best.step if best else None

    @property
    def every_n_steps(self) -> int | None:
        """The save interval in steps: the policy's, or the one ``every="auto"`` chose."""
        return self.policy.every_n_steps or self._auto_every

    def all_steps(self) -> list[int]:
        """Orbax's name for :meth:`steps`."""
        return self.steps()

    def steps(self) -> list[int]:
        """Steps of the kept checkpoints, oldest first (an in-flight save included)."""
        return sorted(self._records)

    def history(self) -> list[dict[str, Any]]:
        """Every step given to ``save`` with metrics, kept or not: ``{"step", "metrics"}``."""
        return [{"step": e.step, "metrics": dict(e.metrics)} for e in self._entries
                if e.metrics is not None]

    def entries(self) -> list[dict[str, Any]]:
        """The full history: step, epoch, metrics, time, whether it was written, kept."""
        return [{**e._asdict(), "kept": e.step in self._records} for e in self._entries]

    def kept_reasons(self) -> dict[int, list[str]]:
        """Why each kept checkpoint is kept (``"best #1"``, ``"latest"``)."""
        return self.policy.kept(list(self._records.values()))

    def metrics(self, step: int) -> dict[str, float] | None:
        """The metrics saved with checkpoint ``step``."""
        return self._read_meta(self._resolve(step)).get("metrics")

    # -- saving --------------------------------------------------------------------------

    def save(self, step: int, state: Any, metrics: Mapping[str, Any] | None = None,
             data_state: Any = None, *, epoch: int | None = None, force: bool = False) -> bool:
        """Save ``state`` at ``step`` if the policy wants it; return whether it did.

        Args:
          step: the training step; must be above the latest saved step.
          state: any pytree of arrays (a :class:`jaxckpt.TrainState`, a dict, ...).
          metrics: scalar metrics of this step; must hold the monitored one when given.
            Recorded in :meth:`history` whether or not the state is written.
          data_state: the data iterator's state (a JSON-able dict, or bytes).
          epoch: completed epochs, for ``every_n_epochs`` and for the record.
          force: write even if not due (e.g. on preemption).

        Raises:
          MetricError: ``metrics`` lacks the monitored metric (lists what it got).
          ValueError: ``step`` is not above the latest saved step.
          CheckpointWriteError: the previous background write failed.
          DirectoryLockedError: another run took this directory's lock over.
        """
        self._check_open(write=True)
        self._check_lock()
        self._raise_finished()
        step = _as_step(step)
        if self.latest_step() is not None and step <= self.latest_step():
            raise ValueError(
                f"save(step={step}) is not above the latest saved step {self.latest_step()} in "
                f"{self._dir}. Steps must increase: resume from restore('latest') and continue "
                "its step count, or save into a new directory.")
        clean = _clean_metrics(metrics)
        value = self.policy.monitored_value(clean)
        if self.policy.monitor and clean is None and not self._warned_no_metrics:
            self._warned_no_metrics = True  # Trainer's mid-epoch saves have none, by design
            log.warning("save(step=%d) without metrics: a checkpoint saved without %r can be "
                        "kept as latest, never best (reported once per manager).",
                        step, self.policy.monitor)
        if value is not None and not math.isfinite(value):
            warnings.warn(f"{self.policy.monitor}={value} at step {step} is not finite: the "
                          "checkpoint can be kept as latest but never as best.", stacklevel=2)
            value = None
        now = self._clock()
        self._observe_step_time(step)
        due = force or self.policy.is_due(
            step, epoch=epoch, now=now,
            last_save_time=self._last_save_time if self._last_save_time else self._start_time)
        due = due or self._auto_due(step)
        reason = "forced" if force else self.policy.should_save(
            value, list(self._records.values()), due=due)
        recorded = self._record_entry(_Entry(step, clean, epoch, now, reason is not None))
        if reason is None:
            log.debug("step %d: not saved (not due, not among the best)", step)
            if recorded:
                self._submit(self._write_history, self._snapshot())
            return False
        self._finish_pending()  # Orbax writes one checkpoint at a time
        self._move_corrupt_aside()
        self._write(step, state, clean, epoch, data_state, now, value, reason)
        self._auto_started = True
        self._last_call = (time.perf_counter(), step)  # step time excludes the save itself
        return True

    def wait(self) -> None:
        """Block until every background write has committed (and raise if one failed)."""
        self._check_open()
        self._finish_pending()
        self._check_lock()

    def close(self) -> None:
        """Finish writes and release resources; the manager cannot be used afterwards."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self._worker.shutdown(wait=True)
            try:
                self._ocp.close()
            finally:
                if self._dirlock is not None:
                    self._dirlock.release()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # keep the original exception; still flush what can be flushed
            self.close()
        except Exception as close_error:  # noqa: BLE001 - reported, not hidden
            log.error("while closing after %s: %s", exc_type.__name__, close_error)

    def __del__(self):
        if not getattr(self, "_closed", True):
            try:
                self._worker.shutdown(wait=False)
                if getattr(self, "_dirlock", None) is not None:
                    self._dirlock.release()
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass

    # -- restoring -----------------------------------------------------------------------

    def restore(self, which: Which = "latest", target: Any = None) -> Any:
        """The state saved at ``which`` (``"latest"``, ``"best"`` or a step).

        Args:
          which: ``"latest"``, ``"best"`` or an int step from :meth:`steps`.
          target: None for plain numpy arrays in nested dicts/lists (works whatever the
            number of processes or devices that wrote it); or a pytree of arrays or
            ``jax.ShapeDtypeStruct`` (with shardings) of the saved structure, in which case
            the arrays come back placed like the target, in the target's containers.

        Raises:
          CheckpointNotFoundError: no such checkpoint (lists the available steps).
          CheckpointCorruptError: checkpoint ``which`` (an int step) fails verification,
            or no checkpoint does (names each step and bad file). ``"latest"`` and
            ``"best"`` skip a checkpoint that fails, with a warning naming it, and restore
            the newest (for ``"best"``: the next best, then the newest) that verifies.
          RestoreStructureError: ``target`` differs from the checkpoint (lists the keys).

        Every file is checked against the checkpoint's manifest (size and CRC-32C) before
        Orbax reads it. A checkpoint without a manifest is restored with a warning.
        """
        return self.restore_checkpoint(which, target).state

    def restore_checkpoint(self, which: Which = "latest", target: Any = None) -> Checkpoint:
        """Like :meth:`restore`, with the step's metrics, epoch and data state."""
        self._check_open()
        self._finish_pending()
        step = self._resolve_verified(which)
        state = self._restore_state(step, target)
        meta = self._read_meta(step)
        return Checkpoint(step, state, meta.get("metrics"), meta.get("epoch"),
                          self._read_data_state(step))

    def restore_data_state(self, which: Which = "latest") -> Any:
        """The data iterator state saved with checkpoint ``which`` (None if none was).

        ``which`` resolves as in :meth:`restore` (verified, with the same fallback), so
        the data state always belongs to the checkpoint ``restore(which)`` returns.
        """
        self._check_open()
        self._finish_pending()
        return self._read_data_state(self._resolve_verified(which))

    def verify(self, step: int | None = None, *, checksums: bool = True,
               strict: bool = False) -> dict[int, list[str]]:
        """Check checkpoints against the manifests written when they were committed.

        Args:
          step: one step, or None for every checkpoint in the directory (those already
            found corrupt included).
          checksums: read every file and compare its CRC-32C (else sizes only: a ``stat``
            per file, which finds truncated and missing files, not changed bytes).
          strict: count a checkpoint without a manifest as a problem. Otherwise it is
            unverified but usable, and reported with a warning.

        Returns:
          ``{step: problems}`` for each step checked, oldest first; an empty list means
          the checkpoint verifies. Each problem names the file, relative to the step's
          directory (``"state/d/1f0c...: size 12 bytes, manifest says 2536"``). A step
          that fails is set aside, as when :meth:`restore` finds it.

        Raises:
          CheckpointNotFoundError: ``step`` is not a checkpoint of this directory.
        """
        self._check_open()
        self._finish_pending()
        everything = sorted(set(self._records) | set(self._corrupt))
        if step is None:
            steps = everything
        else:
            steps = [_as_step(step)]
            if steps[0] not in everything:
                raise CheckpointNotFoundError(
                    f"no checkpoint for step {steps[0]} in {self._dir}; available steps: "
                    f"{everything or 'none'}.")
        out, unverified = {}, []
        for s in steps:
            problems, verified = self._check(s, checksums=checksums)
            if problems:
                self._set_aside(s, problems)
            elif s in self._corrupt:  # a transient read error, or repaired by hand
                del self._corrupt[s]
                self._records[s] = self._record_from_meta(s)
            if not problems and not verified:
                unverified.append(s)
                if strict:
                    problems = [integrity.UNVERIFIED]
            out[s] = problems
        if unverified and not strict:
            warnings.warn(f"checkpoint(s) {unverified} in {self._dir} have no manifest: "
                          "unverified but usable (the writer stopped between Orbax's commit "
                          "and the manifest, or they predate manifests).", stacklevel=2)
        return out

    # -- internals: writing --------------------------------------------------------------

    def _write(self, step, state, metrics, epoch, data_state, now, value, reason) -> None:
        items = {"state": ocp.args.StandardSave(target_lib.to_saveable(state)),
                 "meta": ocp.args.JsonSave({"format": _FORMAT, "step": step, "epoch": epoch,
                                            "metrics": metrics, "time": now,
                                            "reason": reason})}
        if data_state is not None:
            items["data_state"] = ocp.args.JsonSave(_encode_data_state(data_state))
        start = time.perf_counter()
        try:
            self._ocp.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:
            self._mark_unsaved({step})
            self._reset_orbax(e)
            raise CheckpointWriteError(
                f"saving step {step} to {self._dir} failed: {e!r}. Earlier checkpoints are "
                "intact; fix the cause (disk space, permissions) and save again.") from e
        blocked = time.perf_counter() - start
        self._records[step] = Record(step, value)
        self._last_save_time = now
        kept = self.policy.kept(list(self._records.values()))
        stale = sorted(set(self._records) - set(kept))
        for s in stale:
            del self._records[s]
        log.debug("step %d saved (%s); keeping %s; deleting %s after commit", step, reason,
                  kept, stale)
        self._submit(self._commit, step, stale, start, blocked)
        if not self._async:
            self._finish_pending()

    def _commit(self, step: int, stale: list[int], start: float, blocked: float) -> None:
        """Background: wait for Orbax's commit of ``step``, write its manifest, then
        delete what it replaced."""
        self._ocp.wait_until_finished()
        self._ocp.check_for_errors()
        if self._primary:
            # Every process's files are in place once Orbax has committed; reading them
            # back costs a disk read and a CRC at GB/s, here rather than on the training
            # thread. Counted in the save cost: it competes with training for the cores.
            step_dir = self._dir / str(step)
            integrity.write_manifest(step_dir, integrity.build_manifest(step_dir, step))
        write_s = time.perf_counter() - start
        self._update_cost(blocked, write_s)
        if self._delete_in_background:
            self._delete_steps(stale)
        else:
            with self._lock:
                self._deferred_deletes.extend(stale)
        self._write_history(self._snapshot())

    def _delete_steps(self, steps: list[int]) -> None:
        for s in steps:
            log.debug("deleting step %d: no longer among the kept checkpoints", s)
            self._ocp.delete(s)

    def _submit(self, fn, *args) -> None:
        self._futures.append(self._worker.submit(fn, *args))

    def _raise_finished(self) -> None:
        """Raise the error of a finished background task without waiting for the others."""
        while self._futures and self._futures[0].done():
            self._check_future(self._futures.pop(0))

    def _finish_pending(self) -> None:
        """Wait for every background task, then apply the deletions left for this thread."""
        try:
            while self._futures:
                self._check_future(self._futures.pop(0))
        finally:
            with self._lock:
                deferred, self._deferred_deletes = self._deferred_deletes, []
            self._delete_steps(deferred)

    def _check_future(self, future: concurrent.futures.Future) -> None:
        try:
            future.result()
        except Exception as e:
            self._reset_orbax(e)
            on_disk = set(self._ocp.all_steps())
            lost = sorted(set(self._records) - on_disk)
            for s in lost:
                del self._records[s]
            # Kept after all (its successor failed), unless it was set aside as corrupt
            # or a committed successor replaced it (its deletion is only deferred).
            for s in (on_disk - set(self._records) - set(self._corrupt)
                      - set(self._deferred_deletes)):
                self._records[s] = self._record_from_meta(s)
            self._mark_unsaved(set(lost))
            what = (f"background write of step(s) {lost} to {self._dir}" if lost else
                    f"background work after a committed checkpoint in {self._dir} (its "
                    "manifest, deletions or the history file)")
            raise CheckpointWriteError(
                f"{what} failed: {e!r}. Every earlier checkpoint is intact "
                f"({sorted(self._records)}); fix the cause (disk space, permissions) and "
                "save again.") from e

    def _new_orbax(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # jaxckpt decides what is deleted, and when
            enable_async_checkpointing=self._async,
            cleanup_tmp_directories=not self._read_only,
            create=not self._read_only,
            read_only=self._read_only,
        )
        handlers = {"state": _state_handler(),
                    "meta": ocp.JsonCheckpointHandler(),
                    "data_state": ocp.JsonCheckpointHandler()}
        return ocp.CheckpointManager(self._dir, options=options, item_handlers=handlers)

    def _reset_orbax(self, reported: BaseException) -> None:
        """After a failed save, continue with a fresh Orbax manager.

        Orbax keeps a failed save's error in several places and raises it again at later
        saves: once per calling thread, and once per queued metadata write. A new manager
        starts clean, and its start-up deletes the failed save's temporary directory.
        ``reported`` is the error being raised to the user; any other is logged.
        """
        for _ in range(5):  # each call drains one stored error
            try:
                self._ocp.close()
                break
            except Exception as again:  # noqa: BLE001 - the error being reported, or logged
                if again is not reported and again is not reported.__cause__:
                    log.error("another background error in %s: %r", self._dir, again)
        self._ocp = self._new_orbax()

    def _record_entry(self, entry: _Entry) -> bool:
        """Add ``entry`` to the history; return whether the history changed."""
        with self._lock:
            # A resumed run redoes the steps after its checkpoint: its entries replace those.
            kept = [e for e in self._entries if e.step < entry.step]
            changed = len(kept) != len(self._entries)
            if entry.metrics is not None or entry.saved:
                kept.append(entry)
                changed = True
            self._entries = kept
        return changed

    def _mark_unsaved(self, steps: set[int]) -> None:
        """Record in the history that the writes of ``steps`` failed."""
        with self._lock:
            self._entries = [e._replace(saved=False) if e.step in steps else e
                             for e in self._entries]

    def _entry_from_meta(self, step: int) -> _Entry:
        meta = self._read_meta(step)
        return _Entry(step, meta.get("metrics"), meta.get("epoch"),
                      float(meta.get("time") or 0.0), True)

    def _snapshot(self) -> dict:
        with self._lock:
            history = [e._asdict() for e in self._entries]
        return {"format": _FORMAT, "policy": self.policy.to_json(),
                "last_save_time": self._last_save_time, "auto_every": self._auto_every,
                "save_cost_s": self._save_cost_s, "history": history}

    def _write_history(self, snapshot: dict) -> None:
        if not self._primary or self._read_only:
            return
        _atomic_write_text(self._dir / HISTORY_FILE, json.dumps(snapshot))

    # -- internals: every="auto" ---------------------------------------------------------

    def _observe_step_time(self, step: int) -> None:
        """Training time per step, from the end of the previous call to this one."""
        if self._last_call is not None and step > self._last_call[1]:
            dt = (time.perf_counter() - self._last_call[0]) / (step - self._last_call[1])
            self._step_time_s = dt if self._step_time_s is None else 0.8 * self._step_time_s + 0.2 * dt
        self._last_call = (time.perf_counter(), step)

    def _update_cost(self, blocked: float, write_s: float) -> None:
        # A background write overlaps training; on shared cores it still slows it. Count
        # the blocking time in full and the write time in full: an upper bound, so the
        # budget holds on any machine.
        cost = blocked + write_s
        self._save_cost_s = cost if self._save_cost_s is None else 0.5 * self._save_cost_s + 0.5 * cost

    def _auto_due(self, step: int) -> bool:
        """every="auto": the first call saves (to measure its cost); later calls are due
        every N steps, N from the measured save cost and step time (none while measuring)."""
        if self.policy.every != "auto":
            return False
        if self._save_cost_s is None:
            return not self._auto_started  # one save to measure; none until it committed
        if not self._step_time_s:
            return False
        every = auto_interval(self._save_cost_s, self._step_time_s,
                              overhead_budget=self.policy.overhead_budget,
                              mtbf_hours=self.policy.mtbf_hours)
        if every != self._auto_every:
            log.info("every='auto': saving every %d steps (save cost %.3fs, step %.4fs)",
                     every, self._save_cost_s, self._step_time_s)
            self._auto_every = every
        last = max(self._records) if self._records else 0
        return step - last >= every

    # -- internals: reading --------------------------------------------------------------

    def _resolve(self, which: Which) -> int:
        available = sorted(self._records)
        if which == "latest":
            step = self.latest_step()
        elif which == "best":
            step = self.best_step()
            if step is None and available:
                raise CheckpointNotFoundError(
                    f"no best checkpoint in {self._dir}: " + (
                        "the policy monitors no metric" if not self.policy.monitor else
                        f"no kept checkpoint has a finite {self.policy.monitor!r}") +
                    f". Restore 'latest' or one of the steps {available}.")
        elif isinstance(which, (int, np.integer)) and not isinstance(which, bool):
            step = int(which)
            if step not in self._records:
                raise CheckpointNotFoundError(
                    f"no checkpoint for step {step} in {self._dir}; available steps: "
                    f"{available or 'none'}.")
        else:
            raise ValueError(f"which must be 'latest', 'best' or an int step, got {which!r}.")
        if step is None:
            raise CheckpointNotFoundError(
                f"no checkpoints in {self._dir}: nothing has been saved there yet.")
        return step

    def _read_meta(self, step: int) -> dict:
        path = self._dir / str(step) / "meta" / "metadata"
        try:
            meta = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError) as e:
            log.warning("checkpoint %d has no readable meta (%s); treating it as metric-less",
                        step, e)
            return {}
        problems = integrity.validate_meta(meta, step)
        if problems:
            log.warning("checkpoint %d: meta fails its schema (%s); treating it as "
                        "metric-less", step, "; ".join(problems))
            return {}
        return meta

    def _read_data_state(self, step: int) -> Any:
        path = self._dir / str(step) / "data_state" / "metadata"
        if not path.exists():
            return None
        stored = json.loads(path.read_text())
        problems = integrity.validate_data_state(stored)
        if problems:  # verified just before, so only a file changed since gets here
            raise CheckpointCorruptError(f"checkpoint {step} in {self._dir}: "
                                         f"data_state/metadata {'; '.join(problems)}.")
        return _decode_data_state(stored)

    def _record_from_meta(self, step: int) -> Record:
        return Record(step, self.policy.stored_value(self._read_meta(step).get("metrics")))

    # -- internals: integrity --------------------------------------------------------------

    def _check(self, step: int, checksums: bool) -> tuple[list[str], bool]:
        """``(problems, verified)``: verified is False for a step without a manifest."""
        problems = integrity.check(self._dir / str(step), step, checksums=checksums,
                                   strict=True)
        verified = integrity.UNVERIFIED not in problems
        return [p for p in problems if p != integrity.UNVERIFIED], verified

    def _set_aside(self, step: int, problems: list[str], warn: bool = False) -> None:
        """Take a corrupt checkpoint out of every decision: never best, latest, deleted."""
        self._records.pop(step, None)
        self._corrupt[step] = problems
        log.warning("checkpoint %d in %s is corrupt: %s", step, self._dir, "; ".join(problems))
        if warn:
            warnings.warn(
                f"checkpoint {step} in {self._dir} is corrupt ({_summary(problems)}): it is "
                "set aside, never restored, never best and never deleted"
                + ("." if self._read_only else
                   f"; the next save moves it to {self._dir / CORRUPT_DIR}."), stacklevel=3)

    def _move_corrupt_aside(self) -> None:
        """Move set-aside checkpoints to ``DIR/jaxckpt-corrupt/`` (kept for inspection),
        so that a run resumed from an older checkpoint can save its steps again."""
        if not self._corrupt:
            return
        stamp = time.strftime("%Y%m%dT%H%M%S")
        if self._primary:
            for step, problems in sorted(self._corrupt.items()):
                src = self._dir / str(step)
                if not src.exists():
                    continue
                dest = self._dir / CORRUPT_DIR / f"{step}-{stamp}-{uuid.uuid4().hex[:6]}"
                dest.parent.mkdir(parents=True, exist_ok=True)
                _move_tree(src, dest)
                warnings.warn(f"moved corrupt checkpoint {step} ({_summary(problems)}) to "
                              f"{dest}; it is not deleted: inspect it, then delete it.",
                              stacklevel=4)
        if jax.process_count() > 1:
            # Every process makes the same calls, so the counter names the barrier alike.
            ocp.multihost.sync_global_processes(f"jaxckpt_move_corrupt_{next(_BARRIERS)}")
        self._corrupt.clear()
        self._ocp.reload()

    def _resolve_verified(self, which: Which) -> int:
        """Like :meth:`_resolve`, checking checksums; "latest"/"best" fall back."""
        if isinstance(which, (int, np.integer)) and not isinstance(which, bool):
            step = int(which)
            if step in self._corrupt:
                raise CheckpointCorruptError(self._corrupt_message(step, self._corrupt[step]))
            step = self._resolve(step)
            problems, verified = self._check(step, checksums=True)
            if problems:
                self._set_aside(step, problems)
                raise CheckpointCorruptError(self._corrupt_message(step, problems))
            self._warn_unverified(step, verified)
            return step
        if which not in ("latest", "best"):
            return self._resolve(which)  # raises the ValueError
        if not self._records and self._corrupt:
            raise CheckpointCorruptError(self._all_corrupt_message(dict(self._corrupt)))
        if not self._corrupt:
            self._resolve(which)  # raises when there is nothing (no best) to restore
        newest_first = sorted(self._records, reverse=True)
        if which == "best":  # the best that verifies; else, as for "latest", the newest
            ranked = [r.step for r in self.policy.ranked(self._records.values())]
            order = ranked + [s for s in newest_first if s not in ranked]
        else:
            order = newest_first
        known = dict(self._corrupt)  # set aside earlier (when this manager opened, ...)
        skipped: dict[int, list[str]] = {}
        for step in order:
            problems, verified = self._check(step, checksums=True)
            if not problems:
                break
            self._set_aside(step, problems)
            skipped[step] = problems
        else:
            raise CheckpointCorruptError(self._all_corrupt_message({**known, **skipped}))
        # Name every corrupt checkpoint the answer would otherwise have been.
        skipped.update({s: p for s, p in known.items() if which == "best" or s > step})
        if skipped:
            lines = "; ".join(f"step {s}: {_summary(p)}" for s, p in skipped.items())
            warnings.warn(f"restore({which!r}) skipped corrupt checkpoint(s) {sorted(skipped)} "
                          f"in {self._dir} ({lines}); restoring step {step}, the "
                          f"{'best' if which == 'best' and step in ranked else 'newest'} "
                          "checkpoint that verifies. The corrupt ones are kept for "
                          "inspection.",
                          stacklevel=4)
        self._warn_unverified(step, verified)
        return step

    def _warn_unverified(self, step: int, verified: bool) -> None:
        if not verified:
            warnings.warn(f"checkpoint {step} in {self._dir} has no manifest (its writer "
                          "stopped between Orbax's commit and the manifest, or it predates "
                          "manifests): restoring it unverified.", stacklevel=5)

    def _corrupt_message(self, step: int, problems: list[str]) -> str:
        usable = sorted(self._records)
        return (f"checkpoint {step} in {self._dir} is corrupt: " + "; ".join(problems) +
                ". It was not modified. Restore another step"
                + (f" ({usable})" if usable else "") + ", or 'latest'/'best', which skip "
                "corrupt checkpoints.")

    def _all_corrupt_message(self, problems: dict[int, list[str]]) -> str:
        lines = "\n".join(f"  step {s}: {'; '.join(p)}" for s, p in sorted(problems.items()))
        return (f"no checkpoint in {self._dir} verifies:\n{lines}\nNone was modified. "
                "Restore from a copy of the directory, or start the run afresh.")

    # -- internals: the directory lock -------------------------------------------------------

    def _lock_directory(self) -> DirectoryLock | None:
        """Process 0 takes the lock; every process of the job learns whether it did."""
        lock, error = None, None
        if self._primary:
            lock = DirectoryLock(self._dir)
            try:
                lock.acquire()
            except Exception as e:  # noqa: BLE001 - re-raised below, on every process
                lock, error = None, e
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            ok = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
            if not ok and error is None:
                owner = read_owner(self._dir)
                error = DirectoryLockedError(
                    f"process 0 could not lock {self._dir}"
                    + (f": it is held by {describe(owner)}" if owner else "")
                    + ". See process 0's error for the cause and the fix.")
        if error is not None:
            raise error
        return lock

    def _check_lock(self) -> None:
        if self._dirlock is not None:
            self._dirlock.check()

    def _restore_state(self, step: int, target: Any) -> Any:
        saved = self._ocp.item_metadata(step)["state"]
        saved_tree = saved.tree if hasattr(saved, "tree") else saved
        if target is None:
            abstract = jax.tree.map(target_lib.local_abstract, saved_tree, is_leaf=target_lib.is_array_metadata)
            restored = self._ocp.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract)))["state"]
            return jax.tree.map(lambda x: np.asarray(x), restored)
        target_lib.check_structure(saved_tree, target, step)
        abstract, rewrap = target_lib.abstract_target(target)
        restored = self._ocp.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))["state"]
        return rewrap(restored)

    def _check_open(self, write: bool = False) -> None:
        if self._closed:
            raise RuntimeError("this CheckpointManager is closed; open a new one.")
        if write and self._read_only:
            raise RuntimeError(f"{self._dir} was opened read_only; open it without "
                               "read_only=True to save.")

    # -- deleting ------------------------------------------------------------------------

    def delete(self, step: int) -> None:
        """Delete checkpoint ``step`` now; its metrics stay in :meth:`history`.

        For applying a retention policy after the fact (``jaxckpt prune``): ``save``
        already deletes what the policy no longer keeps.

        Raises:
          CheckpointNotFoundError: no checkpoint ``step`` (lists the available steps).
        """
        self._check_open(write=True)
        self._finish_pending()
        step = self._resolve(_as_step(step))
        log.debug("deleting step %d: delete() was called", step)
        self._ocp.delete(step)
        del self._records[step]


# -- helpers: pure or nearly so ---------------------------------------------------------


def _state_handler() -> ocp.StandardCheckpointHandler:
    """Orbax's standard handler without zstd for the arrays.

    Weights and Adam moments are float noise: zstd shrinks them ~9% yet costs ~1 CPU-s per
    GB on the training host, slows restore and holds a compressed copy of the state during
    the write (peak extra RAM 2.0x the state instead of 1.1x; bench/README.md). Files read
    back with either setting. orbax-checkpoint 0.12 exposes the switch only on the
    PyTree handler the standard one wraps; without that attribute, keep Orbax's default.
    """
    handler = ocp.StandardCheckpointHandler()
    if hasattr(handler, "_impl"):
        handler._impl = ocp.PyTreeCheckpointHandler(use_compression=False)
    return handler


def _as_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) and not (
            hasattr(step, "shape") and np.shape(step) == ()):
        raise TypeError(f"step must be an int, got {step!r}.")
    step = int(step)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}.")
    return step


def _clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float] | None:
    if metrics is None:
        return None
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a mapping of name to scalar, got {type(metrics)}.")
    clean = {}
    for name, value in metrics.items():
        try:
            clean[str(name)] = float(np.asarray(value))
        except (TypeError, ValueError) as e:
            raise TypeError(f"metric {name!r} must be a scalar number, got {value!r}.") from e
    return clean


def _encode_data_state(data_state: Any) -> dict:
    if isinstance(data_state, (bytes, bytearray)):
        return {_BYTES_KEY: base64.b64encode(bytes(data_state)).decode("ascii")}
    try:
        json.dumps(data_state)
    except TypeError as e:
        raise TypeError(f"data_state must be JSON-able or bytes (a grain iterator's "
                        f"get_state()), got {type(data_state)}: {e}") from e
    return {"value": data_state}


def _decode_data_state(stored: dict) -> Any:
    if _BYTES_KEY in stored:
        return base64.b64decode(stored[_BYTES_KEY])
    return stored.get("value")


def _check_directory(path: epath.Path, *, read_only: bool) -> None:
    s = str(path)
    integrity.forget_cached_listings(path)  # gs://: see what is there now
    if path.exists() and not path.is_dir():
        raise CheckpointDirectoryError(
            f"checkpoint directory {s} is a file. Pass a directory path (it is created if "
            "missing), or move the file away.")
    if read_only:
        if not path.exists():
            raise CheckpointDirectoryError(f"checkpoint directory {s} does not exist.")
        return
    if "://" in s:  # object stores have no permissions to probe cheaply; Orbax reports them
        bucket = epath.Path("/".join(s.split("/", 3)[:3]))  # gs://bucket
        if not path.exists() and not bucket.exists():  # else a 404 on the lock's upload URL
            raise CheckpointDirectoryError(
                f"bucket {bucket} of checkpoint directory {s} does not exist, or these "
                f"credentials cannot see it. Create it (gcloud storage buckets create "
                f"{bucket}), fix the URL, or give this machine's account access to it.")
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".jaxckpt-probe-{uuid.uuid4().hex}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise CheckpointDirectoryError(
            f"checkpoint directory {s} is not writable ({e.strerror or e}). Choose a "
            "directory you can write to, or fix its permissions.") from e


def _read_history_file(directory: epath.Path) -> dict | None:
    path = directory / HISTORY_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("cannot read %s (%s); starting the history from the checkpoints", path, e)
        return None
    try:
        data = json.loads(text)
        _validate_history(data)
    except (json.JSONDecodeError, ValueError) as e:
        warnings.warn(f"{path} is unreadable ({e}); the metric history of steps that were "
                      "not kept is lost; kept checkpoints and their metrics are intact.")
        return None
    return data


def _validate_history(data: Any) -> None:
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise ValueError(f"not a {_FORMAT} history file")
    if not isinstance(data.get("history"), list):
        raise ValueError("'history' must be a list")
    for e in data["history"]:
        if not (isinstance(e, dict) and isinstance(e.get("step"), int)
                and (e.get("metrics") is None or isinstance(e["metrics"], dict))):
            raise ValueError(f"malformed history entry {e!r}")
    policy = data.get("policy")
    if policy is not None:
        if not isinstance(policy, dict):
            raise ValueError("'policy' must be an object")
        known = {f for f in CheckpointPolicy.__dataclass_fields__}
        unknown = set(policy) - known
        if unknown:
            raise ValueError(f"unknown policy fields {sorted(unknown)}")


def _summary(problems: list[str]) -> str:
    more = f"; and {len(problems) - 2} more" if len(problems) > 2 else ""
    return "; ".join(problems[:2]) + more


def _remove_stale_temp_files(directory: epath.Path) -> None:
    """History files half-written by a killed writer (Orbax cleans its own)."""
    try:
        for tmp in directory.glob(f".{HISTORY_FILE}.*.tmp"):
            tmp.unlink()
    except OSError as e:
        log.warning("could not remove stale temporary files in %s: %s", directory, e)


def _entries_from_json(stored: dict | None) -> list[_Entry]:
    if not stored:
        return []
    return [_Entry(int(e["step"]), e.get("metrics"), e.get("epoch"), float(e.get("time") or 0),
                   bool(e.get("saved"))) for e in stored["history"]]


def _move_tree(src: epath.Path, dest: epath.Path) -> None:
    """``src.rename(dest)``. Object stores have neither rename nor real folders (epath
    refuses a destination whose folder holds no object yet): copy each object, then
    delete the source."""
    if "://" not in str(src):
        src.rename(dest)
        return
    for rel, _ in integrity.walk_files(src):
        (src / rel).copy(dest / rel)
    src.rmtree()


def _atomic_write_text(path: epath.Path, text: str) -> None:
    if "://" in str(path):  # an object store: an object appears whole or not at all
        path.write_text(text)  # (and it has no rename: gcsfs would copy, then delete)
        return
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    tmp.write_text(text)
    tmp.replace(path)
