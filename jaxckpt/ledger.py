"""The metric ledger: every step offered to ``save`` with metrics, kept or not.

Append-only in memory, so a ``save`` call that writes nothing costs the same at step 10
and at step 10 million. The file ``jaxckpt.json`` is a snapshot written in the background
at most every few seconds and at ``wait``/``close``. Each checkpoint also carries, in its
own ``meta`` record, the entries no snapshot holds yet (:attr:`Ledger.persisted_upto`),
so a lost or damaged ``jaxckpt.json``, or one a killed run never rewrote, is rebuilt from
the checkpoints, even after the checkpoints before them were deleted (losing only metrics
of steps written nowhere). Owned by the calling thread; the background thread only writes
snapshots.
"""

from __future__ import annotations

import bisect
import json
import logging
import warnings
from typing import Any, Iterable, NamedTuple

from etils import epath

from jaxckpt import format as fmt
from jaxckpt import storage

__all__ = ["Entry", "Ledger", "read_file", "write_file"]

log = logging.getLogger("jaxckpt")


class Entry(NamedTuple):
    step: int
    metrics: dict[str, float] | None
    epoch: int | None
    time: float
    saved: bool

    def to_json(self) -> dict:
        # A literal, not ``_asdict()`` (6x slower): a written checkpoint carries every
        # entry since the last snapshot, thousands in a loop that calls save() each step.
        return {"step": self.step, "metrics": self.metrics, "epoch": self.epoch,
                "time": self.time, "saved": self.saved}

    @classmethod
    def from_json(cls, e: dict) -> "Entry":
        return cls(int(e["step"]), e.get("metrics"), e.get("epoch"), float(e.get("time") or 0.0),
                   bool(e.get("saved")))


class Ledger:
    """Entries ordered by step. A resumed run redoes the steps after its checkpoint: a new
    entry replaces every entry at or after its step (amortised O(1): popped from the end)."""

    def __init__(self, entries: Iterable[Entry] = ()):
        self._entries: list[Entry] = sorted(entries, key=lambda e: e.step)
        self._steps: list[int] = [e.step for e in self._entries]
        self.dirty = False
        self.persisted_upto: int | None = None
        """Every entry up to this step is in a snapshot written (or queued before any
        later deletion: the background runs in order); None: nothing is."""

    def __len__(self) -> int:
        return len(self._entries)

    def record(self, entry: Entry) -> None:
        """Add ``entry`` (one with metrics or a written checkpoint; others only truncate)."""
        while self._steps and self._steps[-1] >= entry.step:
            self._steps.pop()
            self._entries.pop()
            self.dirty = True
            self._unpersisted(entry.step)  # the snapshot holds the entries replaced
        if entry.metrics is not None or entry.saved:
            self._entries.append(entry)
            self._steps.append(entry.step)
            self.dirty = True

    def mark_unsaved(self, steps: Iterable[int]) -> None:
        """Record that the writes of ``steps`` failed."""
        for step in steps:
            i = bisect.bisect_left(self._steps, step)
            if i < len(self._steps) and self._steps[i] == step:
                self._entries[i] = self._entries[i]._replace(saved=False)
                self.dirty = True

    def entries(self) -> list[Entry]:
        return list(self._entries)

    def segment(self, after: int | None, upto: int) -> list[dict]:
        """Entries with ``after < step <= upto``, as JSON (stored in a checkpoint's meta)."""
        lo = 0 if after is None else bisect.bisect_right(self._steps, after)
        hi = bisect.bisect_right(self._steps, upto)
        return [e.to_json() for e in self._entries[lo:hi]]

    def merge(self, entries: Iterable[Entry]) -> None:
        """Add entries for steps this ledger lacks (rebuilding from checkpoints)."""
        have = set(self._steps)
        new = [e for e in entries if e.step not in have]
        if new:
            persisted = self.persisted_upto
            self.__init__([*self._entries, *new])
            self.persisted_upto = persisted
            self._unpersisted(min(e.step for e in new))
            self.dirty = True

    def last_step(self) -> int | None:
        return self._steps[-1] if self._steps else None

    def _unpersisted(self, step: int) -> None:
        """Entries from ``step`` on differ from (or are missing in) the last snapshot."""
        if self.persisted_upto is not None and self.persisted_upto >= step:
            self.persisted_upto = step - 1


def read_file(directory: epath.Path, *, timeout: float | None) -> dict | None:
    """``jaxckpt.json`` as validated JSON; None (with a warning) when missing or damaged."""
    path = directory / fmt.HISTORY_FILE
    try:
        text = storage.read_text(path, timeout=timeout)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        warnings.warn(f"{path} is unreadable ({e}); rebuilding the history from the "
                      "checkpoints. Kept checkpoints and their metrics are intact.")
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        data, problems = None, [f"not JSON ({e})"]
    else:
        problems = fmt.validate_history(data)
    if problems:
        warnings.warn(f"{path} is damaged ({'; '.join(problems)}); rebuilding the history "
                      "from the checkpoints. Kept checkpoints and their metrics are intact; "
                      "the next save rewrites the file.")
        return None
    return data


_ENCODE_CHUNK = 2000
"""Entries per ``json.dumps`` call when a snapshot is encoded (in the background): each
call holds the GIL, ~10 ms per chunk here, where the whole history of 100,000 entries
held it for ~0.6 s and stalled the training thread's next dispatch."""


def write_file(directory: epath.Path, snapshot: dict, timeout: float | None) -> None:
    storage.atomic_write_text(directory / fmt.HISTORY_FILE, encode(snapshot),
                              timeout=timeout)


def snapshot(ledger: Ledger, **extra: Any) -> dict:
    """The file's content: the entries and ``extra`` (policy, scheduler state).

    Taken on the calling thread, so it copies only the list of (immutable) entries;
    :func:`encode` turns them into JSON in the background.
    """
    return {"format": fmt.HISTORY_FORMAT, **extra, "history": tuple(ledger._entries)}


def encode(snapshot: dict) -> str:
    """``json.dumps`` of a :func:`snapshot` (its entries as objects), a chunk of entries
    at a time: the same text, without holding the GIL for the whole history."""
    head = json.dumps({k: v for k, v in snapshot.items() if k != "history"})
    entries = snapshot["history"]
    chunks = [json.dumps([e.to_json() for e in entries[i:i + _ENCODE_CHUNK]])[1:-1]
              for i in range(0, len(entries), _ENCODE_CHUNK)]
    return head[:-1] + (", " if head != "{}" else "") + '"history": [' + \
        ", ".join(chunks) + "]}"
