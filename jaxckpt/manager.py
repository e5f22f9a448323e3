"""``CheckpointManager``: jaxckpt's policy over Orbax's storage and async I/O.

A facade. Each job lives in its own module and the manager composes them:

=================  ==========================================================
:mod:`policy`      what is due, what is kept, what is best (pure)
:mod:`schedule`    ``every="auto"``: measured step time and save cost
:mod:`ledger`      the metric history of every offered step
:mod:`catalog`     the checkpoints on disk: usable, set aside, incomplete
:mod:`integrity`   manifests and verdicts
:mod:`orbax_io`    Orbax's async save and its restore
:mod:`target`      restore targets: any pytree in, the same pytree out
:mod:`storage`     local and ``gs://`` files, atomic writes, deadlines
:mod:`lock`        one writer per directory
:mod:`background`  the FIFO thread that finishes each save
=================  ==========================================================

Threads: the calling thread owns the catalog, the ledger and every decision. The
background thread waits for Orbax's commit, writes the manifest, deletes the steps the
save replaced (a list decided before it was queued) and writes ledger snapshots taken on
the calling thread. Its errors are raised by the next ``save``/``wait``.
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import math
import os
import logging
import time
import warnings
import weakref
from typing import Any, Callable, Mapping, NamedTuple

import jax
import numpy as np

from jaxckpt import fingerprint
from jaxckpt import format as fmt
from jaxckpt import integrity, ledger as ledger_lib, orbax_io, storage
from jaxckpt import target as target_lib
from jaxckpt.background import Background
from jaxckpt.catalog import Catalog, Which, check_writable
from jaxckpt.errors import (CheckpointCorruptError, CheckpointDirectoryError, CheckpointNotFoundError,
                            CheckpointWriteError, DirectoryLockedError)
from jaxckpt.ledger import Entry, Ledger
from jaxckpt.lock import DirectoryLock, describe, read_owner
from jaxckpt.policy import CheckpointPolicy, Record
from jaxckpt.schedule import AutoInterval

__all__ = ["CheckpointManager", "Checkpoint", "HISTORY_FILE"]

log = logging.getLogger("jaxckpt")
HISTORY_FILE = fmt.HISTORY_FILE
LEDGER_FLUSH_S = 10.0
"""How often a run that saves rarely rewrites ``jaxckpt.json`` (and at wait/close)."""


class Checkpoint(NamedTuple):
    """A restored checkpoint: the state and everything saved beside it."""

    step: int
    state: Any
    metrics: dict[str, float] | None
    epoch: int | None
    data_state: Any


class CheckpointManager:
    """Saves a state pytree asynchronously and keeps the checkpoints a policy asks for.

    Synopsis::

        policy = jaxckpt.CheckpointPolicy(monitor="val_loss", keep_best=1, keep_latest=1)
        with jaxckpt.CheckpointManager("/tmp/run/checkpoints", policy) as mngr:
            for epoch in range(1, 51):
                state, metrics = train_epoch(state)
                mngr.save(epoch, state, metrics=metrics, epoch=epoch)
            best = mngr.restore("best", target=state)

    Args:
      directory: a local path or a ``gs://`` URL; created if missing.
      policy: a :class:`CheckpointPolicy`. None: the policy the directory was written
        with (stored in ``jaxckpt.json`` and in every checkpoint), or for a new directory
        keep the latest checkpoint only.
      async_save: write in the background; ``save`` returns once the state is handed to
        Orbax. A failed background write is raised by the next ``save``/``wait``.
      read_only: inspect only: never writes, deletes, locks or cleans the directory.
      adopt: let a writing manager manage checkpoints that plain Orbax wrote in
        ``directory`` (they count in the policy and may be deleted by it; needs
        ``policy``). Without it, a writing open of such a directory is refused before
        anything is written; ``read_only=True`` lists, verifies and restores it.
      storage_timeout_s: deadline of each storage call jaxckpt makes on an object store,
        and of ``wait``/``close`` for the background work.
      clock: the time source for time-based rules (injectable for tests).

    Raises:
      DirectoryLockedError: another live run writes to ``directory`` (names it). One
        multi-process JAX job is one writer: only process 0 takes the lock.
      CheckpointDirectoryError: ``directory`` is a file, not writable, or holds
        checkpoints of another writer (see ``adopt``).
    """

    def __init__(self, directory: str | os.PathLike, policy: CheckpointPolicy | None = None,
                 async_save: bool = True, *, read_only: bool = False, adopt: bool = False,
                 storage_timeout_s: float | None = storage.DEFAULT_TIMEOUT_S,
                 clock: Callable[[], float] = time.time):
        if policy is not None and not isinstance(policy, CheckpointPolicy):
            raise TypeError(f"policy must be a jaxckpt.CheckpointPolicy, got {type(policy)}.")
        self._dir = storage.as_path(directory)
        self._read_only, self._async, self._clock = read_only, async_save, clock
        self._timeout = storage_timeout_s
        self._primary = jax.process_index() == 0
        self._closed = True  # until fully open
        if not read_only:  # first: a refused open must leave the directory as it was
            check_writable(self._dir, adopt=adopt, policy_given=policy is not None,
                           timeout=self._timeout)
        storage.check_directory(self._dir, read_only=read_only, timeout=self._timeout)
        stored = ledger_lib.read_file(self._dir, timeout=self._timeout)
        # The lock comes first: Orbax's start-up deletes temporary directories, which are
        # another live writer's in-flight checkpoints until the lock says it is gone.
        self._dirlock = None if read_only else _lock_directory(self._dir)
        try:
            if self._primary and not read_only:
                storage.finish_deletions(self._dir)
            self._catalog = Catalog(self._dir, policy or CheckpointPolicy(), self._timeout)
            self._catalog.scan(warn=self._warn_corrupt)
            if self._primary and not read_only:
                self._finish_incomplete()
            self.policy = policy or self._stored_policy(stored)
            self._catalog.revalue(self.policy)
            self._ledger = self._load_ledger(stored)
            self._auto = AutoInterval(self.policy, save_cost_s=(stored or {}).get("save_cost_s"),
                                      every=(stored or {}).get("auto_every"))
            self._last_save_time = (stored or {}).get("last_save_time")
            self._ocp = None if read_only else self._new_orbax()
        except BaseException:
            if self._dirlock is not None:
                self._dirlock.release()
            raise
        self._start_time = clock()
        self._last_flush = time.monotonic()
        self._background = Background()
        self._warned_no_metrics = False
        self._closed = False
        _open_managers.add(self)

    # -- what is there ---------------------------------------------------------------------

    @property
    def directory(self):
        return self._dir

    def latest_step(self) -> int | None:
        """The newest checkpoint not known to be damaged (what ``restore("latest")`` reads
        unless its checksums fail, in which case this moves to the one it restored)."""
        return self._catalog.latest()

    def best_step(self) -> int | None:
        """The best checkpoint by the monitored metric, as ``restore("best")`` means it."""
        return self._catalog.best()

    def steps(self) -> list[int]:
        """Steps of the usable checkpoints, oldest first (an in-flight save included)."""
        return self._catalog.steps()

    def all_steps(self) -> list[int]:
        """Orbax's name for :meth:`steps`."""
        return self.steps()

    def checkpoint_path(self, which: Which = "latest"):
        """The directory of checkpoint ``which``, for outside tools (like Lightning's
        ``best_model_path``). Stable while the checkpoint is kept."""
        return self._dir / str(self._catalog.resolve(which))

    @property
    def every_n_steps(self) -> int | None:
        """The save interval in steps: the policy's, or the one ``every="auto"`` chose."""
        return self.policy.every_n_steps or self._auto.every

    def history(self) -> list[dict[str, Any]]:
        """Every step given to ``save`` with metrics, kept or not: ``{"step", "metrics"}``."""
        return [{"step": e.step, "metrics": dict(e.metrics)}
                for e in self._ledger.entries() if e.metrics is not None]

    def entries(self) -> list[dict[str, Any]]:
        """The full history: step, epoch, metrics, time, whether it was written, kept."""
        kept = set(self._catalog.records)
        return [{**e._asdict(), "kept": e.step in kept} for e in self._ledger.entries()]

    def kept_reasons(self) -> dict[int, Any]:
        """Why each kept checkpoint is kept, as the policy's typed reasons."""
        return self.policy.kept(list(self._catalog.records.values()))

    def metrics(self, step: int) -> dict[str, float] | None:
        """The metrics saved with checkpoint ``step``."""
        return self._catalog.read_meta(self._catalog.resolve(_as_int("step", step))).get("metrics")

    def records(self, policy: CheckpointPolicy | None = None) -> list[Record]:
        """What the policy knows of each usable checkpoint (valued by ``policy``)."""
        if policy is None or policy == self.policy:
            return [self._catalog.records[s] for s in self.steps()]
        return [dataclasses.replace(r, value=policy.stored_value(self.metrics(r.step)))
                for r in self.records()]

    def verdicts(self) -> dict[int, integrity.Verdict]:
        """The last verdict of every step in the directory (usable, corrupt, incomplete)."""
        c = self._catalog
        return dict(sorted({**c.verdicts, **c.corrupt, **c.incomplete}.items()))

    def reload(self) -> None:
        """See what is on disk now (another process's writes); for readers."""
        self._check_open()
        self._finish_pending()
        self._catalog.scan(warn=self._warn_corrupt)
        stored = ledger_lib.read_file(self._dir, timeout=self._timeout)
        self._ledger = self._load_ledger(stored)

    # -- saving ------------------------------------------------------------------------------

    def should_save(self, step: int, *, epoch: int | None = None) -> bool:
        """Whether the schedule asks for a save at ``step`` (ask before computing metrics)."""
        last = self._last_save_time if self._last_save_time else self._start_time
        return self.policy.is_due(_as_int("step", step), epoch=epoch, now=self._clock(),
                                  last_save_time=last) or self._auto.due(step, self.latest_step())

    def reached_preemption(self, step: int) -> bool:
        """Whether a preemption signal reached this job (every process agrees), as Orbax's."""
        return bool(self._ocp.reached_preemption(step)) if self._ocp is not None else False

    def save(self, step: int, state: Any, metrics: Mapping[str, Any] | None = None,
             data_state: Any = None, *, epoch: int | None = None, force: bool = False) -> bool:
        """Save ``state`` at ``step`` if the policy wants it; return whether it did.

        Every argument is checked here, on the calling thread, before anything is queued.

        Args:
          step: the training step (an int; numpy ints too); above the latest saved step.
          state: any pytree of arrays and Python scalars (a Flax ``TrainState``, a dict).
          metrics: scalar metrics of this step; must hold the monitored one when given.
            Recorded in :meth:`history` whether or not the state is written.
          data_state: the data iterator's state (a JSON-able value, or bytes).
          epoch: completed epochs, for ``every_n_epochs`` and for the record.
          force: write even if not due (preemption, the end of a run).

        Raises:
          TypeError: an argument has the wrong type (a float step, a leaf that cannot be
            saved: named by its path).
          MetricError: ``metrics`` lacks the monitored metric (lists what it got).
          ValueError: ``step`` is not above the latest saved step.
          CheckpointWriteError: the previous background write failed.
          DirectoryLockedError: another run took this directory's lock over.
        """
        self._check_open(write=True)
        step, epoch = _as_int("step", step), _as_int("epoch", epoch, optional=True)
        clean = _clean_metrics(metrics)
        value = self.policy.monitored_value(clean)
        encoded_data = fmt.encode_data_state(data_state) if data_state is not None else None
        self._check_lock()
        self._raise_finished()
        latest = self.latest_step()
        if latest is not None and step <= latest:
            raise ValueError(
                f"save(step={step}) is not above the latest saved step {latest} in "
                f"{self._dir}. Steps must increase: resume from restore('latest') and continue "
                "its step count, or save into a new directory.")
        if value is not None and not math.isfinite(value):
            warnings.warn(f"{self.policy.monitor}={value} at step {step} is not finite: the "
                          "checkpoint can be kept as latest but never as best.", stacklevel=2)
            value = None
        now = self._clock()
        self._auto.observe_call(step)
        has_metrics = clean is not None
        reason = "forced" if force else self._decide(step, epoch, now, value, has_metrics)
        self._ledger.record(Entry(step, clean, epoch, now, reason is not None))
        if reason is None:
            self._maybe_flush_ledger()
            return False
        saveable = target_lib.to_saveable(state)  # TypeError names a leaf that cannot be saved
        started = fingerprint.of_tree(saveable)  # dispatched now, read in the background
        if self.policy.monitor and clean is None and not force and not self._warned_no_metrics:
            self._warned_no_metrics = True
            log.warning("save(step=%d) without metrics: a checkpoint saved without %r can be "
                        "kept as latest, never best (reported once per manager).",
                        step, self.policy.monitor)
        self._finish_pending()  # Orbax writes one checkpoint at a time
        self._move_corrupt_aside()
        self._write(step, saveable, clean, epoch, encoded_data, now, value, reason, started)
        self._auto.observe_saved(step)
        return True

    def wait(self) -> None:
        """Block until every background write has committed (and raise if one failed)."""
        self._check_open()
        self._flush_ledger()
        self._finish_pending()
        self._check_lock()

    def close(self) -> None:
        """Finish writes and release resources; the manager cannot be used afterwards."""
        if self._closed:
            return
        try:
            if not self._read_only:
                self.wait()
        finally:
            self._closed = True
            _open_managers.discard(self)
            self._background.shutdown(wait=True)
            try:
                if self._ocp is not None:
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

    # -- restoring ---------------------------------------------------------------------------

    def restore(self, which: Which = "latest", target: Any = None, *,
                subtree: str | tuple[str, ...] | None = None) -> Any:
        """The state saved at ``which`` (``"latest"``, ``"best"`` or a step).

        Args:
          which: ``"latest"``, ``"best"`` or an int step from :meth:`steps`.
          target: None for plain numpy arrays in nested dicts/lists (whatever the number of
            processes or devices that wrote it); or any pytree of the saved structure
            (concrete arrays or ``jax.ShapeDtypeStruct`` with shardings): the arrays come
            back placed like the target, in the target's containers.
          subtree: restore only this part of the state, a dict key or a path of them
            (``"params"``, ``("params", "Dense_0")``); ``target`` is then that part's. The
            other arrays' bytes are not read (evaluate without loading the optimizer), so
            the checkpoint's file sizes are checked, not its checksums (see :meth:`verify`).

        Raises:
          CheckpointNotFoundError: no such checkpoint (lists the available steps).
          CheckpointCorruptError: checkpoint ``which`` (an int step) fails verification, or
            none does. ``"latest"``/``"best"`` skip a checkpoint that fails, with a warning
            naming it, and restore the next one that verifies.
          RestoreStructureError: ``target`` differs from the checkpoint (lists the keys),
            or ``subtree`` is not in it.
        """
        return self.restore_checkpoint(which, target, subtree=subtree).state

    def restore_checkpoint(self, which: Which = "latest", target: Any = None, *,
                           subtree: str | tuple[str, ...] | None = None) -> Checkpoint:
        """Like :meth:`restore`, with the step's metrics, epoch and data state."""
        self._check_open()
        path = orbax_io.as_subtree(subtree)
        self._finish_pending()
        while True:
            step = self._catalog.resolve_verified(which, checksums=not path)
            arrays = self._catalog.verdicts[step].arrays if step in self._catalog.verdicts else None
            try:
                state = orbax_io.restore_state(self._dir / str(step), target, step=step,
                                               subtree=path, fingerprints=arrays)
                meta = self._catalog.read_meta(step)
                data_state = self._read_data_state(step)
            except orbax_io.ArraysCorrupt as e:
                self._catalog.set_aside(integrity.Verdict(step, e.problems))
                if not isinstance(which, str):
                    raise CheckpointCorruptError(
                        self._catalog.corrupt_message(self._catalog.corrupt[step])) from None
                warnings.warn(f"restore({which!r}) found checkpoint {step} in {self._dir} "
                              f"corrupt ({e}); it is set aside, trying the next one.",
                              stacklevel=2)
                continue
            except Exception:
                if (self._dir / str(step)).exists():
                    raise
                # Deleted by the run writing there while this one read it: look again.
                self._catalog.scan(warn=self._warn_corrupt)
                if not isinstance(which, str):
                    raise CheckpointNotFoundError(
                        f"checkpoint {step} in {self._dir} was deleted while it was being "
                        f"read (by the run writing there); available: {self.steps()}.")
                continue
            return Checkpoint(step, state, meta.get("metrics"), meta.get("epoch"), data_state)

    def restore_data_state(self, which: Which = "latest") -> Any:
        """The data iterator state saved with checkpoint ``which`` (None if none was)."""
        self._check_open()
        self._finish_pending()
        return self._read_data_state(self._catalog.resolve_verified(which))

    def verify(self, step: int | None = None, *, checksums: bool = True,
               strict: bool = False) -> dict[int, list[str]]:
        """Check checkpoints against the manifests written when they were committed.

        Args:
          step: one step, or None for every checkpoint in the directory (those already
            found corrupt included).
          checksums: read every file and compare its checksum (else sizes only).
          strict: count a checkpoint without a manifest as a problem.

        Returns:
          ``{step: problems}``, oldest first; an empty list means it verifies. A step that
          fails is set aside, as when :meth:`restore` finds it.

        Raises:
          CheckpointNotFoundError: ``step`` is not a checkpoint of this directory.
        """
        self._check_open()
        self._finish_pending()
        everything = sorted(set(self._catalog.records) | set(self._catalog.corrupt))
        steps = everything if step is None else [_as_int("step", step)]
        if step is not None and steps[0] not in everything:
            raise CheckpointNotFoundError(
                f"no checkpoint for step {steps[0]} in {self._dir}; available steps: "
                f"{everything or 'none'}.")
        out, unverified = {}, []
        for s in steps:
            verdict = self._catalog.examine(s, checksums=checksums)
            if verdict is None:
                continue  # deleted by a live writer meanwhile
            if checksums and verdict.ok and verdict.arrays is not None:
                verdict = self._verify_arrays(s, verdict)
            problems = list(verdict.problems)
            if verdict.ok and not verdict.has_manifest:
                unverified.append(s)
                if strict:
                    problems = [verdict.describe()]
            out[s] = problems
        if unverified and not strict:
            warnings.warn(self._catalog.unverified_message(unverified), stacklevel=2)
        return out

    def _verify_arrays(self, step: int, verdict: integrity.Verdict) -> integrity.Verdict:
        """Read the state once and compare it with its saved fingerprints."""
        try:
            orbax_io.restore_state(self._dir / str(step), None, step=step,
                                   fingerprints=verdict.arrays)
        except orbax_io.ArraysCorrupt as e:
            verdict = integrity.Verdict(step, e.problems)
            self._catalog.set_aside(verdict)
        return verdict

    def delete(self, step: int) -> None:
        """Delete checkpoint ``step`` now (for ``jaxckpt prune``); its metrics stay in
        :meth:`history`.

        Raises:
          CheckpointNotFoundError: no checkpoint ``step`` (lists the available steps).
        """
        self._check_open(write=True)
        self._finish_pending()
        step = self._catalog.resolve(_as_int("step", step))
        log.debug("deleting step %d: delete() was called", step)
        if self._primary:
            storage.remove_tree(self._dir, step, timeout=self._timeout)
        self._catalog.forget(step)

    # -- internals: deciding and writing ---------------------------------------------------------

    def _decide(self, step: int, epoch: int | None, now: float, value: float | None,
                has_metrics: bool) -> Any:
        last = self._last_save_time if self._last_save_time else self._start_time
        due = self.policy.is_due(step, epoch=epoch, now=now, last_save_time=last)
        due = due or self._auto.due(step, self.latest_step())
        return self.policy.should_save(value, list(self._catalog.records.values()), due=due,
                                       step=step, time=now, has_metrics=has_metrics)

    def _write(self, step, state, metrics, epoch, data_state, now, value, reason,
               started) -> None:
        if not self._dir.exists():  # never re-create a directory deleted under the run
            raise CheckpointDirectoryError(
                f"checkpoint directory {self._dir} was deleted or renamed while this run was "
                "writing to it; nothing was re-created. Restore it, or save into a new "
                "directory with a new CheckpointManager.")
        previous = self.latest_step()
        records = list(self._catalog.records.values())
        improved = self.policy.improves(value, records) if self.policy.monitor else None
        meta = fmt.encode_meta(step=step, epoch=epoch, metrics=metrics, time=now,
                               reason=str(reason), policy=self.policy.to_json(),
                               improved=improved, ledger=self._ledger.segment(previous, step))
        start = time.perf_counter()
        try:
            orbax_io.save(self._ocp, step, state, meta, data_state,
                          {self.policy.monitor: value} if value is not None else None)
        except Exception as e:
            self._ledger.mark_unsaved([step])
            self._reset_orbax(e)
            raise _write_error(f"saving step {step} to {self._dir}", e,
                               self._catalog.steps()) from e
        blocked = time.perf_counter() - start
        self._catalog.add(step, Record(step, value, time=now, has_metrics=metrics is not None,
                                       improved=improved))
        self._last_save_time = now
        kept = self.policy.kept(list(self._catalog.records.values()))
        stale = sorted(set(self._catalog.records) - set(kept))
        for s in stale:
            self._catalog.forget(s)
        log.debug("step %d saved (%s); keeping %s; deleting %s after commit", step, reason,
                  sorted(kept), stale)
        self._background.submit(self._commit, step, stale, start, blocked, started)
        self._maybe_flush_ledger()
        if not self._async:
            self._finish_pending()

    def _commit(self, step: int, stale: list[int], start: float, blocked: float,
                started: dict) -> None:
        """Background: wait for Orbax's commit of ``step``, write its manifest, then delete
        what it replaced (never before: an older checkpoint outlives a failed newer one)."""
        self._ocp.wait_until_finished()
        self._ocp.check_for_errors()
        if self._primary:
            step_dir = self._dir / str(step)
            arrays = fingerprint.resolve(started)
            integrity.write_manifest(step_dir, integrity.build_manifest(step_dir, step, arrays))
            for s in stale:  # plain file operations: no collective, safe on this thread
                log.debug("deleting step %d: no longer among the kept checkpoints", s)
                storage.remove_tree(self._dir, s, timeout=self._timeout)
        self._auto.observe_save(blocked, time.perf_counter() - start)

    def _maybe_flush_ledger(self) -> None:
        if self._ledger.dirty and time.monotonic() - self._last_flush > LEDGER_FLUSH_S:
            self._flush_ledger()

    def _flush_ledger(self) -> None:
        """Queue a snapshot of the ledger (taken here, written in the background)."""
        if self._read_only or not self._primary or not self._ledger.dirty:
            return
        snapshot = ledger_lib.snapshot(
            self._ledger, policy=self.policy.to_json(), last_save_time=self._last_save_time,
            auto_every=self._auto.every, save_cost_s=self._auto.save_cost_s)
        self._ledger.dirty = False
        self._last_flush = time.monotonic()
        self._background.submit(ledger_lib.write_file, self._dir, snapshot, self._timeout)

    def _raise_finished(self) -> None:
        try:
            self._background.raise_finished()
        except Exception as e:
            self._after_background_failure(e)

    def _finish_pending(self) -> None:
        try:
            self._background.drain(timeout=self._timeout)
        except Exception as e:
            self._after_background_failure(e)

    def _after_background_failure(self, e: Exception) -> None:
        """See what survived on disk, record what was lost, and raise."""
        if isinstance(e, TimeoutError) and self._background.pending:
            raise CheckpointWriteError(
                f"background work in {self._dir} did not finish within {self._timeout:.0f} s "
                f"(a stalled store?): {e}. Earlier checkpoints are intact.") from e
        for other in self._background.settle(timeout=self._timeout):
            log.error("also failed in the background in %s: %r", self._dir, other)
        self._reset_orbax(e)
        self._ledger.dirty = True  # a snapshot may have been lost with the failure
        before = set(self._catalog.records)
        self._catalog.scan(warn=self._warn_corrupt)
        lost = sorted(before - set(self._catalog.records))
        self._ledger.mark_unsaved(lost)
        what = (f"background write of step(s) {lost} to {self._dir}" if lost else
                f"background work after a committed checkpoint in {self._dir} (its manifest, "
                "deletions or the history file)")
        raise _write_error(what, e, self._catalog.steps()) from e

    def _new_orbax(self):
        return orbax_io.new_manager(self._dir, async_save=self._async,
                                    read_only=self._read_only, policy=self.policy)

    def _reset_orbax(self, reported: BaseException) -> None:
        """After a failed save, continue with a fresh Orbax manager (Orbax re-raises a
        failed save's error at later calls; a new one starts clean and deletes the failed
        save's temporary directory)."""
        if self._ocp is not None:
            orbax_io.close_quietly(self._ocp, reported)
            self._ocp = self._new_orbax()

    def _move_corrupt_aside(self) -> None:
        """Move set-aside checkpoints to ``DIR/jaxckpt-corrupt/`` (kept for inspection), so
        that a run resumed from an older checkpoint can save its steps again."""
        if not self._catalog.corrupt:
            return
        aside = self._dir / fmt.CORRUPT_DIR
        if self._primary:
            if not storage.inside(self._dir, aside):
                warnings.warn(f"{aside} leads outside {self._dir} (a symlink): corrupt "
                              f"checkpoints {sorted(self._catalog.corrupt)} stay where they "
                              "are. Replace the link with a directory.", stacklevel=4)
                return
            stamp = time.strftime("%Y%m%dT%H%M%S")
            for step, verdict in sorted(self._catalog.corrupt.items()):
                dest = aside / f"{step}-{stamp}-{os.urandom(3).hex()}"
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    storage.move_tree(self._dir / str(step), dest, timeout=self._timeout)
                except FileNotFoundError:
                    continue
                warnings.warn(f"moved corrupt checkpoint {step} ({verdict.describe()}) to "
                              f"{dest}; it is not deleted: inspect it, then delete it.",
                              stacklevel=4)
        if jax.process_count() > 1:
            import orbax.checkpoint as ocp
            ocp.multihost.sync_global_processes(f"jaxckpt_move_corrupt_{next(_BARRIERS)}")
        self._catalog.corrupt.clear()
        self._ocp.reload()  # Orbax refuses to save a step it still lists

    # -- internals: reading ------------------------------------------------------------------------

    def _read_data_state(self, step: int) -> Any:
        path = self._dir / str(step) / fmt.DATA_STATE / "metadata"
        try:
            import json
            stored = json.loads(storage.read_text(path, timeout=self._timeout))
        except FileNotFoundError:
            return None
        return fmt.decode_data_state(stored)  # schema-checked when the step was verified

    # -- internals: opening ------------------------------------------------------------------------

    def _stored_policy(self, stored: dict | None) -> CheckpointPolicy:
        """The policy the directory was written with: ``jaxckpt.json``, else the newest
        checkpoint's own record. A directory with checkpoints never gets a default."""
        candidates = [stored.get("policy")] if stored else []
        for step in sorted(self._catalog.records, reverse=True):
            try:
                candidates.append(self._catalog.read_meta(step).get("policy"))
            except FileNotFoundError:  # deleted by a live writer meanwhile
                continue
        for data in candidates:
            if isinstance(data, dict):
                try:
                    return CheckpointPolicy.from_json(data)
                except (TypeError, ValueError) as e:
                    log.warning("stored policy %r is not usable here (%s)", data, e)
        mine = [s for s, v in self._catalog.verdicts.items() if v.writer == "jaxckpt"]
        if mine and not self._read_only:
            raise CheckpointDirectoryError(
                f"{self._dir} holds checkpoints {sorted(mine)} but no readable policy: "
                "a default one could delete the best checkpoint. Pass policy=... (the "
                "policy the run was started with).")
        return CheckpointPolicy()

    def _finish_incomplete(self) -> None:
        """Remove unfinished steps: half-deleted by an older jaxckpt (deleting in place), or
        half-uploaded to an object store by a writer that died."""
        for step, verdict in list(self._catalog.incomplete.items()):
            # Ours, or an object-store write whose writer died: this run holds the lock,
            # and Orbax itself deletes unfinished steps when it starts.
            if verdict.writer in ("jaxckpt", "unknown") and (
                    verdict.writer == "jaxckpt" or storage.is_remote(self._dir)):
                log.warning("removing incomplete checkpoint %d in %s (%s)", step, self._dir,
                            verdict.describe())
                storage.remove_tree(self._dir, step, timeout=self._timeout)
                self._catalog.forget(step)

    def _load_ledger(self, stored: dict | None) -> Ledger:
        entries = [Entry.from_json(e) for e in stored["history"]] if stored else []
        book = Ledger(entries)
        # Each checkpoint carries the entries since the previous one: what a lost, damaged
        # or not yet rewritten jaxckpt.json lacks comes back from there.
        for step in self._catalog.steps():
            try:
                meta = self._catalog.read_meta(step)
            except FileNotFoundError:  # deleted by a live writer meanwhile
                self._catalog.forget(step)
                continue
            segment = [Entry.from_json(e) for e in meta.get("ledger") or []]
            if not any(e.step == step for e in segment):
                segment.append(Entry(step, meta.get("metrics"), meta.get("epoch"),
                                     float(meta.get("time") or 0.0), True))
            book.merge(segment)
        book.dirty = stored is None and len(book) > 0
        return book

    def _check_open(self, write: bool = False) -> None:
        if self._closed:
            raise RuntimeError("this CheckpointManager is closed; open a new one.")
        if write and self._read_only:
            raise RuntimeError(f"{self._dir} was opened read_only; open it without "
                               "read_only=True to save.")

    def _check_lock(self) -> None:
        if self._dirlock is not None:
            self._dirlock.check()

    def _warn_corrupt(self, message: str) -> None:
        warnings.warn(message + ": it is set aside, never restored, never best and never "
                      "deleted" + ("." if self._read_only else
                                   f"; the next save moves it to {self._dir / fmt.CORRUPT_DIR}."),
                      stacklevel=5)


# -- helpers ------------------------------------------------------------------------------------


def _lock_directory(directory) -> DirectoryLock | None:
    """Process 0 takes the lock; every process of the job learns whether it did."""
    lock, error = None, None
    if jax.process_index() == 0:
        lock = DirectoryLock(directory)
        try:
            lock.acquire()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every process
            lock, error = None, e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        ok = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not ok and error is None:
            owner = read_owner(directory)
            error = DirectoryLockedError(
                f"process 0 could not lock {directory}"
                + (f": it is held by {describe(owner)}" if owner else "")
                + ". See process 0's error for the cause and the fix.")
    if error is not None:
        raise error
    return lock


def _as_int(name: str, value: Any, *, optional: bool = False) -> int | None:
    """An int from ints and numpy ints; floats (numpy too), bools and strings refused."""
    if value is None and optional:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        if isinstance(value, (jax.Array, np.ndarray)) and value.shape == () and \
                np.issubdtype(value.dtype, np.integer):
            value = int(value)
        else:
            raise TypeError(f"{name} must be an int (numpy ints too), got {value!r} of type "
                            f"{type(value).__name__}." + (" Pass int(...) of it." if isinstance(
                                value, (float, np.floating)) and float(value).is_integer() else ""))
    value = int(value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}.")
    return value


def _clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float] | None:
    if metrics is None:
        return None
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a mapping of name to scalar, got {type(metrics)}.")
    clean = {}
    for name, value in metrics.items():
        try:
            if np.ndim(value) != 0 or isinstance(value, (str, bytes)):
                raise TypeError
            clean[str(name)] = float(np.asarray(value))
        except (TypeError, ValueError) as e:
            raise TypeError(f"metric {name!r} must be a scalar number, got {value!r}.") from e
    return clean


def _write_error(what: str, e: BaseException, intact: list[int]) -> CheckpointWriteError:
    hint = (" Fix the cause (disk space, permissions) and save again." if isinstance(e, OSError)
            else " Save again; if it keeps failing, report it with this message.")
    return CheckpointWriteError(f"{what} failed: {e!r}. Every earlier checkpoint is intact "
                                f"({intact}).{hint}")


_BARRIERS = itertools.count()  # every process makes the same calls: the same names
_open_managers: "weakref.WeakSet[CheckpointManager]" = weakref.WeakSet()


@atexit.register
def _close_forgotten() -> None:
    """A user who forgets ``close()`` still gets the pending write, or a warning naming it."""
    for mngr in list(_open_managers):
        pending = mngr.latest_step()
        try:
            mngr.close()
        except Exception as e:  # noqa: BLE001 - at exit: a warning, not a traceback
            warnings.warn(f"CheckpointManager({mngr.directory}) was not closed and its last "
                          f"write (step {pending}) did not complete at exit: {e}")
