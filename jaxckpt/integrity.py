"""What a committed checkpoint must look like: its manifest and its JSON metadata.

After Orbax commits a checkpoint, the manager's background worker stores beside it the
size of every file, the CRC-32C of the small ones (metadata, indexes: up to
:data:`SMALL_FILE`), and the fingerprint of every array of the state, taken from the
arrays themselves when ``save`` was called (:mod:`jaxckpt.fingerprint`)::

    DIR/<step>/jaxckpt_manifest.json
        {"format": "jaxckpt-manifest/3", "step": 50, "algorithm": "crc32c",
         "files": {"state/manifest.ocdbt": {"size": 114, "crc32c": 2271104343},
                   "state/d/1f0c...": {"size": 33554432}, ...},
         "arrays": {"item": "state", "leaves": {"params/w": {"xxh3_64": 93112...}, ...},
                    "saved": {"params/w": {"shape": [4, 4], "dtype": "float32"}, ...}}}

So a save reads back kilobytes, not the state, and a restore reads each byte once: Orbax
reads the arrays, the manager compares them with their fingerprints (:class:`Verdict`
carries them) and check the target against each leaf's saved shape and dtype.
:func:`check` compares sizes always (one listing of the step) and small files' checksums
when asked. Version-1 manifests (a CRC of every file, older jaxckpt; zlib's
CRC-32 or CRC-32C) are still read and checked in full. A CRC guards against truncation,
flipped bits and lost files, not against an attacker, who could rewrite the manifest too;
what keeps a crafted checkpoint from running code is that nothing in it is loaded with
pickle and every JSON file is schema-checked.

A step without a manifest (the writer was killed between Orbax's commit and the manifest,
or plain Orbax wrote it) is *unverified*, not corrupt: it is usable, and the manager says
so when it restores one.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import logging
import os
import posixpath
import zlib
from typing import Any, Callable, Literal

from etils import epath

from jaxckpt import format as fmt
from jaxckpt import crc, ocdbt, storage

__all__ = ["Verdict", "MANIFEST_FILE", "MANIFEST_FORMAT", "build_manifest", "write_manifest",
           "read_manifest", "check", "safe_relative_path"]

MANIFEST_FILE = fmt.MANIFEST_FILE
MANIFEST_FORMAT = "jaxckpt-manifest/3"
"""Version 3 (since 2026-12): version 2 whose array fingerprints may be XXH3-64, so that a
jaxckpt that knows only CRC-32C reads it as a newer writer's (unverified), never as
corrupt. Version 2: checksums for the small files only; array data is covered by per-leaf
fingerprints taken from the arrays at save time (:mod:`jaxckpt.fingerprint`) and checked
on the arrays a restore reads, so no byte is read twice. Version 1 (a checksum per file)
is still read and checked."""
FORMATS = ("jaxckpt-manifest/1", "jaxckpt-manifest/2", MANIFEST_FORMAT)
_LEAF_FINGERPRINTS = {"jaxckpt-manifest/2": ("crc32c", "wsum32"),
                      MANIFEST_FORMAT: tuple(fmt.FINGERPRINT_BITS)}
"""The array fingerprints each format with arrays may hold."""
SMALL_FILE = 1 << 20
"""Files up to this size get a checksum in a version-2 or -3 manifest (metadata, indexes)."""
_CHUNK = 8 << 20
log = logging.getLogger("jaxckpt")

Writer = Literal["jaxckpt", "orbax", "unknown"]


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What :func:`check` found in one step directory.

    Attributes:
      problems: one line per damaged file (path relative to the step, then what is wrong;
        an array data file's ends with the arrays it holds, :mod:`jaxckpt.ocdbt`).
      has_manifest: False for a checkpoint whose writer stopped between Orbax's commit
        and the manifest, one older than manifests, or one jaxckpt did not write.
      writer: ``"jaxckpt"``, ``"orbax"`` (plain Orbax: no jaxckpt ``meta`` record) or
        ``"unknown"`` (an object-store write in flight, or a file named like a step).
      incomplete: a file every commit writes is missing (a half-deleted or half-copied
        step). Not a checkpoint: readers ignore it, never restore it.
    """

    step: int
    problems: tuple[str, ...] = ()
    has_manifest: bool = True
    writer: Writer = "jaxckpt"
    incomplete: bool = False
    arrays: Any = None
    """Version-2 and -3 manifests: ``{leaf path: fingerprint}`` of the state item, to compare
    with the restored arrays (the files' bytes were not read to produce this verdict)."""
    records: Any = None
    """jaxckpt's JSON records read by the check (``{"meta": ..., "data_state": ...}``,
    those that passed their schema), so nobody reads them again."""
    saved: Any = None
    """Version-2 (newer ones) and -3 manifests: the state item's leaves, parsed
    (:class:`jaxckpt.target.SavedLeaves`), to check a restore target."""

    @property
    def ok(self) -> bool:
        return not self.problems and not self.incomplete

    @property
    def usable(self) -> bool:
        """Restorable: complete and without problems (a missing manifest is allowed)."""
        return self.ok

    def describe(self) -> str:
        """One line for people: ``verified``, ``written by Orbax, no manifest``, ..."""
        if self.incomplete:
            return "incomplete: " + "; ".join(self.problems)
        if self.problems:
            return "; ".join(self.problems)
        if self.has_manifest:
            return "verified"
        if self.writer == "orbax":
            return "written by Orbax, no manifest: not verifiable"
        return ("no manifest (its writer stopped between Orbax's commit and the manifest, "
                "or it predates manifests): unverified")


def _files(step_dir: epath.Path) -> dict[str, int]:
    """Relative POSIX path -> size of every file under ``step_dir`` (the manifest too),
    except temporary files (a manifest half-written by a killed writer)."""
    storage.forget_cached_listings(step_dir)  # what is there now, not a cached listing
    return {rel: size for rel, size in storage.walk_files(step_dir)
            if not fmt.is_temp(rel.rsplit("/", 1)[-1])}


_EXTEND: dict[str, Callable[[int, bytes], int]] = {
    "crc32": lambda value, chunk: zlib.crc32(chunk, value)}
# New manifests use CRC-32C where it runs in hardware or C (jaxckpt.crc); a pure-Python
# fallback (MB/s) checks manifests, never writes them.
if crc.best() is not None:
    _EXTEND["crc32c"] = crc.best().extend
DEFAULT_ALGORITHM = "crc32c" if crc.best() is not None and crc.best().fast else "crc32"


def checksum_of(path: epath.Path, algorithm: str = DEFAULT_ALGORITHM) -> int:
    """The ``algorithm`` checksum of the file at ``path``, read in 8 MiB chunks."""
    try:
        extend = _EXTEND[algorithm]
    except KeyError:
        raise ValueError(f"unknown checksum {algorithm!r}; this jaxckpt computes "
                         f"{sorted(_EXTEND)} (crc32c needs the crc32c package).") from None
    value = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            value = extend(value, chunk)
    return value


def build_manifest(step_dir: epath.Path, step: int, arrays: dict | None = None,
                   algorithm: str = DEFAULT_ALGORITHM) -> dict:
    """The manifest of a committed step directory.

    With ``arrays`` (the state's record, :func:`jaxckpt.fingerprint.resolve`),
    version 3: sizes of every file, checksums of the small ones only, so a save reads
    back kilobytes, not the state. Without, version 1: every file read and checksummed.
    """
    files = {}
    for rel, size in sorted(_files(step_dir).items()):
        if rel == MANIFEST_FILE:
            continue
        files[rel] = {"size": size}
        if arrays is None or size <= SMALL_FILE:
            files[rel][algorithm] = checksum_of(step_dir / rel, algorithm)
    manifest = {"format": MANIFEST_FORMAT if arrays is not None else FORMATS[0],
                "step": step, "algorithm": algorithm, "files": files}
    if arrays is not None:
        manifest["arrays"] = {"item": fmt.STATE, **arrays}
    return manifest


def write_manifest(step_dir: epath.Path, manifest: dict) -> None:
    """Write ``manifest`` atomically: a reader sees the whole file or none."""
    storage.atomic_write_text(step_dir / MANIFEST_FILE, json.dumps(manifest))


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
    if isinstance(fmt, str) and fmt not in FORMATS and \
            fmt.startswith(MANIFEST_FORMAT.split("/")[0] + "/"):
        return f"manifest format {fmt!r} (this jaxckpt reads {list(FORMATS)})"
    if fmt in FORMATS and isinstance(algorithm, str) and algorithm.isidentifier() \
            and algorithm not in _EXTEND:
        return f"checksum {algorithm!r} (this jaxckpt computes {sorted(_EXTEND)})"
    return None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _manifest_schema(m: Any, step: int) -> list[str]:
    if not isinstance(m, dict):
        return ["not a JSON object"]
    if m.get("format") not in FORMATS:
        return [f"format is {m.get('format')!r}, expected one of {list(FORMATS)}"]
    fingerprinted = m["format"] in _LEAF_FINGERPRINTS  # version 2 or later
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
                  and ((fingerprinted and algorithm not in entry and entry["size"] > SMALL_FILE)
                       or (_is_int(entry.get(algorithm)) and 0 <= entry[algorithm] < 2 ** 32))):
            problems.append(f"malformed entry for {rel!r}: {entry!r}")
    if fingerprinted:
        problems += _arrays_schema(m.get("arrays"), _LEAF_FINGERPRINTS[m["format"]])
    return problems


def _arrays_schema(arrays: Any, algorithms: tuple[str, ...]) -> list[str]:
    if not (isinstance(arrays, dict) and isinstance(arrays.get("leaves"), dict)):
        return ["'arrays' must be an object with 'leaves'"]
    for path, fp in arrays["leaves"].items():
        if not (isinstance(path, str) and isinstance(fp, dict) and fp and all(
                k in algorithms and _is_int(v) and 0 <= v < 2 ** fmt.FINGERPRINT_BITS[k]
                for k, v in fp.items())):
            return [f"malformed array fingerprint for {path!r}: {fp!r}"]
    if "saved" not in arrays:  # absent from the first version-2 manifests
        return []
    from jaxckpt.target import SavedLeaves
    try:  # parsed here, once; the restore plans from the parsed record
        arrays["saved"] = SavedLeaves.from_json(arrays["saved"])
    except ValueError as e:
        return [str(e)]
    return []


def writer_of(step_dir: epath.Path) -> Writer:
    """Who wrote a step directory, from the files only jaxckpt writes ("unknown" while an
    object-store write is in flight: nobody's checkpoint yet). One listing of the step."""
    return _writer_from_listing(step_dir, set(_files(step_dir)))


def _writer_from_listing(step_dir: epath.Path, names: set[str]) -> Writer:
    """:func:`writer_of`, from a listing of the step. A local step appears by an atomic
    rename once complete; on an object store Orbax writes in place and ends with a commit
    marker."""
    if storage.is_remote(step_dir) and fmt.COMMIT_MARKER not in names:
        return "unknown"
    if MANIFEST_FILE in names or _has_jaxckpt_meta(step_dir, names):
        return "jaxckpt"
    return "orbax" if fmt.ORBAX_METADATA in names else "unknown"


_JAXCKPT_ITEMS = frozenset({fmt.STATE, fmt.META, fmt.DATA_STATE, fmt.METRICS})
_RECORDS = frozenset({f"{fmt.META}/metadata", f"{fmt.DATA_STATE}/metadata"})
"""jaxckpt's JSON records: read at every check (to rank a step, to resume), so their
checksums are compared at every check too, sizes-only ones included. It costs no read,
and a flipped digit in a metric can no longer rank a damaged step best (and have a
writer delete a good one to keep it)."""


def _has_jaxckpt_meta(step_dir: epath.Path, names: set[str]) -> bool:
    """Whether a step without a manifest is jaxckpt's: only jaxckpt's items, and a meta
    record that is jaxckpt's (or too damaged to be anyone's JSON). A plain Orbax save
    with an item named ``meta`` is not: its checkpoints are never deleted nor set aside.
    Read only for steps without a manifest (a writer stopped before it, or not jaxckpt)."""
    meta = f"{fmt.META}/metadata"
    items = {n.split("/", 1)[0] for n in names if "/" in n}
    if meta not in names or not items <= _JAXCKPT_ITEMS:
        return False
    try:
        record = json.loads(storage.read_text(step_dir / meta))
    except storage.StorageTimeoutError:
        raise
    except OSError:
        return False  # unreadable: whose it is stays unknown, so it is left alone
    except ValueError:
        return True  # not JSON: damaged (Orbax's JSON items always are JSON)
    return isinstance(record, dict) and record.get("format") == fmt.META_FORMAT


def check(step_dir: epath.Path, step: int, *, checksums: bool) -> Verdict:
    """Check checkpoint ``step`` in ``step_dir`` against its manifest.

    One listing of the step answers every question of presence and size; each small file
    is read once, for its checksum and (jaxckpt's JSON records) its schema. On an object
    store that is a request per small file, not several.

    Args:
      step_dir: the step's directory.
      step: its step number (must match the manifest and meta).
      checksums: also compare the small files' checksums (else sizes only: the listing,
        which finds truncated and missing files, not changed bytes; jaxckpt's JSON
        records, read anyway, are compared always).

    Raises:
      FileNotFoundError: ``step_dir`` no longer exists (deleted by its writer meanwhile).
    """
    try:
        on_disk = _files(step_dir)
    except FileNotFoundError:
        raise
    except NotADirectoryError:  # a user's file named like a step: ignored, never moved
        return Verdict(step, (".: a file, not a checkpoint directory",), has_manifest=False,
                       writer="unknown", incomplete=True)
    except OSError as e:
        return Verdict(step, (f".: cannot list the checkpoint directory ({e})",))
    if not on_disk and not step_dir.exists():
        raise FileNotFoundError(f"{step_dir} no longer exists")
    names = set(on_disk)
    on_disk.pop(MANIFEST_FILE, None)
    writer = _writer_from_listing(step_dir, names)
    if storage.is_remote(step_dir) and fmt.COMMIT_MARKER not in names:
        return Verdict(step, (f"{fmt.COMMIT_MARKER}: missing (a write in flight, or one "
                              "whose writer died)",), has_manifest=False, writer=writer,
                       incomplete=True)
    if writer != "jaxckpt":
        complete = fmt.ORBAX_METADATA in names
        return Verdict(step, () if complete else (f"{fmt.ORBAX_METADATA}: missing",),
                       has_manifest=False, writer=writer, incomplete=not complete)
    missing = tuple(f"{rel}: missing" for rel in fmt.COMMIT_FILES if rel not in names)
    if missing and MANIFEST_FILE not in names:
        if _state_whole(names):
            # Its state is all there: damage to a checkpoint (two lost files), set aside
            # and kept, never deleted as unfinished.
            return Verdict(step, missing + (f"{MANIFEST_FILE}: missing",),
                           has_manifest=False)
        # Never committed whole (a copy or a deletion cut short): not a checkpoint.
        return Verdict(step, missing, has_manifest=False, incomplete=True)
    # With a manifest the step was complete once: a lost file is damage, set aside (below).
    manifest, problems = read_manifest(step_dir, step)
    if problems:
        return Verdict(step, tuple(problems))
    if missing and manifest is not None and _half_deleted(manifest, on_disk):
        return Verdict(step, missing, has_manifest=True, incomplete=True)
    contents: dict[str, bytes] = {}  # the small files read for their checksums
    if manifest is not None:
        problems = _with_arrays(step_dir, manifest,
                                _file_problems(step_dir, manifest, on_disk, checksums, contents))
    records, json_problems = _json_records(step_dir, step, names, contents)
    problems = json_problems + problems
    if manifest is None:
        return Verdict(step, tuple(problems), has_manifest=False, records=records)
    arrays = manifest.get("arrays", {})
    return Verdict(step, tuple(problems), arrays=arrays.get("leaves"),
                   saved=arrays.get("saved"), records=records)


def _state_whole(names: set[str]) -> bool:
    """Whether the state item holds what Orbax writes last (its ``_METADATA``) and the
    OCDBT root with data files: a state Orbax can restore."""
    state = f"{fmt.STATE}/"
    return (f"{state}_METADATA" in names and f"{state}manifest.ocdbt" in names
            and any(n.startswith(state) and "/d/" in n for n in names))


def _half_deleted(manifest: dict, on_disk: dict[str, int]) -> bool:
    """Whether a step that lost a file a commit writes lost its data too: what a deletion
    in place (older jaxckpt) cut short leaves, which nothing can restore. Otherwise the
    loss is damage to a restorable checkpoint, which is set aside and kept."""
    gone = [rel for rel in manifest["files"] if rel not in on_disk]
    return 2 * len(gone) >= len(manifest["files"]) or any(
        manifest["files"][rel]["size"] > SMALL_FILE for rel in gone)


def _file_problems(step_dir: epath.Path, manifest: dict, on_disk: dict[str, int],
                   checksums: bool, contents: dict[str, bytes]) -> list[tuple[str, str]]:
    """Every manifest entry against the listing; small files' checksums when asked (the
    bytes read are kept in ``contents``). ``[(file, problem)]``, each problem a line that
    names its file."""
    problems, to_check = [], []
    algorithm = manifest["algorithm"]
    local = None if storage.is_remote(step_dir) else os.fspath(step_dir)
    for rel, entry in manifest["files"].items():
        # A listed file is a real file or a symlink (a symlinked directory is not walked).
        if local and os.path.islink(os.path.join(local, rel)) and \
                not storage.inside(step_dir, step_dir / rel):
            problems.append(("", f"{rel}: leads outside the checkpoint directory (a symlink)"))
        elif rel not in on_disk:
            problems.append((rel, f"{rel}: missing"))
        elif on_disk[rel] != entry["size"]:
            problems.append((rel, f"{rel}: size {on_disk[rel]} bytes, manifest says "
                                  f"{entry['size']}"))
        elif (checksums or rel in _RECORDS) and algorithm in entry:
            to_check.append(rel)
    # On a store concurrently: each read is a round trip. On a disk in turn: a thread
    # hand-off per file costs more than the read, even cold (measured: 2.5 vs 3.3 ms warm).
    for rel, got in zip(to_check, (map if local else _pool().map)(
            lambda rel: _read_checksum(step_dir / rel, manifest["files"][rel]["size"],
                                       algorithm), to_check)):
        if isinstance(got, FileNotFoundError):
            raise got
        if isinstance(got, OSError):
            problems.append((rel, f"{rel}: unreadable ({got})"))
            continue
        crc, data = got
        if data is not None:
            contents[rel] = data
        want = manifest["files"][rel][algorithm]
        if crc != want:
            problems.append((rel, f"{rel}: checksum mismatch ({algorithm} {crc:#010x}, "
                                  f"manifest says {want:#010x})"))
    return problems


def _with_arrays(step_dir: epath.Path, manifest: dict,
                 problems: list[tuple[str, str]]) -> list[str]:
    """The problems, each damaged array data file's followed by the arrays it holds
    (`` [holds arrays: state/params/dense/kernel, ...]``): its name alone says nothing
    of what is hurt. Read from the item's OCDBT tree only when such a file is damaged."""
    damaged = [rel for rel, _ in problems if ocdbt.is_data_file(rel)]
    held: dict[str, list[str]] = {}
    if damaged:
        arrays = manifest.get("arrays") or {}
        record = arrays.get("saved") or arrays.get("leaves")
        leaves = {arrays["item"]: list(record)} if record and "item" in arrays else {}
        held = ocdbt.arrays_in_files(step_dir, damaged, leaves)
    return [text + held.get(rel, "") for rel, text in problems]


def _read_checksum(path: epath.Path, size: int, algorithm: str
                   ) -> tuple[int, bytes | None] | OSError:
    """``(checksum, bytes)`` of a small file (``bytes`` None for a large one, read in
    chunks), or the error reading it."""
    try:
        if size <= SMALL_FILE:
            data = path.read_bytes()
            return _EXTEND[algorithm](0, data), data
        return checksum_of(path, algorithm), None
    except OSError as e:
        return e


@functools.lru_cache(maxsize=1)
def _pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="jaxckpt-read")


os.register_at_fork(after_in_child=_pool.cache_clear)  # a forked child has no such threads


# -- the JSON files jaxckpt writes into each step ------------------------------------------


def _json_records(step_dir: epath.Path, step: int, names: set[str],
                  contents: dict[str, bytes]) -> tuple[dict[str, Any], list[str]]:
    """jaxckpt's JSON items that pass their schema (``{item: record}``) and the schema
    problems of the others. One not in the step's listing (``names``) is skipped: a
    missing file the manifest lists is reported with the files, and a step saved without
    a data state has none."""
    records, problems = {}, []
    for item, validate in ((fmt.META, lambda d: fmt.validate_meta(d, step)),
                           (fmt.DATA_STATE, fmt.validate_data_state)):
        rel = f"{item}/metadata"
        if rel not in names:
            continue
        try:
            data = json.loads(contents[rel] if rel in contents else (step_dir / rel).read_bytes())
        except FileNotFoundError:
            raise  # listed a moment ago: the step is being deleted
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            problems.append(f"{rel}: not readable JSON ({e})")
            continue
        found = [f"{rel}: {p}" for p in validate(data)]
        problems += found
        if not found:
            records[item] = data
    return records, problems
