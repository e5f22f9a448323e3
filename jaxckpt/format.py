"""The on-disk layout: every name jaxckpt gives a file, and every record's encoder beside
its validator, so that what is written and what is accepted cannot drift apart.

A checkpoint directory::

    DIR/jaxckpt.json                 the metric ledger and the policy (see :mod:`ledger`)
    DIR/jaxckpt.lock                 the writing run's owner and heartbeat (:mod:`lock`)
    DIR/<step>/                      one committed checkpoint (Orbax's atomic finalize)
        _CHECKPOINT_METADATA         Orbax's record of the step (its metrics too)
        state/                       the state pytree (Orbax PyTree, no zstd)
        meta/metadata                JSON: step, epoch, metrics, time, reason, policy,
                                     the ledger since the previous checkpoint
        data_state/metadata          JSON: the data iterator's state, when given
        metrics/metrics              JSON: the metrics, where plain Orbax's best_fn reads them
        jaxckpt_manifest.json        sizes and checksums (:mod:`integrity`)
    DIR/<step>.orbax-checkpoint-tmp-*  a checkpoint being written (Orbax's; ignored)
    DIR/.jaxckpt-deleting-<step>-*   a checkpoint being deleted (renamed, then removed)
    DIR/jaxckpt-corrupt/<step>-*     checkpoints that failed verification, kept for a human

Everything is JSON or tensorstore arrays: nothing loaded from a checkpoint can run code.
Validators return a list of problems (empty: valid) and allow unknown keys, so that a
newer jaxckpt's records stay readable.
"""

from __future__ import annotations

import base64
import binascii
import math
import uuid

import numpy as np
from typing import Any, Mapping

__all__ = ["HISTORY_FILE", "LOCK_FILE", "CORRUPT_DIR", "MANIFEST_FILE", "STATE", "META",
           "DATA_STATE", "METRICS", "META_FORMAT", "HISTORY_FORMAT", "step_of",
           "is_deleting", "deleting_name", "temp_name", "is_temp", "encode_meta",
           "validate_meta", "encode_data_state", "decode_data_state", "validate_data_state",
           "validate_history", "COMMIT_FILES"]

HISTORY_FILE = "jaxckpt.json"
LOCK_FILE = "jaxckpt.lock"
CORRUPT_DIR = "jaxckpt-corrupt"
MANIFEST_FILE = "jaxckpt_manifest.json"
ORBAX_METADATA = "_CHECKPOINT_METADATA"
COMMIT_MARKER = "commit_success.txt"  # Orbax's, on object stores
STATE, META, DATA_STATE, METRICS = "state", "meta", "data_state", "metrics"
META_FORMAT = "jaxckpt/1"
HISTORY_FORMAT = "jaxckpt/1"
_BYTES_KEY = "__bytes_b64__"
_DELETING = ".jaxckpt-deleting-"

FINGERPRINT_BITS = {"xxh3_64": 64, "crc32c": 32, "wsum32": 32}
"""Each array fingerprint a manifest may hold, by its width (jaxckpt.fingerprint)."""

COMMIT_FILES = (ORBAX_METADATA, f"{META}/metadata")
"""Files every committed jaxckpt checkpoint has; a step lacking one is incomplete."""


# -- names -----------------------------------------------------------------------------


def step_of(name: str) -> int | None:
    """The step a directory entry names (``"50"`` -> 50), or None for anything else."""
    return int(name) if name.isdigit() and (name == "0" or not name.startswith("0")) else None


def deleting_name(step: int) -> str:
    """Where a checkpoint goes while it is removed: a name every reader ignores."""
    return f"{_DELETING}{step}-{uuid.uuid4().hex[:8]}"


def is_deleting(name: str) -> bool:
    return name.startswith(_DELETING)


def temp_name(name: str) -> str:
    """The one temporary-file pattern: ``.<name>.<uuid>.tmp`` beside the final file."""
    return f".{name}.{uuid.uuid4().hex}.tmp"


def is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def is_orbax_temp(name: str) -> bool:
    """A step directory Orbax was writing when its writer died (``33.orbax-checkpoint-tmp``)."""
    head, sep, _ = name.partition(".orbax-checkpoint-tmp")
    return bool(sep) and head.isdigit()


def unfinished(name: str) -> tuple[str, int | None] | None:
    """``("save", step)`` for an Orbax temporary step directory, ``("deletion", step)``
    for a checkpoint being removed (:func:`deleting_name`), else None."""
    if is_orbax_temp(name):
        return "save", int(name.partition(".")[0])
    if is_deleting(name):
        head = name.removeprefix(_DELETING).partition("-")[0]
        return "deletion", int(head) if head.isdigit() else None
    return None


def is_leftover(name: str) -> bool:
    """A file of jaxckpt's own that a killed writer may leave in the directory: a
    temporary ledger or lock file, or a lock moved aside during a take-over."""
    return (is_temp(name) or name.endswith(".stale")) and name.startswith(
        (f".{HISTORY_FILE}.", f".{LOCK_FILE}.", ".jaxckpt-probe"))


# -- meta/metadata -----------------------------------------------------------------------


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def encode_meta(*, step: int, epoch: int | None, metrics: Mapping[str, float] | None,
                time: float, reason: str, policy: dict | None, improved: bool | None = None,
                ledger: list[dict] | None = None) -> dict:
    """A step's own record. ``policy`` and ``ledger`` (the entries since the previous
    checkpoint) are stored here as well as in ``jaxckpt.json``, so that losing that file
    loses neither the policy nor the history of kept checkpoints."""
    record = {"format": META_FORMAT, "step": step, "epoch": epoch,
              "metrics": dict(metrics) if metrics is not None else None, "time": time,
              "reason": reason, "improved": improved, "policy": policy, "ledger": ledger or []}
    # The ledger's entries were checked as save() arguments when they were recorded;
    # checking them again here cost ~20 µs per entry on every written checkpoint (up to
    # 0.3 s for a loop that calls save() thousands of times between history snapshots).
    problems = validate_meta({**record, "ledger": []}, step)
    if problems:  # a bug, not bad input: save() validates its arguments first
        raise ValueError(f"refusing to write an invalid meta record: {problems}")
    return record


def validate_meta(meta: Any, step: int | None = None) -> list[str]:
    """Schema problems of a step's ``meta`` record (empty: valid)."""
    if not isinstance(meta, dict):
        return ["not a JSON object"]
    problems = []
    if meta.get("format") != META_FORMAT:
        problems.append(f"format is {meta.get('format')!r}, expected {META_FORMAT!r}")
    if not _is_int(meta.get("step")) or (step is not None and meta["step"] != step):
        problems.append(f"step is {meta.get('step')!r}, expected {step}")
    if meta.get("epoch") is not None and not _is_int(meta["epoch"]):
        problems.append(f"epoch must be an int or null, got {meta['epoch']!r}")
    problems += _metrics_problems(meta.get("metrics"))
    t = meta.get("time")
    if t is not None and not (_is_number(t) and math.isfinite(t)):
        problems.append(f"time must be a number, got {t!r}")
    if meta.get("reason") is not None and not isinstance(meta["reason"], str):
        problems.append(f"reason must be a string or null, got {meta['reason']!r}")
    if meta.get("improved") is not None and not isinstance(meta["improved"], bool):
        problems.append(f"improved must be true, false or null, got {meta['improved']!r}")
    if meta.get("policy") is not None and not isinstance(meta["policy"], dict):
        problems.append("policy must be an object or null")
    ledger = meta.get("ledger")
    if ledger is not None:
        problems += [f"ledger: {p}" for p in validate_entries(ledger)]
    return problems


def _metrics_problems(metrics: Any) -> list[str]:
    if metrics is None:
        return []
    if not isinstance(metrics, dict):
        return [f"metrics must be an object or null, got {type(metrics).__name__}"]
    bad = sorted(str(k) for k, v in metrics.items() if not _is_number(v))
    return [f"metrics {bad} are not numbers"] if bad else []


# -- data_state/metadata ---------------------------------------------------------------------


def encode_data_state(data_state: Any) -> dict:
    """JSON for the data iterator's state: JSON-able values as is (numpy scalars, such as
    a position counted with numpy, as the Python numbers they hold), bytes as base64.

    Raises:
      TypeError: ``data_state`` is neither (names its type and what is accepted).
    """
    import json
    if isinstance(data_state, (bytes, bytearray)):
        return {_BYTES_KEY: base64.b64encode(bytes(data_state)).decode("ascii")}
    data_state = _python_numbers(data_state)
    try:
        json.dumps(data_state, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"data_state must be JSON-able or bytes (a grain iterator's "
                        f"get_state()), got {type(data_state).__name__}: {e}") from e
    return {"value": data_state}


def _python_numbers(x: Any) -> Any:
    if isinstance(x, dict):
        bad = [k for k in x if not isinstance(k, str)]
        if bad:  # JSON would turn 1 into "1": the state restored would differ
            raise TypeError(f"data_state must be JSON-able with text keys; key {bad[0]!r} "
                            f"is a {type(bad[0]).__name__}: use str keys.")
        return {k: _python_numbers(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_python_numbers(v) for v in x]
    return x.item() if isinstance(x, np.generic) else x


def decode_data_state(stored: dict) -> Any:
    if _BYTES_KEY in stored:
        return base64.b64decode(stored[_BYTES_KEY])
    return stored.get("value")


def validate_data_state(stored: Any) -> list[str]:
    """Schema problems of a stored data state: ``{"value": <JSON>}`` or base64 bytes."""
    if not isinstance(stored, dict) or len(stored) != 1:
        return ["must be an object with one key, 'value' or '__bytes_b64__'"]
    if "value" in stored:
        return []
    encoded = stored.get(_BYTES_KEY)
    if not isinstance(encoded, str):
        return ["must be an object with one key, 'value' or '__bytes_b64__'"]
    try:
        base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as e:
        return [f"'__bytes_b64__' is not base64 ({e})"]
    return []


# -- jaxckpt.json (the ledger) ---------------------------------------------------------------


def validate_entries(entries: Any) -> list[str]:
    """Problems of a list of ledger entries ``{"step", "metrics", "epoch", "time", "saved"}``."""
    if not isinstance(entries, list):
        return ["must be a list"]
    for e in entries:
        if not (isinstance(e, dict) and _is_int(e.get("step"))
                and not _metrics_problems(e.get("metrics"))
                and (e.get("epoch") is None or _is_int(e.get("epoch")))
                and (e.get("time") is None or _is_number(e.get("time")))):
            return [f"malformed entry {e!r}"[:200]]
    return []


def validate_history(data: Any) -> list[str]:
    """Schema problems of ``jaxckpt.json``."""
    if not isinstance(data, dict) or data.get("format") != HISTORY_FORMAT:
        return [f"not a {HISTORY_FORMAT} history file"]
    problems = [f"history: {p}" for p in validate_entries(data.get("history"))]
    if data.get("policy") is not None and not isinstance(data["policy"], dict):
        problems.append("'policy' must be an object")
    for key in ("last_save_time", "auto_every", "save_cost_s"):
        if data.get(key) is not None and not _is_number(data[key]):
            problems.append(f"{key!r} must be a number or null")
    return problems


# -- save() arguments ---------------------------------------------------------------------


def as_int(name: str, value: Any, *, optional: bool = False) -> int | None:
    """An int from ints and numpy ints; floats (numpy too), bools and strings refused."""
    if value is None and optional:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        if hasattr(value, "dtype") and np.shape(value) == () and \
                np.issubdtype(value.dtype, np.integer):  # a 0-d numpy or JAX integer array
            value = int(value)
        else:
            raise TypeError(f"{name} must be an int (numpy ints too), got {value!r} of type "
                            f"{type(value).__name__}." + (" Pass int(...) of it." if isinstance(
                                value, (float, np.floating)) and float(value).is_integer() else ""))
    value = int(value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}.")
    return value


def clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float] | None:
    if metrics is None:
        return None
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a mapping of name to scalar, got {type(metrics)}.")
    clean = {}
    for name, value in metrics.items():
        if isinstance(value, (bool, np.bool_)) or getattr(value, "dtype", None) == np.bool_:
            raise TypeError(f"metric {name!r} is a bool ({value!r}); metrics are numbers: "
                            "pass float(...) if 1.0/0.0 is meant.")
        try:
            if np.ndim(value) != 0 or isinstance(value, (str, bytes)):
                raise TypeError
            clean[str(name)] = float(np.asarray(value))
        except (TypeError, ValueError, OverflowError) as e:
            raise TypeError(f"metric {name!r} must be a scalar number within float64, got "
                            f"{value!r:.80}.") from e
    return clean


def as_bool(name: str, value: Any) -> bool:
    """``value`` as a bool; a TypeError for anything else (``force="no"`` is truthy)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r:.80}.")
