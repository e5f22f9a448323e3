"""Which arrays an Orbax data file holds: so a damaged file is reported by the arrays it
hurts, not only by its random name (``state/ocdbt.process_0/d/1a2b...``).

Orbax stores a PyTree item as an OCDBT database (tensorstore's B+tree key-value store):
each array is a zarr array under the key prefix of its Orbax name (``params.dense.kernel/``
for the leaf ``params/dense/kernel``), and the files under ``d/`` hold values too large to
be inline (over 1 KiB), B+tree nodes (which hold the small values inline), or both. The
tree is read with tensorstore's public :func:`tensorstore.ocdbt.dump`: the manifest, then
node by node, in the item's own database (``<item>/manifest.ocdbt``), the one a restore
reads. Its latest version refers to every file a restore reads, each process's included.

A file is named for an array when it holds one of the array's values, or a B+tree node
whose keys include the array's (a damaged node makes every array below it unreadable). A
node that cannot be read (a damaged one fails its own CRC-32C) is charged with the
arrays of its key range, from its parent's keys.

Each process also writes a database of its own (``<item>/ocdbt.process_<i>/``), merged
into the item's at commit: its B+tree nodes, of every version, are files no restore
reads. A damaged one is said to be that.

Only called for files that failed a check; every error gives up quietly (no names), as
the file's own problem is reported either way.
"""

from __future__ import annotations

import logging
import time
import urllib.parse
from collections.abc import Collection, Iterable
from typing import Any

from etils import epath

from jaxckpt import storage

__all__ = ["is_data_file", "arrays_in_files", "describe"]

log = logging.getLogger("jaxckpt")

_TIMEOUT_S = 60.0
"""The whole walk's deadline (a few small reads; a stalled store gets no names)."""
_MAX_NODES = 10_000


def is_data_file(rel: str) -> bool:
    """Whether ``rel`` (relative to the step) is an OCDBT data file of an item:
    ``<item>/d/<id>`` or ``<item>/ocdbt.process_<i>/d/<id>``."""
    parts = rel.split("/")
    return (len(parts) == 3 and parts[1] == "d") or (
        len(parts) == 4 and parts[1].startswith("ocdbt.process_") and parts[2] == "d")


def arrays_in_files(step_dir: epath.Path, files: Iterable[str],
                    leaves: dict[str, list[str]]) -> dict[str, str]:
    """``{file: what it holds}`` (``" [holds arrays: a, b and 3 more]"``, to append to
    the file's problem) for the ``files`` (relative to the step, data files of its items);
    files in neither index, or whose holders cannot be read, are left out.

    A file the item's own index reaches is named by the arrays a restore reads from it.
    One only a process's own database reaches is said to be part of that index, which no
    restore reads.

    Args:
      step_dir: the step's directory.
      files: data files (:func:`is_data_file`) to look for.
      leaves: ``{item: [leaf path, ...]}`` (``"params/dense/kernel"``, the manifest's) in
        the order to report them; an item not in it is not looked into.
    """
    by_item: dict[str, set[str]] = {}
    for rel in files:
        if is_data_file(rel):
            item, inside = rel.split("/", 1)
            by_item.setdefault(item, set()).add(inside)
    out: dict[str, str] = {}
    deadline = time.monotonic() + _TIMEOUT_S
    for item, wanted in sorted(by_item.items()):
        try:
            paths = leaves.get(item)
            if not paths:
                continue  # a manifest without a leaf list (version 1): nothing to name
            found, _ = _holders(step_dir / item, wanted, _orbax_names(paths), deadline)
            rest = {f for f in wanted if not found.get(f) and "/d/" in f}
            own: set[str] = set()
            for process in sorted({f.split("/", 1)[0] for f in rest}):
                _, seen = _holders(step_dir / item / process, (), {}, deadline,
                                   every_version=True)
                own |= {f"{process}/{f}" for f in seen} & rest
        except Exception as e:  # noqa: BLE001 - naming is a courtesy: the file is reported
            log.debug("could not tell which arrays %s/%s hold: %r", item, sorted(wanted), e)
            continue
        order = {p: i for i, p in enumerate(paths)}
        for inside in sorted(wanted):
            if found.get(inside):
                held = sorted(found[inside], key=lambda p: (order.get(p, len(order)), p))
                out[f"{item}/{inside}"] = describe([f"{item}/{p}" for p in held])
            elif inside in own:
                out[f"{item}/{inside}"] = (f" [part of {inside.split('/', 1)[0]}'s own "
                                           "index, which a restore does not read]")
    return out


def describe(paths: list[str], most: int = 8) -> str:
    """`` [holds arrays: a, b and 3 more]``, to append to a file's problem."""
    shown = ", ".join(paths[:most])
    more = f" and {len(paths) - most} more" if len(paths) > most else ""
    return f" [holds {'array' if len(paths) == 1 else 'arrays'}: {shown}{more}]"


def _orbax_names(paths: Iterable[str]) -> dict[bytes, list[str]]:
    """``{Orbax's key prefix: [leaf path, ...]}``: Orbax names an array by its keys joined
    with ``.`` (two leaves may share a name when keys hold dots; both are named)."""
    names: dict[bytes, list[str]] = {}
    for p in paths:
        names.setdefault(p.replace("/", ".").encode(), []).append(p)
    return names


def _holders(db_dir: epath.Path, wanted: Collection[str], names: dict[bytes, list[str]],
             deadline: float, every_version: bool = False
             ) -> tuple[dict[str, set[str]], set[str]]:
    """``({file: {leaf path}}, files)`` from the OCDBT database in ``db_dir``: the leaves
    each ``wanted`` file holds (files relative to ``db_dir``), and every file its tree
    refers to. The latest version's tree, or that of every version its manifest lists."""
    import tensorstore as ts

    context = ts.Context()

    def result(future: Any) -> Any:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("reading the OCDBT tree took too long")
        return future.result(timeout=left)

    kvstore = result(ts.KvStore.open(_spec(db_dir), context=context))
    versions = result(ts.ocdbt.dump(kvstore, context=context)).get("versions") or []
    if versions and not every_version:
        versions = [max(versions, key=lambda v: v["generation_number"])]
    found: dict[str, set[str]] = {f: set() for f in wanted}
    files: set[str] = set()
    ordered = sorted(names)
    stack: list[tuple[str, bytes | None, bytes | None]] = [
        (v["root"]["location"], None, None) for v in versions
        if "location" in v["root"]]  # none: an empty database
    seen: set[str] = set()
    while stack and len(seen) < _MAX_NODES:
        location, lo, hi = stack.pop()
        if location in seen:
            continue
        seen.add(location)
        where = _file_of(location)
        files.add(where)
        try:
            node = result(ts.ocdbt.dump(kvstore, location, context=context))
        except TimeoutError:
            raise
        except Exception:  # noqa: BLE001 - a node that cannot be read: charged to its file
            if where in found:  # (a damaged node fails its own CRC-32C)
                found[where].update(_in_range(ordered, names, lo, hi))
            continue
        entries = node.get("entries") or []
        if where in found:  # the node holds these keys (their values, when inline)
            found[where].update(_in_range(ordered, names, lo, hi) if node.get("height")
                                else _named(names, (bytes(e["key"]) for e in entries)))
        for i, entry in enumerate(entries):
            if "indirect_value" in entry:
                f = _file_of(entry["indirect_value"])
                files.add(f)
                if f in found:
                    found[f].update(_named(names, [bytes(entry["key"])]))
            elif "location" in entry:  # an interior node's child, keys [key, next key)
                stop = bytes(entries[i + 1]["key"]) if i + 1 < len(entries) else hi
                stack.append((entry["location"], bytes(entry["key"]), stop))
    return found, files


def _spec(db_dir: epath.Path) -> Any:
    text = str(db_dir).rstrip("/") + "/"
    if storage.is_remote(text):
        return text  # tensorstore's URL form: gs://bucket/path/
    return {"driver": "file", "path": text}


def _file_of(location: str) -> str:
    """The file (relative to the database) of ``kind:base_path:relative_path:offset:length``,
    the form of a location in :func:`tensorstore.ocdbt.dump`'s output (percent-encoded)."""
    kind, base, relative, _offset, _length = location.split(":")
    return urllib.parse.unquote(base) + urllib.parse.unquote(relative)


def _named(names: dict[bytes, list[str]], keys: Iterable[bytes]) -> set[str]:
    """The leaves whose arrays own ``keys`` (``params.dense.kernel/0.0``)."""
    out: set[str] = set()
    for key in keys:
        head, sep, _ = key.rpartition(b"/")
        while sep:  # the longest Orbax name the key starts with
            if head in names:
                out.update(names[head])
                break
            head, sep, _ = head.rpartition(b"/")
    return out


def _in_range(ordered: list[bytes], names: dict[bytes, list[str]], lo: bytes | None,
              hi: bytes | None) -> set[str]:
    """The leaves with a key in ``[lo, hi)`` (None: unbounded): every key of an array
    lies in ``[name + b"/", name + b"0")``."""
    out: set[str] = set()
    for name in ordered:
        if (hi is None or name + b"/" < hi) and (lo is None or lo < name + b"0"):
            out.update(names[name])
    return out
