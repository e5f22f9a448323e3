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
import logging
import os
import signal
import threading
import time
import warnings
import weakref
from typing import Any, Callable, Mapping

import jax

from jaxckpt import integrity, opening, orbax_io, reader, storage
from jaxckpt import format as fmt
from jaxckpt import ledger as ledger_lib
from jaxckpt.catalog import (Catalog, Which, check_writable, other_naming,
                             other_naming_message)
from jaxckpt.errors import CheckpointNotFoundError
from jaxckpt.policy import CheckpointPolicy, Record
from jaxckpt.reader import Checkpoint
from jaxckpt.schedule import AutoInterval
from jaxckpt.writer import Writer

__all__ = ["CheckpointManager", "Checkpoint", "HISTORY_FILE"]

log = logging.getLogger("jaxckpt")
HISTORY_FILE = fmt.HISTORY_FILE


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
        and of ``wait``/``close`` for the background work (plus a second per 10 MB of
        the state being written, so that a big checkpoint is never cut short). Past it,
        the call raises naming what did not finish; the work goes on if the store
        answers again, and a later call waits for it again.
      clock: the time source for time-based rules (injectable for tests).

    Raises:
      DirectoryLockedError: another live run writes to ``directory`` (names it). One
        multi-process JAX job is one writer: only process 0 takes the lock.
      CheckpointDirectoryError: ``directory`` is a file, not writable, or holds
        checkpoints of another writer (see ``adopt``).
    """

    def __init__(self, directory: str | os.PathLike, policy: CheckpointPolicy | None = None,
                 async_save: bool = True, read_only: bool = False, *, adopt: bool = False,
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
        self._dirlock = None if read_only else opening.lock_directory(self._dir, self._timeout)
        try:
            if self._primary and not read_only:
                storage.finish_deletions(self._dir)
            self._catalog = Catalog(self._dir, policy or CheckpointPolicy(), self._timeout)
            self._catalog.scan(warn=self._warn_corrupt)
            if read_only and not self._catalog.steps():
                self._warn_other_naming()
            if self._primary and not read_only:
                opening.finish_incomplete(self._catalog)
            self.policy = policy or opening.stored_policy(self._catalog, stored, read_only=read_only)
            self._catalog.revalue(self.policy)
            self._ledger = opening.load_ledger(self._catalog, stored)
            self._auto = AutoInterval(self.policy, save_cost_s=(stored or {}).get("save_cost_s"),
                                      every=(stored or {}).get("auto_every"),
                                      announce=self._primary)
            self._writer = None if read_only else Writer(
                self._dir, policy=self.policy, catalog=self._catalog, ledger=self._ledger,
                auto=self._auto, async_save=async_save, primary=self._primary,
                timeout=self._timeout, last_save_time=(stored or {}).get("last_save_time"),
                start_time=clock(), warn_corrupt=self._warn_corrupt)
        except BaseException:
            if self._dirlock is not None:
                self._dirlock.release()
            raise
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
        return self._catalog.read_meta(self._catalog.resolve(fmt.as_int("step", step))).get("metrics")

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
        self._ledger = opening.load_ledger(self._catalog, stored)

    # -- saving ------------------------------------------------------------------------------

    def should_save(self, step: int, *, epoch: int | None = None) -> bool:
        """Whether the schedule asks for a save at ``step`` (ask before computing metrics;
        a save can still be due for a new best). False for a read-only manager.

        In a multi-process job, ask on every process, as ``save`` is called: a policy that
        reads the clock answers with process 0's decision, by a broadcast all processes make.
        With ``every="auto"``, each call is also what times the steps and closes the
        measured window of the last save, as a ``save`` call is: a loop that asks this and
        calls ``save`` only when due gets its interval as one that offers every step.
        """
        step, epoch = fmt.as_int("step", step), fmt.as_int("epoch", epoch, optional=True)
        if self._writer is None:
            return False
        self._writer.auto.observe_call(step)
        return self._writer.agreed_due(step, epoch, self._clock())[0]

    def reached_preemption(self, step: int) -> bool:
        """Whether a preemption signal reached this job (every process agrees).

        In a multi-process job, Orbax's answer (JAX's preemption sync point: every process
        answers True at the same step). A single process has no such point, and Orbax's
        answer there is always False: its first call records SIGTERM from then on (the
        handler already installed, if any, still runs; the default one, which ends the
        process at once, does not), and it returns True once one came.
        """
        if self._writer is None:
            return False
        if orbax_io.process_count() > 1:
            return bool(self._writer.ocp.reached_preemption(step))
        return _SIGTERM.received() or bool(self._writer.ocp.reached_preemption(step))

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
        step, epoch = fmt.as_int("step", step), fmt.as_int("epoch", epoch, optional=True)
        force = fmt.as_bool("force", force)
        clean = fmt.clean_metrics(metrics)
        value = self.policy.monitored_value(clean)
        encoded_data = fmt.encode_data_state(data_state) if data_state is not None else None
        self._check_lock()
        self._writer.raise_finished()
        return self._writer.offer(step, state, clean, epoch, encoded_data, value,
                                  now=self._clock(), force=force)

    def wait(self, *, reclaimed: bool = False) -> None:
        """Block until every background write has committed (and raise if one failed).

        In a multi-process job every process calls it (as it calls ``save``), and it
        returns on each once the primary has also written its manifests and taken what
        they replaced out of the directory: a process that then reads the directory sees
        what was committed. The space of what was replaced is freed in the background
        (``close()`` waits for it; a failure is raised at the next call).

        Args:
          reclaimed: also wait until that space is freed: for a script that measures what
            a save costs (its CPU, the disk's free space) and must not leave part of it
            running into the next measurement. The next write waits for it anyway.
        """
        self._wait(reclaimed=fmt.as_bool("reclaimed", reclaimed))

    def _wait(self, reclaimed: bool = False) -> None:
        self._check_open()
        try:
            if self._writer is not None:
                self._writer.flush_ledger()
                self._writer.finish_pending(reclaimed=reclaimed)
        except Exception as e:  # a process that failed still meets the others (not on Ctrl-C)
            if self._writer is not None:
                orbax_io.meet_after_failure("wait", e)
            raise
        if self._writer is not None:
            orbax_io.sync_processes("wait")
        self._check_lock()

    def close(self) -> None:
        """Finish writes and release resources; the manager cannot be used afterwards."""
        if self._closed:
            return
        try:
            if not self._read_only:
                self._wait(reclaimed=True)
        finally:
            self._closed = True
            _open_managers.discard(self)
            try:
                if self._writer is not None:
                    self._writer.close()
            finally:
                if self._dirlock is not None:
                    self._dirlock.release()

    def __enter__(self) -> "CheckpointManager":
        self._check_open()  # a closed manager fails here, not at the first call inside
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
        return reader.read(self._catalog, which, target, path, warn=self._warn_corrupt)

    def restore_data_state(self, which: Which = "latest") -> Any:
        """The data iterator state saved with checkpoint ``which`` (None if none was)."""
        self._check_open()
        self._finish_pending()
        return self._catalog.read_data_state(self._catalog.resolve_verified(which))

    def verify(self, step: int | None = None, *, checksums: bool = True,
               strict: bool = False) -> dict[int, list[str]]:
        """Check checkpoints against the manifests written when they were committed.

        Args:
          step: one step, or None for every checkpoint in the directory (those already
            found corrupt included).
          checksums: compare the small files' checksums and read every array once to
            compare it with its saved fingerprint (else sizes only).
          strict: count a checkpoint without a manifest as a problem.

        Returns:
          ``{step: problems}``, oldest first; an empty list means it verifies. A step that
          fails is set aside, as when :meth:`restore` finds it.

        Raises:
          CheckpointNotFoundError: ``step`` is not a checkpoint of this directory.
        """
        self._check_open()
        self._finish_pending()
        if step is not None:
            step = fmt.as_int("step", step)
            everything = self._catalog.all_steps()
            if step not in everything:
                raise CheckpointNotFoundError(
                    f"no checkpoint for step {step} in {self._dir}; available steps: "
                    f"{everything or 'none'}.")
            return reader.verify(self._catalog, [step], checksums=checksums, strict=strict)
        return reader.verify_all(self._catalog, checksums=checksums, strict=strict)

    def delete(self, step: int) -> None:
        """Delete checkpoint ``step`` now (for ``jaxckpt prune``); its metrics stay in
        :meth:`history`.

        Raises:
          CheckpointNotFoundError: no checkpoint ``step`` (lists the available steps).
        """
        self._check_open(write=True)
        self._finish_pending()
        step = self._catalog.resolve(fmt.as_int("step", step))
        log.debug("deleting step %d: delete() was called", step)
        if self._primary:
            storage.remove_tree(self._dir, step, timeout=self._timeout)
        self._catalog.forget(step)

    # -- internals ------------------------------------------------------------------------

    def _finish_pending(self) -> None:
        if self._writer is not None:
            self._writer.finish_pending()

    def _check_open(self, write: bool = False) -> None:
        if self._closed:
            raise RuntimeError("this CheckpointManager is closed; open a new one.")
        if write and self._read_only:
            raise RuntimeError(f"{self._dir} was opened read_only; open it without "
                               "read_only=True to save.")

    def _check_lock(self) -> None:
        if self._dirlock is not None:
            self._dirlock.check()

    def _warn_other_naming(self) -> None:
        """A read-only open that finds no checkpoint says so when Orbax wrote some under
        a step naming jaxckpt does not read (a writable open refuses the directory)."""
        theirs = other_naming(self._dir, timeout=self._timeout)
        if theirs:
            warnings.warn(other_naming_message(self._dir, theirs), stacklevel=3)

    def _warn_corrupt(self, message: str) -> None:
        warnings.warn(message + ": it is set aside, never restored, never best and never "
                      "deleted" + ("." if self._read_only else
                                   f"; the next save moves it to {self._dir / fmt.CORRUPT_DIR}."),
                      stacklevel=5)


_open_managers: "weakref.WeakSet[CheckpointManager]" = weakref.WeakSet()


def _close_forgotten() -> None:
    """A user who forgets ``close()`` still gets the pending write, or a warning naming it."""
    for mngr in list(_open_managers):
        pending = mngr.latest_step()
        try:
            mngr.close()
        except Exception as e:  # noqa: BLE001 - at exit: a warning, not a traceback
            warnings.warn(f"CheckpointManager({mngr.directory}) was not closed and its last "
                          f"write (step {pending}) did not complete at exit: {e}")


# At exit, before the interpreter stops accepting work on thread pools: Orbax's finalize of
# a pending save needs them, and plain atexit hooks run only after they are shut down.
# threading's own exit hooks run first (CPython; concurrent.futures relies on the same).
getattr(threading, "_register_atexit", atexit.register)(_close_forgotten)


class _Sigterm:
    """SIGTERM, recorded from the first ``reached_preemption`` call of a single process."""

    def __init__(self):
        self._lock = threading.Lock()
        self._watching = False
        self._got = threading.Event()

    def received(self) -> bool:
        if not self._watching:
            self._watch()
        return self._got.is_set()

    def _watch(self) -> None:
        with self._lock:
            if self._watching or threading.current_thread() is not threading.main_thread():
                return  # Python takes signal handlers on the main thread only
            before = signal.getsignal(signal.SIGTERM)

            def record(signum, frame):
                self._got.set()
                if callable(before):
                    before(signum, frame)
            signal.signal(signal.SIGTERM, record)
            self._watching = True


_SIGTERM = _Sigterm()
