"""The write path of a writing manager: Orbax's async save, the background commit, the
ledger snapshots, and what happens when background work fails.

The calling thread decides (what to write, what the write replaces) and hands the rest to
one FIFO background thread: wait for Orbax's commit, write the manifest with the array
fingerprints taken at save time, delete the replaced steps, write ledger snapshots. A
failure there is raised at the next call, after the catalog has been re-read from disk.
A single-process CPU state is handed over whole, Orbax's save call included (its buffers
pinned meanwhile: :func:`jaxckpt.target.pinned_on_host`); any other state goes to Orbax
on the calling thread, which collectives and device-to-host copies need.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import warnings
from typing import Any, Callable

import numpy as np
from etils import epath

from jaxckpt import fingerprint, hostmem, integrity, orbax_io, storage
from jaxckpt import target as target_lib
from jaxckpt import format as fmt
from jaxckpt import ledger as ledger_lib
from jaxckpt.background import Background, StillRunning
from jaxckpt.catalog import Catalog
from jaxckpt.errors import CheckpointDirectoryError, CheckpointWriteError, write_error
from jaxckpt.ledger import Entry, Ledger
from jaxckpt.policy import CheckpointPolicy, Record
from jaxckpt.schedule import AutoInterval

__all__ = ["Writer", "LEDGER_FLUSH_S"]

log = logging.getLogger("jaxckpt")
LEDGER_FLUSH_S = 10.0
"""How often a run that saves rarely rewrites ``jaxckpt.json`` (and at wait/close)."""


MIN_STORE_BYTES_PER_S = 10e6
"""The slowest write a healthy store is assumed to sustain: the deadline of a background
write grows by one second per 10 MB of state, so a big checkpoint is not cut short."""


def write_deadline(timeout: float | None, started: dict) -> float | None:
    """How long ``wait`` waits for the background write of a state (``of_tree``'s
    record): the storage deadline plus the state's bytes at the slowest healthy speed."""
    if timeout is None:
        return None
    return timeout + state_nbytes(started) / MIN_STORE_BYTES_PER_S


def state_nbytes(started: dict) -> int:
    """The bytes of the arrays in ``of_tree``'s record of a state."""
    return sum(math.prod(leaf.shape) * leaf.dtype.itemsize for _, leaf in started.values())


class Writer:
    """Owned by the calling thread, except :meth:`_commit`, which runs on the background
    thread and touches only Orbax, the files and ``auto.observe_save``."""

    def __init__(self, directory: epath.Path, *, policy: CheckpointPolicy, catalog: Catalog,
                 ledger: Ledger, auto: AutoInterval, async_save: bool, primary: bool,
                 timeout: float | None, last_save_time: float | None, start_time: float,
                 warn_corrupt: Callable[[str], None]):
        self.directory, self.policy, self.catalog = directory, policy, catalog
        self.ledger, self.auto, self.async_save = ledger, auto, async_save
        self.primary, self.timeout, self.warn_corrupt = primary, timeout, warn_corrupt
        self.last_save_time, self.start_time = last_save_time, start_time
        self._checked: set[int] = set()  # steps whose small files' checksums were compared
        self._warned = False  # about saves without the monitored metric, once
        self._warned_metrics = False  # about metrics that differ between processes, once
        self._tried: int | None = None  # the last step handed to Orbax (on a store, a
        # failed save leaves its unfinished objects at the step name; steps only increase)
        self._drain_timeout = timeout  # for the background work: see write_deadline
        self.ocp = self._new_orbax()
        self.background = Background()
        self._reclaim = Background("jaxckpt-reclaim")  # frees replaced checkpoints' space
        self._last_flush = time.monotonic()
        self._doing = "background work"  # what the background thread does now, for errors
        self._abandoned = threading.Event()  # set by close() past the deadline: a late
        # task (the store answered again) then writes nothing more

    def move_corrupt_aside(self) -> None:
        """Move set-aside checkpoints out of the way, so a resumed run can save their steps."""
        if self.catalog.corrupt:
            self.catalog.move_corrupt_aside(primary=self.primary)
            self.ocp.reload()  # Orbax refuses to save a step it still lists

    def close(self) -> None:
        """Finish the background work; past the deadline, abandon it and raise."""
        if not (self.background.shutdown(timeout=self.timeout)
                and self._reclaim.shutdown(timeout=self.timeout)):
            self._abandoned.set()
            raise CheckpointWriteError(
                f"closing the manager of {self.directory}: {self._doing} did not finish "
                f"within {self.timeout:.0f} s (a stalled store?); it was abandoned, and this "
                "manager writes nothing more. Every committed checkpoint is intact.")
        self.ocp.close()
        self._remove_own_leftovers()

    def _remove_own_leftovers(self) -> None:
        """Remove what a failed save left (Orbax's temporary step directory after a full
        disk): every write has ended (Orbax's manager is closed), and this run holds the
        lock. The next writing open would remove it too, but a run that goes on saving
        should not hold it until then. One process only: another could still be writing
        its share."""
        for e in self._reclaim.settle():  # its removals, which finish_deletions repeats
            log.warning("%s: %s", (getattr(e, "__notes__", None) or ["removing"])[-1], e)
        if not self.primary or orbax_io.process_count() > 1:
            return
        try:
            storage.finish_deletions(self.directory)
        except OSError as e:  # left for the next writing open, which removes it too
            log.warning("could not remove what a failed save left in %s: %s",
                        self.directory, e)

    # -- deciding ----------------------------------------------------------------------

    def due(self, step: int, epoch: int | None, now: float) -> bool:
        """Whether the schedule (the policy's, or ``every="auto"``'s) asks for ``step``."""
        last = self.last_save_time or self.start_time
        return self.policy.is_due(step, epoch=epoch, now=now, last_save_time=last) or \
            self.auto.due(step, self.catalog.latest())

    def agreed_due(self, step: int, epoch: int | None, now: float,
                   value: float | None = None) -> tuple[bool, float, float | None]:
        """:meth:`due`, the time the policy records for this call and the monitored
        ``value``, as process 0 sees them.

        Every process of a job must save the same steps (Orbax's save is collective) and
        rank the same checkpoint best (a restore of "best" reads one step everywhere). A
        policy that reads the clock (``CheckpointPolicy.reads_clock``) would let each
        process's own clock and measurements decide, and a monitored value computed on each
        host's own shard of the validation data, not averaged, differs between processes:
        one process saved a step the other did not (both waiting at Orbax's commit until it
        timed out), or each ranked another step best (a restore mixed two steps' shards and
        reported intact checkpoints corrupt). Such calls take process 0's answer, time,
        ``every="auto"`` interval and value: one small broadcast per call. A policy of
        steps and epochs, called without a monitored value, decides alike everywhere,
        without one.
        """
        due = self.due(step, epoch, now)
        if orbax_io.process_count() == 1 or not (self.policy.reads_clock or value is not None):
            return due, now, value
        words = np.concatenate([np.array([now, math.nan if value is None else value],
                                         np.float64).view(np.uint32),
                                np.array([due, self.auto.every or 0], np.uint32)])
        got = orbax_io.from_process_0(words)
        self.auto.every = int(got[5]) or None
        agreed_now, agreed = (float(x) for x in got[:4].view(np.float64))
        if value is not None:
            self._check_same_value(step, value, agreed)
            value = agreed
        return bool(got[4]), agreed_now, value

    def _check_same_value(self, step: int, value: float, agreed: float) -> None:
        """Warn once when this process's monitored value is not process 0's."""
        same = agreed == value or (math.isnan(agreed) and math.isnan(value))
        if not same and not self._warned_metrics:
            self._warned_metrics = True
            warnings.warn(
                f"save(step={step}): {self.policy.monitor}={value} on this process, "
                f"{agreed} on process 0; every process must pass the same metrics (average "
                "them over processes, e.g. with jax.lax.pmean in the eval step or "
                "jax.experimental.multihost_utils.process_allgather(x).mean()). Process 0's "
                "decides what is saved and kept (reported once).", stacklevel=5)

    def offer(self, step: int, state: Any, metrics: dict | None, epoch: int | None,
              data_state: Any, value: float | None, *, now: float, force: bool) -> bool:
        """Record ``step`` in the ledger and write it if the policy wants it (arguments
        already checked by the manager); whether it was written."""
        latest = self.catalog.latest()
        if latest is not None and step <= latest:
            raise ValueError(
                f"save(step={step}) is not above the latest saved step {latest} in "
                f"{self.directory}. Steps must increase: resume from restore('latest') and "
                "continue its step count, or save into a new directory.")
        self.auto.observe_call(step)
        due, now, value = self.agreed_due(step, epoch, now, value)
        if value is not None and not math.isfinite(value):
            kept = ("it can be kept as latest, never as best" if self.policy.keep_latest
                    else "it is never best, and with keep_latest=0 it is not written unless "
                    "forced")
            warnings.warn(f"{self.policy.monitor}={value} at step {step} is not finite: "
                          f"{kept}.", stacklevel=3)
            value = None
        reason = "forced" if force else self.policy.should_save(
            value, list(self.catalog.records.values()), due=due,
            step=step, time=now, has_metrics=metrics is not None)
        if reason is None:
            self.ledger.record(Entry(step, metrics, epoch, now, False))
            self.maybe_flush_ledger()
            return False
        # TypeError names a leaf that cannot be saved; numpy leaves are copied for a write
        # that reads them after save() returns
        saveable = target_lib.to_saveable(state, snapshot=self.async_save)
        started = fingerprint.of_tree(saveable)  # dispatched now, read in the background
        hostmem.keep_freed_pages(state_nbytes(started))  # the step after it reuses pages
        if self.policy.monitor and metrics is None and not force and not self._warned:
            self._warned = True
            log.warning("save(step=%d) without metrics: a checkpoint saved without %r is "
                        "never best%s (reported once per manager).", step, self.policy.monitor,
                        "; it can be kept as latest" if self.policy.keep_latest else "")
        self.finish_pending()  # Orbax writes one checkpoint at a time; raises a failed one
        self.move_corrupt_aside()
        self.ledger.record(Entry(step, metrics, epoch, now, True))
        self.write(step, saveable, metrics, epoch, data_state, now, value, reason, started)
        self.auto.observe_saved(step)
        return True

    # -- writing -------------------------------------------------------------------------

    def write(self, step, state, metrics, epoch, data_state, now, value, reason,
               started) -> None:
        # A disk only: a store has no directories to delete or make.
        remote = storage.is_remote(self.directory)
        if not remote:
            try:
                storage.check_writable(self.directory)
            except OSError as e:
                self.ledger.mark_unsaved([step])
                if isinstance(e, FileNotFoundError):  # never re-create a deleted directory
                    raise CheckpointDirectoryError(
                        f"checkpoint directory {self.directory} was deleted or renamed while "
                        "this run was writing to it; nothing was re-created. Restore it, or "
                        "save into a new directory with a new CheckpointManager.") from None
                raise write_error(f"saving step {step} to {self.directory}", e,
                                  self.catalog.steps()) from e
        # On a store, one lookup per save (Orbax itself makes one too): Orbax deletes what
        # is at the step name before writing. A step this run tried before holds its own
        # unfinished write, which Orbax may overwrite.
        if not (remote and step == self._tried):
            self._check_step_free(step)
        record = self._new_record(step, value, now, metrics)
        if self._check_kept_before_deleting(record):  # set one aside: rank again
            record = self._new_record(step, value, now, metrics)
        previous = self.catalog.latest()
        meta = fmt.encode_meta(step=step, epoch=epoch, metrics=metrics, time=now,
                               reason=str(reason), policy=self.policy.to_json(),
                               improved=record.improved,
                               ledger=self.ledger.segment(self._segment_start(previous), step))
        start = time.perf_counter()
        self._tried = step
        items = (meta, data_state, {self.policy.monitor: value} if value is not None else None)
        pinned = target_lib.pinned_on_host(state) if self.async_save else None
        if pinned is None:
            try:
                orbax_io.save(self.ocp, step, state, *items)
            except Exception as e:
                self.ledger.mark_unsaved([step])
                self.reset_orbax(e)
                raise write_error(f"saving step {step} to {self.directory}", e,
                                  self.catalog.steps()) from e
            handoff = None
        else:  # a CPU state, its buffers pinned: Orbax's save runs on the background thread
            handoff = (pinned, items)
        blocked = time.perf_counter() - start
        self.catalog.add(step, record)
        self._checked.add(step)  # written by this manager: its checksums are fresh
        self.last_save_time = now
        kept = self.policy.kept(list(self.catalog.records.values()))
        stale = sorted(set(self.catalog.records) - set(kept))
        for s in stale:
            self.catalog.forget(s)
        log.debug("step %d saved (%s); keeping %s; deleting %s after commit", step, reason,
                  sorted(kept), stale)
        self.background.submit(self._noted(self._commit), step, stale, start, blocked, started,
                               handoff)
        self._drain_timeout = write_deadline(self.timeout, started)
        self.maybe_flush_ledger()
        if not self.async_save:
            self.finish_pending()

    def _new_record(self, step: int, value: float | None, now: float,
                    metrics: dict | None) -> Record:
        """What the policy will know of ``step``: whether it improves on the checkpoints
        in the catalog now."""
        improved = (self.policy.improves(value, list(self.catalog.records.values()))
                    if self.policy.monitor else None)
        return Record(step, value, time=now, has_metrics=metrics is not None,
                      improved=improved)

    def _check_kept_before_deleting(self, new: Record) -> bool:
        """Compare the small files' checksums of the checkpoints kept beside ``new``
        (once each per manager; opening checks sizes only) when saving ``new`` would
        delete another: a kept checkpoint is the reason the other is deleted. A best
        whose ``_METADATA`` was damaged otherwise stayed best, and the runner-up, what a
        restore falls back to, was deleted in its favour. One found damaged is set aside
        before the new checkpoint is ranked. Returns whether one was (or vanished)."""
        before = set(self.catalog.records)
        while not self._checked.issuperset(self.catalog.records):  # else nothing to do
            records = list(self.catalog.records.values())
            kept = self.policy.kept(records + [new])
            unchecked = [s for s in kept if s != new.step and s not in self._checked]
            if not unchecked or {r.step for r in records} <= set(kept):
                break
            for s in unchecked:
                self._checked.add(s)
                self.catalog.examine(s, checksums=True, warn=self.warn_corrupt)
        return set(self.catalog.records) != before

    def _check_step_free(self, step: int) -> None:
        """Refuse a step whose name is taken by something that is not a checkpoint (an
        empty directory, a file, a link, an unfinished copy): on a disk Orbax would fail on
        it at every try (in the background for a file); on a store it deletes it, silently."""
        path = self.directory / str(step)
        kind = storage.occupant(path, timeout=self.timeout)
        if kind is not None:
            self.ledger.mark_unsaved([step])
            raise CheckpointWriteError(
                f"save(step={step}): {path} already exists, {kind}. jaxckpt never writes "
                "over what it did not make: move it away or delete it, then save again (or "
                "save a later step). Nothing was written; every checkpoint is intact "
                f"({self.catalog.steps()}).")

    def _segment_start(self, previous: int | None) -> int | None:
        """Where the ledger segment a checkpoint carries starts: after the previous
        checkpoint, or earlier, at the last entry a snapshot holds. A checkpoint that is
        deleted later takes its segment with it; the entries it carried must then be in
        the snapshot or in this segment. (Only the primary writes the meta record.)"""
        persisted = self.ledger.persisted_upto
        if not self.primary or previous is None:
            return previous
        return None if persisted is None else min(previous, persisted)

    def _commit(self, step: int, stale: list[int], start: float, blocked: float,
                started: dict, handoff: tuple | None) -> None:
        """Background: wait for Orbax's commit of ``step``, write its manifest, then delete
        what it replaced (never before: an older checkpoint outlives a failed newer one).

        With ``handoff`` (a CPU state whose buffers it pins; see
        :func:`jaxckpt.target.pinned_on_host`), Orbax's save is called here first. A
        failure there is reported at the next call, as a failed write is.

        The fingerprints are finished while Orbax still writes (both only read the state):
        the hashes of host arrays then take none of the time from ``save()`` to the manifest.
        """
        step_dir = self.directory / str(step)
        # The space of what the last commit replaced is free before this write fills more.
        self._reclaim.join()
        self._doing = f"writing checkpoint {step} to {step_dir} (Orbax)"
        if handoff is not None:
            if self._abandoned.is_set():  # close() gave up on the queue: write nothing more
                return
            pinned, items = handoff  # its views live as long as this task
            orbax_io.save(self.ocp, step, pinned.arrays(), *items)
        arrays = fingerprint.resolve(started) if self.primary else None
        self.ocp.wait_until_finished()  # no deadline of its own: finish_pending has it
        self.ocp.check_for_errors()
        if self.primary and not self._abandoned.is_set():
            self._doing = f"writing the manifest of checkpoint {step} in {step_dir}"
            storage.call(lambda: integrity.write_manifest(
                step_dir, integrity.build_manifest(step_dir, step, arrays)),
                what="writing the manifest in", path=step_dir, timeout=self.timeout)
            for s in stale:  # plain file operations: no collective, safe on this thread
                if self._abandoned.is_set():  # abandoned after a stall: leave it for the next run
                    break
                log.debug("deleting step %d: no longer among the kept checkpoints", s)
                self._doing = f"deleting checkpoint {s} ({self.directory / str(s)})"
                aside = storage.set_aside(self.directory, s, timeout=self.timeout)
                if aside is not None:
                    self._reclaim.submit(self._noted(storage.remove_set_aside, self._doing),
                                         aside)
        self.auto.observe_save(step, blocked, time.perf_counter() - start)

    def maybe_flush_ledger(self) -> None:
        if self.ledger.dirty and time.monotonic() - self._last_flush > LEDGER_FLUSH_S:
            self.flush_ledger()

    def flush_ledger(self) -> None:
        """Queue a snapshot of the ledger (taken here, written in the background)."""
        if not self.primary or not self.ledger.dirty:
            return
        snapshot = ledger_lib.snapshot(
            self.ledger, policy=self.policy.to_json(), last_save_time=self.last_save_time,
            auto_every=self.auto.every, save_cost_s=self.auto.save_cost_s)
        self.ledger.dirty = False
        self.ledger.persisted_upto = self.ledger.last_step()  # written before any deletion
        # queued after it (one background thread, in order)
        self._last_flush = time.monotonic()
        self.background.submit(self._noted(self._write_ledger), snapshot)

    def _noted(self, task: Callable[..., None], doing: str | None = None
               ) -> Callable[..., None]:
        """``task``, whose error carries what it was doing (``doing``, or what the writer
        was doing when it failed), for the message at the next call: later tasks have
        moved ``_doing`` on by then."""
        def run(*args):
            try:
                task(*args)
            except BaseException as e:
                e.add_note(doing or self._doing)
                raise
        return run

    def _write_ledger(self, snapshot: dict) -> None:
        if self._abandoned.is_set():
            return
        self._doing = f"writing {self.directory / fmt.HISTORY_FILE}"
        ledger_lib.write_file(self.directory, snapshot, self.timeout)

    def raise_finished(self) -> None:
        try:
            self.background.raise_finished()
            self._reclaim.raise_finished()
        except Exception as e:
            self._after_failure(e)

    def finish_pending(self, reclaimed: bool = False) -> None:
        """Wait for the background writes; with ``reclaimed``, also for the removal of
        the checkpoints they replaced (``close``). ``wait()`` returns without it: the
        replaced checkpoints are out of every reader's sight once set aside, and freeing
        their space took as long as a 128 MiB write here. A failed removal is raised at
        the next call either way."""
        try:
            self.background.drain(timeout=self._drain_timeout)
            if reclaimed:
                self._reclaim.drain(timeout=self.timeout)
            else:
                self._reclaim.raise_finished()
        except Exception as e:
            self._after_failure(e)

    def _after_failure(self, e: Exception) -> None:
        """See what survived on disk, record what was lost, and raise."""
        self.auto.write_failed()
        if isinstance(e, (StillRunning, storage.StorageTimeoutError)):
            # A stalled store: looking at it again (a rescan, Orbax's close) would stall.
            self.ledger.dirty = True  # a snapshot may be stuck; the next flush rewrites it
            self.ledger.persisted_upto = None
            own = isinstance(e, storage.StorageTimeoutError)
            what = (f"{e.operation if own else self._doing} did not finish within "
                    f"{e.timeout_s if own else self.timeout:.0f} s")
            peers = ""
            if not own and orbax_io.process_count() > 1:
                peers = (" In a multi-process job this is also how a write that failed on "
                         "another process shows (or on this one, with the error in its log): "
                         "Orbax's processes wait for each other at its commit, for up to "
                         f"{orbax_io.ASYNC_TIMEOUT_S / 60:.0f} min. Look for the first error "
                         "in every process's log.")
            raise CheckpointWriteError(
                f"{what}: the store stopped answering (or is slower than storage_timeout_s). "
                "Every committed checkpoint is intact, and the unfinished work goes on if the "
                "store answers again. Check the store (or the network) and save again, or "
                "raise CheckpointManager(storage_timeout_s=...)." + peers) from e
        for other in self.background.settle(timeout=self.timeout):
            log.error("also failed in the background in %s: %r", self.directory, other)
        self.reset_orbax(e)
        self.ledger.dirty = True  # a snapshot may have been lost with the failure
        self.ledger.persisted_upto = None
        before = set(self.catalog.records)
        self.catalog.scan(warn=self.warn_corrupt)
        lost = sorted(before - set(self.catalog.records))
        self.ledger.mark_unsaved(lost)
        doing = (getattr(e, "__notes__", None) or ["its manifest, deletions or the history "
                                                   "file"])[-1]
        what = (f"background write of step(s) {lost} to {self.directory}" if lost else
                f"background work in {self.directory} ({doing})")
        raise write_error(what, e, self.catalog.steps()) from e

    def _new_orbax(self):
        return orbax_io.new_manager(self.directory, async_save=self.async_save,
                                    read_only=False, policy=self.policy)

    def reset_orbax(self, reported: BaseException) -> None:
        """After a failed save, continue with a fresh Orbax manager (Orbax re-raises a
        failed save's error at later calls; a new one starts clean), and remove the failed
        save's temporary directory, which a local one kept for the rest of the run."""
        orbax_io.close_quietly(self.ocp, reported)
        self._remove_own_leftovers()
        self.ocp = self._new_orbax()
