"""The checkpoints of a directory as the library sees them: usable, set aside, foreign.

One definition of "latest" and "best" for properties, ``restore``, the CLI and the docs:
the newest (best) checkpoint that is complete and not known to be damaged. Sizes (and
the checksums of the JSON records read to rank each step) are checked when the directory
is opened; checksums of small files and the fingerprints of the arrays when a checkpoint
is restored or verified. A checkpoint found damaged is *set aside*: never restored, never best, never
deleted, and ``latest``/``best`` move to the next one. A step that disappears while it
is read (a live writer deleted it) is forgotten, not reported as damaged.

Owned by the calling thread: the background thread never reads or changes a catalog.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import re
import time
import warnings
from typing import Any, Callable, Literal

from etils import epath

from jaxckpt import format as fmt
from jaxckpt import integrity, orbax_io, storage
from jaxckpt.errors import (CheckpointCorruptError, CheckpointDirectoryError,
                            CheckpointNotFoundError)
from jaxckpt.integrity import Verdict
from jaxckpt.policy import CheckpointPolicy, Record
from jaxckpt.policy.names import resolve_mode

__all__ = ["Catalog", "Which", "writers", "check_writable"]

log = logging.getLogger("jaxckpt")

Which = Literal["latest", "best"] | int
_TABLES = ("records", "verdicts", "corrupt", "incomplete", "_metas", "_data")


@dataclasses.dataclass
class Catalog:
    """Usable checkpoints (``records`` and their ``verdicts``), ``corrupt`` ones set aside,
    ``incomplete`` ones ignored; keyed by step."""

    directory: epath.Path
    policy: CheckpointPolicy
    timeout: float | None = storage.DEFAULT_TIMEOUT_S
    records: dict[int, Record] = dataclasses.field(default_factory=dict)
    verdicts: dict[int, Verdict] = dataclasses.field(default_factory=dict)
    corrupt: dict[int, Verdict] = dataclasses.field(default_factory=dict)
    incomplete: dict[int, Verdict] = dataclasses.field(default_factory=dict)
    # Meta records read so far: opening a directory asks for each one several times (to
    # rank it, for the stored policy, for the ledger); a committed record never changes.
    _metas: dict[int, dict] = dataclasses.field(default_factory=dict, repr=False)
    _data: dict[int, Any] = dataclasses.field(default_factory=dict, repr=False)

    # -- scanning ----------------------------------------------------------------------

    def scan(self, *, warn: Callable[[str], None] | None = None) -> None:
        """List the step directories now and classify each by a cheap check (sizes).

        A step found damaged before stays set aside: a cheap check cannot see what a
        checksum or an array fingerprint saw (only :meth:`examine` of it clears it)."""
        known = dict(self.corrupt)
        before = {name: dict(getattr(self, name)) for name in _TABLES}
        try:
            self._scan(warn)
        except BaseException:  # a stalled store: keep the view this catalog had
            for name, table in before.items():
                getattr(self, name).clear()
                getattr(self, name).update(table)
            raise
        for step, verdict in known.items():
            if step in self.records:
                self.set_aside(verdict)

    def _scan(self, warn: Callable[[str], None] | None) -> None:
        for _ in range(5):  # a live writer may delete what was listed before it is read
            for name in _TABLES:
                getattr(self, name).clear()
            steps = [s for s in map(fmt.step_of, storage.list_names(
                self.directory, timeout=self.timeout)) if s is not None]
            vanished = [s for s in steps if self.examine(s, checksums=False, warn=warn) is None]
            if not vanished:  # else list again: what replaced them was committed first
                return

    def examine(self, step: int, *, checksums: bool,
                warn: Callable[[str], None] | None = None) -> Verdict | None:
        """Check one step and file it; None when it no longer exists."""
        self._metas.pop(step, None)  # read it again: the step may have been replaced
        step_dir = self.directory / str(step)
        try:
            verdict = self._io(lambda: integrity.check(step_dir, step, checksums=checksums),
                               "checking", step_dir)
            if verdict.records and fmt.META in verdict.records:
                self._metas[step] = verdict.records[fmt.META]  # read by the check
            record = self._record(step, verdict) if verdict.ok else None
            if not verdict.ok and not self.exists(step):
                raise FileNotFoundError(step_dir)  # renamed away while it was read
        except FileNotFoundError:
            self.forget(step)
            return None
        self.verdicts.pop(step, None)
        self.corrupt.pop(step, None)
        self.incomplete.pop(step, None)
        self._data.pop(step, None)
        if verdict.records and fmt.DATA_STATE in verdict.records:
            self._data[step] = verdict.records[fmt.DATA_STATE]
        if verdict.incomplete:
            log.debug("step %d in %s is incomplete (%s): ignored", step, self.directory,
                      verdict.describe())
            self.records.pop(step, None)
            self.incomplete[step] = verdict
        elif not verdict.ok:
            self.set_aside(verdict, warn=warn)
        else:
            self.records[step] = record
            self.verdicts[step] = verdict
        return verdict

    def revalue(self, policy: CheckpointPolicy) -> None:
        """Rank the usable checkpoints by ``policy`` (resolved after the first scan)."""
        self.policy = policy
        for step in list(self.records):
            try:
                self.records[step] = self._record(step, self.verdicts[step])
            except FileNotFoundError:
                self.forget(step)

    def forget(self, step: int) -> None:
        for name in _TABLES:
            getattr(self, name).pop(step, None)

    def add(self, step: int, record: Record) -> None:
        """A checkpoint this process just wrote (committed in the background)."""
        self._metas.pop(step, None)
        self.records[step] = record
        self.verdicts[step] = Verdict(step)

    def set_aside(self, verdict: Verdict, *, warn: Callable[[str], None] | None = None) -> None:
        """Take a damaged checkpoint out of every decision: never best, latest, deleted."""
        self.records.pop(verdict.step, None)
        self.verdicts.pop(verdict.step, None)
        self.corrupt[verdict.step] = verdict
        # Once: as the caller's warning when it has one, else in the log.
        log.log(logging.DEBUG if warn else logging.WARNING, "checkpoint %d in %s is corrupt: "
                "%s", verdict.step, self.directory, verdict.describe())
        if warn is not None:
            warn(f"checkpoint {verdict.step} in {self.directory} is corrupt "
                 f"({_summary(verdict.problems)})")

    def exists(self, step: int) -> bool:
        """Whether step ``step``'s directory is still there (a live writer deletes)."""
        path = self.directory / str(step)
        return self._io(path.exists, "looking up", path)

    def _io(self, fn: Callable[[], Any], what: str, path: epath.Path) -> Any:
        """``fn()`` under the storage deadline (on an object store)."""
        return storage.call(fn, what=what, path=path, timeout=self.timeout)

    # -- reading one step's records -------------------------------------------------------

    def read_meta(self, step: int, *, ledger: bool = False) -> dict:
        """A step's meta record ({} for one written by plain Orbax); raises FileNotFoundError
        when the step is gone.

        A copy, which callers may change; its ``ledger`` segment (up to thousands of
        entries: every ``save()`` call since the last snapshot) only when asked, and then
        not copied: copying it made every ``metrics(step)`` and open cost O(entries)."""
        if step not in self._metas:
            self._metas[step] = self._read_meta(step)
        meta = self._metas[step]
        out = {k: copy.deepcopy(v) for k, v in meta.items() if k != "ledger"}
        if ledger and "ledger" in meta:
            out["ledger"] = meta["ledger"]
        return out

    def _read_meta(self, step: int) -> dict:
        path = self.directory / str(step) / fmt.META / "metadata"
        try:
            meta = json.loads(storage.read_text(path, timeout=self.timeout))
        except FileNotFoundError:
            if not self.exists(step):
                raise
            return self._orbax_meta(step)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return {}
        if not fmt.validate_meta(meta, step):
            return meta
        # A plain Orbax save with a JSON item of its own named "meta": Orbax's records.
        ours = isinstance(meta, dict) and meta.get("format") == fmt.META_FORMAT
        return {} if ours else self._orbax_meta(step)

    def _orbax_meta(self, step: int) -> dict:
        """What plain Orbax stored: the metrics (its metrics item, else its step
        metadata's) and the commit time (its step metadata's)."""
        step_meta = self._orbax_json(step, fmt.ORBAX_METADATA)
        step_meta = step_meta if isinstance(step_meta, dict) else {}
        out: dict[str, Any] = {}
        for metrics in (self._orbax_json(step, "metrics/metrics"), step_meta.get("metrics")):
            if isinstance(metrics, dict) and metrics and not fmt.validate_meta(
                    {"format": fmt.META_FORMAT, "step": step, "metrics": metrics}):
                out["metrics"] = metrics
                break
        committed = step_meta.get("commit_timestamp_nsecs")
        if isinstance(committed, int) and not isinstance(committed, bool) and committed > 0:
            out["time"] = committed / 1e9
        return {"step": step, **out} if out else {}

    def _orbax_json(self, step: int, rel: str) -> Any:
        """A JSON file of a plain Orbax step, or None when unreadable."""
        path = self.directory / str(step) / rel
        try:
            return json.loads(self._io(path.read_text, "reading", path))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None

    def _record(self, step: int, verdict: Verdict) -> Record:
        meta = self.read_meta(step)
        metrics = meta.get("metrics")
        same = _same_objective(meta.get("policy"), self.policy)
        return Record(step, self.policy.stored_value(metrics), time=meta.get("time"),
                      has_metrics=metrics is not None,
                      improved=meta.get("improved") if same else None)

    def read_data_state(self, step: int) -> Any:
        """The data iterator state saved with ``step`` (None when none was)."""
        if step in self._data:  # read (and schema-checked) by the last check
            return fmt.decode_data_state(self._data[step])
        path = self.directory / str(step) / fmt.DATA_STATE / "metadata"
        try:
            stored = json.loads(storage.read_text(path, timeout=self.timeout))
        except FileNotFoundError:
            return None
        return fmt.decode_data_state(stored)  # schema-checked when the step was verified

    def move_corrupt_aside(self, *, primary: bool) -> None:
        """Move set-aside checkpoints to ``DIR/jaxckpt-corrupt/`` (kept for inspection), so
        that a run resumed from an older checkpoint can save its steps again."""
        if not self.corrupt:
            return
        if primary:
            try:
                self._move_corrupt()
            except Exception as e:  # still meet the others, who wait for the move
                orbax_io.meet_after_failure("move_corrupt", e)
                raise
        orbax_io.sync_processes("move_corrupt")
        self.corrupt.clear()

    def _move_corrupt(self) -> None:
        aside = self.directory / fmt.CORRUPT_DIR
        if not storage.inside(self.directory, aside):
            warnings.warn(f"{aside} leads outside {self.directory} (a symlink): corrupt "
                          f"checkpoints {sorted(self.corrupt)} stay where they "
                          "are. Replace the link with a directory.", stacklevel=5)
            return
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for step, verdict in sorted(self.corrupt.items()):
            dest = aside / f"{step}-{stamp}-{os.urandom(3).hex()}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                storage.move_tree(self.directory / str(step), dest, timeout=self.timeout)
            except FileNotFoundError:
                continue
            warnings.warn(f"moved corrupt checkpoint {step} ({verdict.describe()}) to "
                          f"{dest}; it is not deleted: inspect it, then delete it.",
                          stacklevel=6)  # the caller of CheckpointManager.save

    # -- latest and best -------------------------------------------------------------------

    def steps(self) -> list[int]:
        return sorted(self.records)

    def all_steps(self) -> list[int]:
        """Every checkpoint, those found corrupt included."""
        return sorted(set(self.records) | set(self.corrupt))

    def latest(self) -> int | None:
        return max(self.records) if self.records else None

    def best(self) -> int | None:
        best = self.policy.best(self.records.values())
        return best.step if best else None

    def resolve(self, which: Which) -> int:
        """The step ``which`` names now, without reading checksums."""
        available = self.steps()
        if which == "latest":
            step = self.latest()
        elif which == "best":
            step = self.best()
            if step is None and available:
                raise CheckpointNotFoundError(
                    f"no best checkpoint in {self.directory}: " + (
                        self._no_monitor() if not self.policy.monitor else
                        f"no kept checkpoint has a finite {self.policy.monitor!r}") +
                    f". Restore 'latest' or one of the steps {available}.")
        elif _is_step(which):
            step = int(which)
            if step in self.corrupt:
                raise CheckpointCorruptError(self.corrupt_message(self.corrupt[step]))
            if step not in self.records:
                raise CheckpointNotFoundError(
                    f"no checkpoint for step {step} in {self.directory}; available steps: "
                    f"{available or 'none'}.")
        else:
            raise ValueError(f"which must be 'latest', 'best' or an int step, got {which!r}.")
        if step is None:
            if self.corrupt:
                raise CheckpointCorruptError(self._allcorrupt_message())
            try:
                theirs = other_naming(self.directory, timeout=self.timeout)
            except OSError:  # the directory went away: nothing to name
                theirs = []
            raise CheckpointNotFoundError(
                other_naming_message(self.directory, theirs) if theirs else
                f"no checkpoints in {self.directory}: nothing has been saved there yet.")
        return step

    def _no_monitor(self) -> str:
        """Why there is no best without a monitored metric, and which to name."""
        names = set()
        for step in self.steps():
            try:
                names.update(self.read_meta(step).get("metrics") or {})
            except FileNotFoundError:
                continue
        if not names:
            return "the policy monitors no metric, and no checkpoint stores metrics"
        example = sorted(names)[0]
        return (f"the policy monitors no metric. The checkpoints "
                f"store {sorted(names)}: open it with policy=jaxckpt.CheckpointPolicy("
                f"monitor={example!r}), or on the command line pass --monitor {example} "
                "[--mode min|max]")

    def resolve_verified(self, which: Which, *, checksums: bool = True,
                         stacklevel: int = 4) -> int:
        """Like :meth:`resolve`, checking checksums (or only sizes: a restore that reads a
        part of the state must not read every byte to check them); "latest"/"best" fall
        back to the next checkpoint that verifies (with a warning naming what they
        skipped)."""
        skipped: dict[int, Verdict] = {}
        while True:
            step = self.resolve(which)
            verdict = self.examine(step, checksums=checksums)
            if verdict is None:  # deleted by a live writer meanwhile, which committed what
                self.scan()  # replaced it first: list again, not only what is left
                if _is_step(which):
                    raise CheckpointNotFoundError(
                        f"checkpoint {step} in {self.directory} was deleted while it was "
                        f"being read (by the run writing there); available: {self.steps()}.")
                continue
            if verdict.ok:
                break
            if _is_step(which):
                raise CheckpointCorruptError(self.corrupt_message(verdict))
            skipped[step] = verdict
        # Name every damaged checkpoint the answer would otherwise have been (a step asked
        # for by number skipped nothing).
        if not _is_step(which):
            skipped.update({s: v for s, v in self.corrupt.items()
                            if which == "best" or s > step})
        if skipped:
            lines = "; ".join(f"step {s}: {_summary(v.problems)}" for s, v in skipped.items())
            warnings.warn(f"restore({which!r}) skipped corrupt checkpoint(s) {sorted(skipped)} "
                          f"in {self.directory} ({lines}); restoring step {step}, the "
                          f"{which} checkpoint that verifies. The corrupt ones are kept for "
                          "inspection.", stacklevel=stacklevel)
        if not verdict.has_manifest and verdict.writer == "jaxckpt":
            warnings.warn(f"checkpoint {step} in {self.directory} has no manifest (its writer "
                          "stopped between Orbax's commit and the manifest, or it predates "
                          "manifests): restoring it unverified.", stacklevel=stacklevel)
        return step

    def unverified_message(self, steps: list[int]) -> str:
        """Why ``steps`` (usable, without a manifest) are unverified, by who wrote them."""
        orbax = [s for s in steps if s in self.verdicts and self.verdicts[s].writer != "jaxckpt"]
        mine = [s for s in steps if s not in orbax]
        parts = []
        if mine:
            parts.append(f"checkpoint(s) {mine} in {self.directory} have no manifest: "
                         "unverified but usable (their writer stopped between Orbax's commit "
                         "and the manifest, or they predate manifests)")
        if orbax:
            parts.append(f"checkpoint(s) {orbax} in {self.directory} were written by plain "
                         "Orbax, no manifest: complete (Orbax committed them) but their bytes "
                         "cannot be checked")
        return "; ".join(parts) + "."

    def corrupt_message(self, verdict: Verdict) -> str:
        usable = self.steps()
        return (f"checkpoint {verdict.step} in {self.directory} is corrupt: "
                + "; ".join(verdict.problems) + ". It was not modified. Restore another step"
                + (f" ({usable})" if usable else "") + ", or 'latest'/'best', which skip "
                "corrupt checkpoints.")

    def _allcorrupt_message(self) -> str:
        lines = "\n".join(f"  step {s}: {'; '.join(v.problems)}"
                          for s, v in sorted(self.corrupt.items()))
        return (f"no checkpoint in {self.directory} verifies:\n{lines}\nNone was modified. "
                "Restore from a copy of the directory, or start the run afresh.")


# -- who wrote a directory -------------------------------------------------------------------


def _same_objective(stored: Any, policy: CheckpointPolicy) -> bool:
    """Whether a checkpoint's recorded ``improved`` flag was judged as ``policy`` judges:
    the same metric, direction, ``min_delta`` and threshold. Under another (a run reopened
    with ``mode="max"`` after a mistaken ``"min"``) the flag would rank the worst value
    best, and a writer would delete the real best: the values are ranked afresh."""
    if not isinstance(stored, dict) or policy.monitor is None \
            or stored.get("monitor") != policy.monitor:
        return False
    try:
        mode = resolve_mode(policy.monitor, stored.get("mode", "auto"))
    except ValueError:
        return False
    return (mode == policy.resolved_mode
            and stored.get("min_delta", 0.0) == policy.min_delta
            and stored.get("initial_value_threshold") == policy.initial_value_threshold)


def writers(directory: epath.Path, names: list[str]) -> dict[int, integrity.Writer]:
    """The writer of each step directory among ``names`` (a listing of ``directory``),
    from its file names (and, for a step without a manifest, its meta record)."""
    return {step: _writer_of(directory / name)
            for name in names if (step := fmt.step_of(name)) is not None}


def _writer_of(step_dir: epath.Path) -> integrity.Writer:
    try:
        return integrity.writer_of(step_dir)
    except (NotADirectoryError, FileNotFoundError):
        return "unknown"  # a file or a dangling link named like a step: nobody's checkpoint


def _refuse_directories_named_like_own_files(directory: epath.Path, names) -> None:
    """A directory where a writer keeps its lock or history file (a person's mkdir, a sync
    tool): the lock would fail the open, the history every save in the background; say
    so before anything."""
    if storage.is_remote(directory):
        return  # a store has no directories, only names
    for name, what in ((fmt.LOCK_FILE, "lock"), (fmt.HISTORY_FILE, "history")):
        path = os.path.join(directory, name)
        if name in names and os.path.isdir(path) and not os.path.islink(path):
            raise CheckpointDirectoryError(
                f"{path} is a directory, where jaxckpt keeps its {what} file; jaxckpt never "
                "removes what it did not write: move it away or delete it, then open the "
                "directory again (read_only=True reads it as it is). Nothing was changed.")


def check_writable(directory: epath.Path, *, adopt: bool, policy_given: bool,
                   timeout: float | None = storage.DEFAULT_TIMEOUT_S) -> None:
    """Refuse to write into a directory that holds checkpoints plain Orbax wrote, unless
    the user adopts them. Called before anything is written there (the lock, a probe
    file, Orbax's clean-up), so that a refused open leaves the directory as it was.

    Raises:
      CheckpointDirectoryError: Orbax checkpoints without ``adopt``, alone or mixed with
        jaxckpt's; or ``adopt`` without a policy where no jaxckpt checkpoint holds one.
    """
    try:
        names = storage.list_names(directory, timeout=timeout)
    except NotADirectoryError:
        return  # a file: storage.check_directory names the problem
    _refuse_directories_named_like_own_files(directory, names)
    by_writer = writers(directory, names)
    foreign = sorted(s for s, w in by_writer.items() if w == "orbax")
    if not foreign:
        _refuse_other_naming(directory, names, timeout)
        return
    mine = sorted(s for s, w in by_writer.items() if w == "jaxckpt")
    if adopt:
        if not policy_given and not mine:
            raise CheckpointDirectoryError(
                f"adopt=True on {directory}, which holds Orbax checkpoints {foreign}, needs "
                "policy=jaxckpt.CheckpointPolicy(...): the default policy keeps the latest "
                f"checkpoint only and would delete {len(foreign)} of them at the first save. "
                "Nothing was changed.")
        return
    if mine:
        raise CheckpointDirectoryError(
            f"{directory} mixes checkpoints written by jaxckpt ({mine}) and by plain Orbax "
            f"({foreign}); jaxckpt never deletes, moves or rewrites checkpoints it did not "
            "write. Move the Orbax checkpoints to a directory of their own; or pass "
            "adopt=True to manage all of them by this manager's policy (it may delete "
            "them); or open it with read_only=True to read both. Nothing was changed.")
    raise CheckpointDirectoryError(
        f"{directory} holds checkpoints {foreign} written by plain Orbax; jaxckpt never "
        "deletes, moves or rewrites checkpoints it did not write. Open it with "
        "read_only=True to list, verify and restore them; pass adopt=True with a "
        "policy=... to let this manager keep or delete them by that policy; or save into "
        "a new directory. Nothing was changed.")


_OTHER_NAMING = re.compile(r"(?:.+_)?\d+")
"""Step directories of a plain Orbax manager with ``step_prefix`` (``ckpt_50``) or
``step_format_fixed_length`` (``00000050``): names jaxckpt does not read as steps."""


def _refuse_other_naming(directory: epath.Path, names: list[str],
                         timeout: float | None) -> None:
    """Refuse a directory holding Orbax checkpoints under another step naming: jaxckpt
    would not see them, and its own steps would be written beside them."""
    theirs = other_naming(directory, names, timeout)
    if theirs:
        raise CheckpointDirectoryError(
            f"{directory} holds Orbax checkpoints named {_shown(theirs)}: a step naming "
            "jaxckpt does not read (Orbax's step_prefix or step_format_fixed_length), so it "
            "would write its own steps beside them. Save into a new directory, or move them "
            "to one of their own and restore them with Orbax. Nothing was changed.")


def other_naming(directory: epath.Path, names: list[str] | None = None,
                 timeout: float | None = storage.DEFAULT_TIMEOUT_S) -> list[str]:
    """The Orbax checkpoints in ``directory`` (listed now when ``names`` is None) whose
    names are not steps jaxckpt reads (``ckpt_50``, ``00000050``)."""
    if names is None:
        names = storage.list_names(directory, timeout=timeout)
    names = [n for n in names if fmt.step_of(n) is None and _OTHER_NAMING.fullmatch(n)]
    return sorted(n for n in names if storage.call(
        (directory / n / fmt.ORBAX_METADATA).exists, what="looking up", path=directory / n,
        timeout=timeout))


def other_naming_message(directory: epath.Path, theirs: list[str]) -> str:
    """Why a directory whose checkpoints are all under another naming shows none."""
    return (f"{directory} holds no checkpoint under jaxckpt's step naming, but Orbax "
            f"checkpoints named {_shown(theirs)} (Orbax's step_prefix or "
            "step_format_fixed_length): jaxckpt does not read them. Restore them with "
            "orbax.checkpoint.CheckpointManager(..., options=CheckpointManagerOptions("
            "step_prefix=...)).")


def _shown(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _is_step(which: Any) -> bool:
    import numpy as np
    return isinstance(which, (int, np.integer)) and not isinstance(which, bool)


def _summary(problems: tuple[str, ...] | list[str]) -> str:
    more = f"; and {len(problems) - 2} more" if len(problems) > 2 else ""
    return "; ".join(problems[:2]) + more
