"""Opening a checkpoint directory: what a manager learns before its first save.

The lock (one writer per directory, one per multi-process job), the policy the directory
was written with, the ledger rebuilt from what the checkpoints carry, and unfinished
steps that a killed writer left. Each a function of the catalog and the stored file.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any

import jax
import numpy as np
from etils import epath

from jaxckpt import format as fmt
from jaxckpt import orbax_io, storage
from jaxckpt.catalog import Catalog
from jaxckpt.errors import CheckpointDirectoryError, DirectoryLockedError
from jaxckpt.ledger import Entry, Ledger
from jaxckpt.lock import DirectoryLock, describe, read_owner
from jaxckpt.policy import CheckpointPolicy

__all__ = ["lock_directory", "stored_policy", "finish_incomplete", "load_ledger"]

log = logging.getLogger("jaxckpt")


def lock_directory(directory: epath.Path,
                   timeout: float | None = storage.DEFAULT_TIMEOUT_S) -> DirectoryLock | None:
    """Process 0 takes the lock; every process of the job learns whether it did."""
    lock, error = None, None
    if jax.process_index() == 0:
        lock = DirectoryLock(directory, timeout=timeout)
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
    if error is None and jax.process_count() > 1:
        try:
            _check_shared(directory, lock)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
    if error is not None:
        raise error
    return lock


def _check_shared(directory: epath.Path, lock: DirectoryLock | None) -> None:
    """Every process must see process 0's lock file: the job writes one checkpoint, each
    process its shards, into one directory. Each process on its own disk wrote its shards
    where no other process looks: every save "succeeded" and no checkpoint could be read."""
    from jax.experimental import multihost_utils

    ours = np.frombuffer(bytes.fromhex(lock.run_id), np.uint32) if lock is not None else \
        np.zeros(4, np.uint32)
    run_id = orbax_io.from_process_0(ours).tobytes().hex()
    owner = read_owner(directory)
    sees = owner is not None and owner.get("run_id") == run_id
    seen = np.asarray(multihost_utils.process_allgather(np.int32(sees))).reshape(-1)
    if not seen.all():
        blind = [i for i, s in enumerate(seen) if not s]
        raise CheckpointDirectoryError(
            f"process(es) {blind} do not see the lock file process 0 wrote in {directory}: "
            "every process of a job must see the same directory (a shared file system, or "
            "an object store such as gs://). On per-host disks each process would write its "
            "shards where no other process reads them, and no checkpoint could be restored. "
            "Nothing was written.")


def stored_policy(catalog: Catalog, stored: dict | None, *, read_only: bool
                  ) -> CheckpointPolicy:
    """The policy the directory was written with: the newest checkpoint's own record (its
    manifest holds that file's checksum), else ``jaxckpt.json``'s (no checksum: a flipped
    ``"keep_best": 2`` -> ``0`` there deleted the best checkpoints). When the two differ,
    the checkpoint's is used, with a warning. A directory with checkpoints never gets a
    default."""
    from_file = _usable_policy(stored.get("policy") if stored else None)
    for step in sorted(catalog.records, reverse=True):
        try:
            policy = _usable_policy(catalog.read_meta(step).get("policy"))
        except FileNotFoundError:  # deleted by a live writer meanwhile
            continue
        if policy is None:
            continue
        if from_file is not None and from_file != policy:
            differ = ", ".join(
                f"{f.name} {getattr(from_file, f.name)!r} there, {getattr(policy, f.name)!r} "
                "in the checkpoint" for f in dataclasses.fields(policy)
                if getattr(from_file, f.name) != getattr(policy, f.name))
            warnings.warn(
                f"{catalog.directory / fmt.HISTORY_FILE} disagrees with the policy that "
                f"checkpoint {step}, the newest, was saved with ({differ}): using the "
                f"checkpoint's, whose record is checksummed. Pass policy=... to choose.",
                stacklevel=3)
        return policy
    if from_file is not None:
        return from_file
    mine = [s for s, v in catalog.verdicts.items() if v.writer == "jaxckpt"]
    if mine and not read_only:
        raise CheckpointDirectoryError(
            f"{catalog.directory} holds checkpoints {sorted(mine)} but no readable policy: "
            "a default one could delete the best checkpoint. Pass policy=... (the "
            "policy the run was started with).")
    return CheckpointPolicy()


def _usable_policy(data: Any) -> CheckpointPolicy | None:
    if not isinstance(data, dict):
        return None
    try:
        return CheckpointPolicy.from_json(data)
    except (TypeError, ValueError) as e:
        log.warning("stored policy %r is not usable here (%s)", data, e)
        return None


def finish_incomplete(catalog: Catalog) -> None:
    """Remove unfinished steps: half-deleted by an older jaxckpt (deleting in place), or
    half-uploaded to an object store by a writer that died."""
    for step, verdict in list(catalog.incomplete.items()):
        # Ours, or an object-store write whose writer died: this run holds the lock,
        # and Orbax itself deletes unfinished steps when it starts.
        if verdict.writer in ("jaxckpt", "unknown") and (
                verdict.writer == "jaxckpt" or storage.is_remote(catalog.directory)):
            log.warning("removing incomplete checkpoint %d in %s (%s)", step, catalog.directory,
                        verdict.describe())
            storage.remove_tree(catalog.directory, step, timeout=catalog.timeout)
            catalog.forget(step)


def load_ledger(catalog: Catalog, stored: dict | None) -> Ledger:
    """The ledger from ``jaxckpt.json`` and the segments the checkpoints carry."""
    entries = [Entry.from_json(e) for e in stored["history"]] if stored else []
    book = Ledger(entries)
    book.persisted_upto = book.last_step()  # what the file holds; lowered by any merge
    # Each checkpoint carries the entries no snapshot held when it was saved: what a lost,
    # damaged or not yet rewritten jaxckpt.json lacks comes back from there.
    for step in catalog.steps():
        try:
            meta = catalog.read_meta(step, ledger=True)
        except FileNotFoundError:  # deleted by a live writer meanwhile
            catalog.forget(step)
            continue
        segment = [Entry.from_json(e) for e in meta.get("ledger") or []]
        if not any(e.step == step for e in segment):
            segment.append(Entry(step, meta.get("metrics"), meta.get("epoch"),
                                 float(meta.get("time") or 0.0), True))
        book.merge(segment)
    # rewritten at the next flush when the file lacks an entry
    book.dirty = len(book) > 0 and book.persisted_upto != book.last_step()
    return book
