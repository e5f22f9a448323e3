"""What a committed checkpoint must look like: its manifest and its JSON metadata.

After Orbax commits a checkpoint, the manager's background worker lists every file of the
step directory with its size and CRC-32C and stores the list beside them::

    DIR/<step>/jaxckpt_manifest.json
        {"format": "jaxckpt-manifest/1", "step": 50, "algorithm": "crc32c",
         "files": {"state/manifest.ocdbt": {"size": 114, "crc32c": 2271104343}, ...}}

:func:`check` compares a step directory with its manifest: sizes always (a ``stat`` per
file), checksums when asked (every byte is read). CRC-32C (google-crc32c, SSE4.2/ARMv8
instructions, ~3 GB/s on one core here) is the default; manifests with zlib's CRC-32
(~1.8 GB/s; older jaxckpt, or hosts where google-crc32c has no C extension) are read and
checked as well. A CRC guards against truncation, flipped bits and lost files, not against an
attacker, who could rewrite the manifest too; what keeps a crafted checkpoint from running
code is that nothing in it is loaded with pickle and every JSON file is schema-checked here.

A step without a manifest (the writer was killed between Orbax's commit and the manifest,
or the checkpoint predates manifests) is *unverified*, not corrupt: it is usable, and the
manager warns when it restores one.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import os
import posixpath
import uuid
import zlib
from typing import Any, Callable

from etils import epath

__all__ = ["MANIFEST_FILE", "MANIFEST_FORMAT", "build_manifest", "write_manifest",
           "read_manifest", "check", "safe_relative_path", "validate_meta",
           "validate_data_state", "UNVERIFIED"]

MANIFEST_FILE = "jaxckpt_manifest.json"
MANIFEST_FORMAT = "jaxckpt-manifest/1"
META_FORMAT = "jaxckpt/1"
_CHUNK = 8 << 20
log = logging.getLogger("jaxckpt")
UNVERIFIED = "no manifest: unverified"
"""The problem :func:`check` reports (only with ``strict``) for a step without a manifest."""


def _is_local(path: epath.Path) -> bool:
    return "://" not in str(path)


def forget_cached_listings(path: epath.Path) -> None:
    """Forget this process's cached object listings at, above and below ``path``.

    etils epath reads ``gs://`` through gcsfs, which caches every directory listing it
    makes and answers ``exists``/``stat``/``iterdir`` from it, and sizes file reads by it.
    Another process's writes (or Orbax's, through tensorstore) do not update that cache,
    so a manager reopened in a long-lived process would miss new steps and read a
    rewritten ``jaxckpt.json`` cut to its old size. A no-op for local paths.
    """
    if _is_local(path):
        return
    try:
        from etils.epath import backend
        fs = backend.fsspec_backend.fs(str(path))
        cache = fs.dircache
        key = fs._strip_protocol(str(path)).rstrip("/")
    except Exception:  # noqa: BLE001 - another fsspec backend, or no listing cache
        return
    fs.invalidate_cache(str(path))  # the path and its parents
    for cached in list(cache):
        if cached.startswith(key + "/"):
            try:
                del cache[cached]
            except KeyError:  # another thread forgot it first
                pass


def _files(step_dir: epath.Path) -> dict[str, int]:
    """Relative POSIX path -> size of every file under ``step_dir`` except the manifest
    and temporary files (a manifest half-written by a killed writer)."""
    out = {}
    root = str(step_dir)
    if _is_local(step_dir):
        for dirpath, _, names in os.walk(root):
            for name in names:
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, root).replace(os.sep, "/")
                if not _ignored(rel):
                    out[rel] = os.stat(full).st_size
        return out
    forget_cached_listings(step_dir)  # what is there now, not what this process listed
    for rel, size in walk_files(step_dir):
        if not _ignored(rel):
            out[rel] = size
    return out


def walk_files(root: epath.Path, _prefix: str = ""):
    """``(relative POSIX path, size)`` of every file under ``root``, local or ``gs://``.

    Not ``epath.Path.walk``: on ``gs://`` it yields directories without their ``gs://``
    prefix, which then name local paths. On an object store, ``iterdir`` is one listing
    per directory and ``is_dir``/``stat`` are answered from that listing.
    """
    for child in root.iterdir():
        rel = _prefix + child.name
        if child.is_dir():
            yield from walk_files(child, rel + "/")
        else:
            yield rel, child.stat().length


def _ignored(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return rel == MANIFEST_FILE or (name.startswith(".") and name.endswith(".tmp"))


_EXTEND: dict[str, Callable[[int, bytes], int]] = {
    "crc32": lambda value, chunk: zlib.crc32(chunk, value)}
# New manifests use CRC-32C where google-crc32c (a core dependency) has its C extension;
# its pure-Python fallback (MB/s) checks manifests, never writes them.
try:
    import google_crc32c
    _EXTEND["crc32c"] = google_crc32c.extend
    DEFAULT_ALGORITHM = "crc32c" if google_crc32c.implementation == "c" else "crc32"
except ImportError:
    DEFAULT_ALGORITHM = "crc32"


def checksum_of(path: epath.Path, algorithm: str = DEFAULT_ALGORITHM) -> int:
    """The ``algorithm`` checksum of the file at ``path``, read in 8 MiB chunks."""
    try:
        extend = _EXTEND[algorithm]
    except KeyError:
        raise ValueError(f"unknown checksum {algorithm!r}; this jaxckpt computes "
                         f"{sorted(_EXTEND)} (crc32c needs google-crc32c).") from None
    value = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            value = extend(value, chunk)
    return value


def build_manifest(step_dir: epath.Path, step: int,
                   algorithm: str = DEFAULT_ALGORITHM) -> dict:
    """The manifest of a committed step directory (reads every file once)."""
    files = {rel: {"size": size, algorithm: checksum_of(step_dir / rel, algorithm)}
             for rel, size in sorted(_files(step_dir).items())}
    return {"format": MANIFEST_FORMAT, "step": step, "algorithm": algorithm, "files": files}


def write_manifest(step_dir: epath.Path, manifest: dict) -> None:
    """Write ``manifest`` atomically: a reader sees the whole file or none."""
    path = step_dir / MANIFEST_FILE
    if not _is_local(step_dir):  # an object appears whole or not at all; no rename there
        path.write_text(json.dumps(manifest))
        return
    tmp = step_dir / f".{MANIFEST_FILE}.{uuid.uuid4().hex}.tmp"
    tmp.write_text(json.dumps(manifest))
    tmp.replace(path)


def safe_relative_path(rel: Any) -> str | None:
    """Why ``rel`` may not name a file inside a checkpoint, or None when it may.

    Only plain relative POSIX paths below the step directory pass: no absolute paths,
    no ``..``, no backslashes or drive letters, no empty or ``.`` components.
    """
    if not isinstance(rel, str) or not rel:
        return "not a non-empty string"
    if "\\" in rel or "\x00" in rel or (len(rel) > 1 and rel[1] == ":"):
        return "not a plain POSIX path"
    if rel.startswith("/") or posixpath.isabs(rel):
        return "an absolute path"
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "a path with '..', '.' or empty components"
    return None


def read_manifest(step_dir: epath.Path, step: int) -> tuple[dict | None, list[str]]:
    """``(manifest, problems)``; ``(None, [])`` when the step has no manifest."""
    path = step_dir / MANIFEST_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, []
    except (OSError, UnicodeDecodeError) as e:
        return None, [f"{MANIFEST_FILE}: unreadable ({e})"]
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        return None, [f"{MANIFEST_FILE}: not JSON ({e})"]
    newer = _newer_writer(manifest)
    if newer:  # not corrupt: unverifiable here, and never set aside for it
        log.warning("%s: %s; this jaxckpt cannot check it, so the checkpoint counts as "
                    "unverified. Upgrade jaxckpt to verify it.", path, newer)
        return None, []
    problems = [f"{MANIFEST_FILE}: {p}" for p in _manifest_schema(manifest, step)]
    return (None if problems else manifest), problems


def _newer_writer(m: Any) -> str | None:
    """Why a well-formed manifest comes from a newer jaxckpt (another format version or
    checksum), or None. Such a checkpoint must stay usable, not be moved aside."""
    if not isinstance(m, dict):
        return None
    fmt, algorithm = m.get("format"), m.get("algorithm")
    if isinstance(fmt, str) and fmt != MANIFEST_FORMAT and \
            fmt.startswith(MANIFEST_FORMAT.split("/")[0] + "/"):
        return f"manifest format {fmt!r} (this jaxckpt reads {MANIFEST_FORMAT!r})"
    if fmt == MANIFEST_FORMAT and isinstance(algorithm, str) and algorithm.isidentifier() \
            and algorithm not in _EXTEND:
        return f"checksum {algorithm!r} (this jaxckpt computes {sorted(_EXTEND)})"
    return None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _manifest_schema(m: Any, step: int) -> list[str]:
    if not isinstance(m, dict):
        return ["not a JSON object"]
    if m.get("format") != MANIFEST_FORMAT:
        return [f"format is {m.get('format')!r}, expected {MANIFEST_FORMAT!r}"]
    problems = []
    if m.get("step") != step or not _is_int(m.get("step")):
        problems.append(f"step is {m.get('step')!r}, expected {step}")
    algorithm = m.get("algorithm")
    if not isinstance(algorithm, str) or algorithm not in _EXTEND:
        return problems + [f"unknown checksum algorithm {algorithm!r}"]
    files = m.get("files")
    if not isinstance(files, dict) or not files:
        return problems + ["'files' must be a non-empty object"]
    for rel, entry in files.items():
        why = safe_relative_path(rel)
        if why:
            problems.append(f"file path {rel!r} is {why}: it would lead outside the "
                            "checkpoint directory")
        elif not (isinstance(entry, dict) and _is_int(entry.get("size")) and entry["size"] >= 0
                  and _is_int(entry.get(algorithm)) and 0 <= entry[algorithm] < 2 ** 32):
            problems.append(f"malformed entry for {rel!r}: {entry!r}")
    return problems


def _inside(step_dir: epath.Path, rel: str) -> bool:
    """Whether ``step_dir/rel`` really lies inside ``step_dir`` (symlinks resolved)."""
    if not _is_local(step_dir):
        return True  # object stores have no symlinks; the path itself was checked
    root = os.path.realpath(str(step_dir))
    return os.path.realpath(os.path.join(root, rel)).startswith(root + os.sep)


def check(step_dir: epath.Path, step: int, *, checksums: bool,
          strict: bool = False) -> list[str]:
    """Problems of checkpoint ``step`` in ``step_dir`` (empty: it verifies).

    Args:
      step_dir: the step's directory.
      step: its step number (must match the manifest and meta).
      checksums: also read every file and compare its checksum (else sizes only).
      strict: report a missing manifest as a problem (:data:`UNVERIFIED`).

    Returns:
      One line per problem, each starting with the path of the file it concerns,
      relative to the step directory.
    """
    manifest, problems = read_manifest(step_dir, step)
    if problems:
        return problems
    problems += _json_problems(step_dir, step, manifest)
    if manifest is None:
        return problems + ([UNVERIFIED] if strict else [])
    try:
        on_disk = _files(step_dir)
    except OSError as e:
        return problems + [f".: cannot list the checkpoint directory ({e})"]
    for rel, entry in manifest["files"].items():
        if not _inside(step_dir, rel):
            problems.append(f"{rel}: leads outside the checkpoint directory (a symlink)")
        elif rel not in on_disk:
            problems.append(f"{rel}: missing")
        elif on_disk[rel] != entry["size"]:
            problems.append(f"{rel}: size {on_disk[rel]} bytes, manifest says {entry['size']}")
        elif checksums:
            algorithm = manifest["algorithm"]
            try:
                crc = checksum_of(step_dir / rel, algorithm)
            except OSError as e:
                problems.append(f"{rel}: unreadable ({e})")
                continue
            if crc != entry[algorithm]:
                problems.append(f"{rel}: checksum mismatch ({algorithm} {crc:#010x}, manifest "
                                f"says {entry[algorithm]:#010x})")
    return problems


# -- the JSON files jaxckpt writes into each step ------------------------------------------


def _json_problems(step_dir: epath.Path, step: int, manifest: dict | None) -> list[str]:
    """Schema problems of ``meta/metadata`` and ``data_state/metadata``.

    A missing file is a problem only when the manifest lists it (a checkpoint written
    by plain Orbax has neither).
    """
    problems = []
    for rel, validate in (("meta/metadata", lambda d: validate_meta(d, step)),
                          ("data_state/metadata", validate_data_state)):
        path = step_dir / rel
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            if manifest is not None and rel in manifest["files"]:
                problems.append(f"{rel}: missing")
            continue
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            problems.append(f"{rel}: not readable JSON ({e})")
            continue
        problems += [f"{rel}: {p}" for p in validate(data)]
    return problems


def validate_meta(meta: Any, step: int | None = None) -> list[str]:
    """Schema problems of a step's ``meta`` record (empty: valid). Unknown keys are
    allowed, so that a newer jaxckpt's checkpoints stay readable."""
    if not isinstance(meta, dict):
        return ["not a JSON object"]
    problems = []
    if meta.get("format") != META_FORMAT:
        problems.append(f"format is {meta.get('format')!r}, expected {META_FORMAT!r}")
    if not _is_int(meta.get("step")) or (step is not None and meta["step"] != step):
        problems.append(f"step is {meta.get('step')!r}, expected {step}")
    if meta.get("epoch") is not None and not _is_int(meta["epoch"]):
        problems.append(f"epoch must be an int or null, got {meta['epoch']!r}")
    metrics = meta.get("metrics")
    if metrics is not None:
        if not isinstance(metrics, dict):
            problems.append(f"metrics must be an object or null, got {type(metrics).__name__}")
        else:
            bad = sorted(k for k, v in metrics.items()
                         if isinstance(v, bool) or not isinstance(v, (int, float)))
            if bad:
                problems.append(f"metrics {bad} are not numbers")
    t = meta.get("time")
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float))
                          or not math.isfinite(t)):
        problems.append(f"time must be a number, got {t!r}")
    if meta.get("reason") is not None and not isinstance(meta["reason"], str):
        problems.append(f"reason must be a string or null, got {meta['reason']!r}")
    return problems


def validate_data_state(stored: Any) -> list[str]:
    """Schema problems of a stored data state: ``{"value": <JSON>}`` or base64 bytes."""
    if not isinstance(stored, dict) or len(stored) != 1:
        return ["must be an object with one key, 'value' or '__bytes_b64__'"]
    if "value" in stored:
        return []
    encoded = stored.get("__bytes_b64__")
    if not isinstance(encoded, str):
        return ["must be an object with one key, 'value' or '__bytes_b64__'"]
    try:
        base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as e:
        return [f"'__bytes_b64__' is not base64 ({e})"]
    return []
