"""Reading checkpoints back: restore and verify, each byte read once.

A restore resolves ``which`` in the catalog (sizes and small files' checksums), reads the
state through Orbax once, and compares the arrays it read with the fingerprints taken
when they were saved. ``"latest"``/``"best"`` fall back to the next checkpoint when one
fails; a step a live writer deletes meanwhile is looked up again. Runs on the calling
thread, which owns the catalog.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

from jaxckpt import integrity, orbax_io, storage
from jaxckpt.catalog import Catalog, Which
from jaxckpt.errors import CheckpointCorruptError, CheckpointNotFoundError

__all__ = ["Checkpoint", "read", "verify", "verify_all"]

RELISTS = 5
"""How many times :func:`verify_all` lists the directory again after a live writer deleted
a step it was about to check."""


class Checkpoint(NamedTuple):
    """A restored checkpoint: the state and everything saved beside it."""

    step: int
    state: Any
    metrics: dict[str, float] | None
    epoch: int | None
    data_state: Any


def read(catalog: Catalog, which: Which, target: Any, subtree: tuple[str, ...], *,
         warn: Callable[[str], None]) -> Checkpoint:
    """Checkpoint ``which`` restored into ``target`` (see ``CheckpointManager.restore``)."""
    directory = catalog.directory
    while True:
        step = catalog.resolve_verified(which, checksums=not subtree, stacklevel=5)
        verdict = catalog.verdicts.get(step)
        try:
            state = orbax_io.restore_state(
                directory / str(step), target, step=step, subtree=subtree,
                fingerprints=verdict and verdict.arrays, saved=verdict and verdict.saved)
            meta = catalog.read_meta(step)
            data_state = catalog.read_data_state(step)
        except orbax_io.ArraysCorrupt as e:
            catalog.set_aside(integrity.Verdict(step, e.problems))
            if not isinstance(which, str):
                raise CheckpointCorruptError(catalog.corrupt_message(catalog.corrupt[step])) \
                    from None
            continue  # resolve_verified names it in its "skipped" warning
        except Exception:
            if catalog.exists(step):
                raise
            # Deleted by the run writing there while this one read it: look again.
            catalog.scan(warn=warn)
            if not isinstance(which, str):
                raise CheckpointNotFoundError(
                    f"checkpoint {step} in {directory} was deleted while it was being read "
                    f"(by the run writing there); available: {catalog.steps()}.") from None
            continue
        return Checkpoint(step, state, meta.get("metrics"), meta.get("epoch"), data_state)


def verify(catalog: Catalog, steps: list[int], *, checksums: bool,
           strict: bool) -> dict[int, list[str]]:
    """``{step: problems}`` for ``steps`` (see ``CheckpointManager.verify``)."""
    out, unverified = {}, []
    for step in steps:
        verdict = catalog.examine(step, checksums=checksums)
        if verdict is None:
            continue  # deleted by a live writer meanwhile
        if checksums and verdict.ok and verdict.arrays is not None:
            verdict = _verify_arrays(catalog, verdict)
            if verdict is None:
                continue
        problems = list(verdict.problems)
        if verdict.ok and not verdict.has_manifest:
            unverified.append(step)
            if strict:
                problems = [verdict.describe()]
        out[step] = problems
    if unverified and not strict:
        warnings.warn(catalog.unverified_message(unverified), stacklevel=3)
    return out


def verify_all(catalog: Catalog, *, checksums: bool, strict: bool) -> dict[int, list[str]]:
    """``{step: problems}`` for every checkpoint in the directory, oldest first.

    Beside a live writer the catalog is a snapshot: a writer keeping the latest N deletes
    the steps it listed while they are checked. Each time one vanished, the directory is
    listed again and what the writer committed meanwhile is checked too, so that a
    directory that always holds a checkpoint is never reported empty."""
    out: dict[int, list[str]] = {}
    for attempt in range(RELISTS + 1):
        todo = [s for s in catalog.all_steps() if s not in out]
        got = verify(catalog, todo, checksums=checksums, strict=strict)
        out.update(got)
        if len(got) == len(todo) or attempt == RELISTS:
            break
        catalog.scan()
    present = set(catalog.all_steps())
    return {s: out[s] for s in sorted(out) if s in present}


def _verify_arrays(catalog: Catalog, verdict: integrity.Verdict) -> integrity.Verdict | None:
    """Read the state once and compare it with its saved fingerprints; None when a live
    writer deleted the step while it was read."""
    step = verdict.step
    try:
        orbax_io.restore_state(catalog.directory / str(step), None, step=step,
                               fingerprints=verdict.arrays)
    except orbax_io.ArraysCorrupt as e:
        verdict = integrity.Verdict(step, e.problems)
        catalog.set_aside(verdict)
    except Exception as e:
        if not catalog.exists(step):
            catalog.forget(step)
            return None
        if isinstance(e, (MemoryError, storage.StorageTimeoutError)):
            raise  # this machine's trouble, not the checkpoint's
        # Reported for this step, not raised: one unreadable checkpoint (a leaf type this
        # Orbax cannot read back, an I/O error) must not hide the verdict on the others.
        # Set aside like a damaged one (never deleted: a writer moves it aside).
        verdict = dataclasses.replace(verdict, problems=verdict.problems + (
            f"state: could not be read ({type(e).__name__}: {str(e)[:300]})",))
        catalog.set_aside(verdict)
    return verdict
