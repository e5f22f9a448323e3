"""The checkpoints of a directory as the library sees them: usable, set aside, foreign.

One definition of "latest" and "best" for properties, ``restore``, the CLI and the docs:
the newest (best) checkpoint that is complete and not known to be damaged. Sizes are
checked when the directory is opened; checksums when a checkpoint is restored or
verified. A checkpoint found damaged is *set aside*: never restored, never best, never
deleted, and ``latest``/``best`` move to the next one. A step that disappears while it
is read (a live writer deleted it) is forgotten, not reported as damaged.

Owned by the calling thread: the background thread never reads or changes a catalog.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from typing import Any, Callable, Literal

from etils import epath

from jaxckpt import format as fmt
from jaxckpt import integrity, storage
from jaxckpt.errors import CheckpointCorruptError, CheckpointNotFoundError
from jaxckpt.integrity import Verdict
from jaxckpt.policy import CheckpointPolicy, Record

__all__ = ["Catalog", "Which"]

log = logging.getLogger("jaxckpt")

Which = Literal["latest", "best"] | int


@dataclasses.dataclass
class Catalog:
    directory: epath.Path
    policy: CheckpointPolicy
    timeout: float | None = storage.DEFAULT_TIMEOUT_S
    records: dict[int, Record] = dataclasses.field(default_factory=dict)
    verdicts: dict[int, Verdict] = dataclasses.field(default_factory=dict)
    corrupt: dict[int, Verdict] = dataclasses.field(default_factory=dict)
    incomplete: dict[int, Verdict] = dataclasses.field(default_factory=dict)

    # -- scanning ----------------------------------------------------------------------

    def scan(self, *, warn: Callable[[str], None] | None = None) -> None:
        """List the step directories now and classify each by a cheap check (sizes)."""
        self.records.clear()
        self.verdicts.clear()
        self.corrupt.clear()
        self.incomplete.clear()
        for name in storage.list_names(self.directory, timeout=self.timeout):
            step = fmt.step_of(name)
            if step is not None:
                self.examine(step, checksums=False, warn=warn)

    def examine(self, step: int, *, checksums: bool,
                warn: Callable[[str], None] | None = None) -> Verdict | None:
        """Check one step and file it; None when it no longer exists."""
        try:
            verdict = integrity.check(self.directory / str(step), step, checksums=checksums)
            record = self._record(step, verdict) if verdict.ok else None
        except FileNotFoundError:
            self.forget(step)
            return None
        self.verdicts.pop(step, None)
        self.corrupt.pop(step, None)
        self.incomplete.pop(step, None)
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
        for table in (self.records, self.verdicts, self.corrupt, self.incomplete):
            table.pop(step, None)

    def add(self, step: int, record: Record) -> None:
        """A checkpoint this process just wrote (committed in the background)."""
        self.records[step] = record
        self.verdicts[step] = Verdict(step)

    def set_aside(self, verdict: Verdict, *, warn: Callable[[str], None] | None = None) -> None:
        """Take a damaged checkpoint out of every decision: never best, latest, deleted."""
        self.records.pop(verdict.step, None)
        self.verdicts.pop(verdict.step, None)
        self.corrupt[verdict.step] = verdict
        log.warning("checkpoint %d in %s is corrupt: %s", verdict.step, self.directory,
                    verdict.describe())
        if warn is not None:
            warn(f"checkpoint {verdict.step} in {self.directory} is corrupt "
                 f"({_summary(verdict.problems)})")

    # -- reading one step's records -------------------------------------------------------

    def read_meta(self, step: int) -> dict:
        """A step's meta record ({} for one written by plain Orbax); raises FileNotFoundError
        when the step is gone."""
        path = self.directory / str(step) / fmt.META / "metadata"
        try:
            meta = json.loads(storage.read_text(path, timeout=self.timeout))
        except FileNotFoundError:
            if not (self.directory / str(step)).exists():
                raise
            return self._orbax_meta(step)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return {}
        return meta if not fmt.validate_meta(meta, step) else {}

    def _orbax_meta(self, step: int) -> dict:
        """What plain Orbax stored: its metrics item, or the metrics in its metadata."""
        for rel, pick in (("metrics/metrics", lambda d: d),
                          (fmt.ORBAX_METADATA, lambda d: d.get("metrics"))):
            try:
                metrics = pick(json.loads((self.directory / str(step) / rel).read_text()))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                continue
            if isinstance(metrics, dict) and metrics and not fmt.validate_meta(
                    {"format": fmt.META_FORMAT, "step": step, "metrics": metrics}):
                return {"step": step, "metrics": metrics}
        return {}

    def _record(self, step: int, verdict: Verdict) -> Record:
        meta = self.read_meta(step)
        metrics = meta.get("metrics")
        same_objective = (meta.get("policy") or {}).get("monitor") == self.policy.monitor
        return Record(step, self.policy.stored_value(metrics), time=meta.get("time"),
                      has_metrics=metrics is not None,
                      improved=meta.get("improved") if same_objective else None)

    # -- latest and best -------------------------------------------------------------------

    def steps(self) -> list[int]:
        return sorted(self.records)

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
                        "the policy monitors no metric" if not self.policy.monitor else
                        f"no kept checkpoint has a finite {self.policy.monitor!r}") +
                    f". Restore 'latest' or one of the steps {available}.")
        elif _is_step(which):
            step = int(which)
            if step in self.corrupt:
                raise CheckpointCorruptError(self._corrupt_message(self.corrupt[step]))
            if step not in self.records:
                raise CheckpointNotFoundError(
                    f"no checkpoint for step {step} in {self.directory}; available steps: "
                    f"{available or 'none'}.")
        else:
            raise ValueError(f"which must be 'latest', 'best' or an int step, got {which!r}.")
        if step is None:
            if self.corrupt:
                raise CheckpointCorruptError(self._all_corrupt_message())
            raise CheckpointNotFoundError(
                f"no checkpoints in {self.directory}: nothing has been saved there yet.")
        return step

    def resolve_verified(self, which: Which, *, stacklevel: int = 4) -> int:
        """Like :meth:`resolve`, checking checksums; "latest"/"best" fall back to the next
        checkpoint that verifies (with a warning naming what they skipped)."""
        skipped: dict[int, Verdict] = {}
        while True:
            step = self.resolve(which)
            verdict = self.examine(step, checksums=True)
            if verdict is None:  # deleted by a live writer meanwhile: resolve again
                if _is_step(which):
                    raise CheckpointNotFoundError(
                        f"checkpoint {step} in {self.directory} was deleted while it was "
                        f"being read (by the run writing there); available: {self.steps()}.")
                continue
            if verdict.ok:
                break
            if _is_step(which):
                raise CheckpointCorruptError(self._corrupt_message(verdict))
            skipped[step] = verdict
        # Name every damaged checkpoint the answer would otherwise have been.
        skipped.update({s: v for s, v in self.corrupt.items() if which == "best" or s > step})
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

    def _corrupt_message(self, verdict: Verdict) -> str:
        usable = self.steps()
        return (f"checkpoint {verdict.step} in {self.directory} is corrupt: "
                + "; ".join(verdict.problems) + ". It was not modified. Restore another step"
                + (f" ({usable})" if usable else "") + ", or 'latest'/'best', which skip "
                "corrupt checkpoints.")

    def _all_corrupt_message(self) -> str:
        lines = "\n".join(f"  step {s}: {'; '.join(v.problems)}"
                          for s, v in sorted(self.corrupt.items()))
        return (f"no checkpoint in {self.directory} verifies:\n{lines}\nNone was modified. "
                "Restore from a copy of the directory, or start the run afresh.")


def _is_step(which: Any) -> bool:
    import numpy as np
    return isinstance(which, (int, np.integer)) and not isinstance(which, bool)


def _summary(problems: tuple[str, ...] | list[str]) -> str:
    more = f"; and {len(problems) - 2} more" if len(problems) > 2 else ""
    return "; ".join(problems[:2]) + more
