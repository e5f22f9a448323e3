"""Array fingerprints: integrity of the array data with no extra pass over the files.

A host array (a CPU state, numpy) gets the XXH3-64 hash of its bytes: one pass at memory
speed (~18 GB/s here; CRC-32C, used until 2026-12, ran at ~12 GB/s and cost a 512 MiB
save 10 % more CPU than raw Orbax), run on the writer's thread while Orbax writes, with
the GIL released. A damaged array goes unnoticed with probability 2**-64 (a CRC-32: 2**-32
for damage longer than 32 bits). Old manifests' CRC-32C fingerprints still verify.

An array on an accelerator, or sharded across processes, gets a weighted sum instead:
``sum((2*i + 1) * w[i]) mod 2**32`` over its bytes read as little-endian words ``w``
(4-byte words; 1- and 2-byte elements widened to one word each) at linear position ``i``.
Each weight is odd, hence invertible mod 2**32, so a change to any single word always
changes it; words swapped between positions do too. It is one jitted reduction
dispatched when ``save`` is called (microseconds on an accelerator), computed where the
shards live.

Restored arrays are checked the way they were fingerprinted, after Orbax's single read.
Neither is a check against an attacker: both guard against damaged files.
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import xxhash

from jaxckpt import crc
from jaxckpt import format as fmt
from jaxckpt.target import is_prng_key, path_str, per_sharding, saved_leaf

__all__ = ["of_tree", "resolve", "Check"]

_CHUNK = 2 << 20  # bytes CRC'd per call: ~0.3 ms of holding the GIL

HOST_ALGORITHM = "xxh3_64"
"""What new checkpoints record for a host array ("crc32c": what jaxckpt wrote until
2026-12; tests set it to write such checkpoints)."""
HOST_ALGORITHMS = ("xxh3_64", "crc32c")
"""Fingerprints of host bytes: checked before a restored array is placed (:meth:`Check.host`)."""


@jax.jit
def _wsum(words: jax.Array) -> jax.Array:
    """The weighted sum of an integer array's words, by row-major linear position.

    Built from broadcasted iotas rather than a reshape, so a sharded array is reduced
    where its shards live (partial sums, then one all-reduce).
    """
    shape = words.shape
    linear = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        linear = linear + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(
            stride % 2**32)
        stride *= shape[axis]
    weights = linear * jnp.uint32(2) + jnp.uint32(1)
    return jnp.sum(words.astype(jnp.uint32) * weights, dtype=jnp.uint32)


def _device_words(x: jax.Array) -> jax.Array:
    size = np.dtype(x.dtype).itemsize
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint8)
    if size in (1, 2, 4):
        return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16,
                                               4: jnp.uint32}[size])
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8 bytes: a trailing axis of 2


@jax.jit
def _of_device_array(x: jax.Array) -> jax.Array:
    return _wsum(_device_words(x))


def _host_words(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x)
    size = x.dtype.itemsize
    if x.dtype == np.bool_:
        return x.view(np.uint8)
    if size in (1, 2, 4):
        return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[size])
    if size == 8:
        return x.view(np.uint32).reshape(x.shape + (2,))
    raise TypeError(f"no fingerprint for dtype {x.dtype}")


def _host_bytes(x: Any) -> np.ndarray | None:
    """The array's bytes as a host view when that costs no device transfer (a CPU array
    held whole by this process, or numpy), else None."""
    if isinstance(x, (np.ndarray, np.generic)):
        return np.ascontiguousarray(x)
    if _local_cpu(x.sharding):
        return np.ascontiguousarray(np.asarray(x))  # a zero-copy view on one CPU device
    return None


@per_sharding
def _local_cpu(sharding: jax.sharding.Sharding) -> bool:
    return sharding.is_fully_addressable and all(d.platform == "cpu"
                                                 for d in sharding.device_set)


def _key_data(x: Any) -> Any:
    """A typed PRNG key's raw data (what is saved for it); any other leaf as it is."""
    if isinstance(x, jax.Array) and is_prng_key(x):
        return jax.random.key_data(x)
    return x


def pending(x: Any) -> Any:
    """Start fingerprinting one leaf; :func:`finish` turns the result into numbers.

    A host array gets a hash of its bytes (:data:`HOST_ALGORITHM`, run later on the
    writer's thread); an accelerator or multi-process array gets the weighted sum,
    dispatched now on its devices. None for leaves that are not arrays.
    """
    x = _key_data(x)
    if not (isinstance(x, jax.Array) or (isinstance(x, (np.ndarray, np.generic))
                                         and x.dtype.kind in "biufc")):
        return None
    host = _host_bytes(x)
    if host is not None:
        return (HOST_ALGORITHM, host)
    return ("wsum32", _of_device_array(x))


def finish(started: Any) -> dict[str, int]:
    algorithm, value = started
    if algorithm == "wsum32":
        return {"wsum32": int(np.asarray(value.addressable_data(0)))}
    # Read in place (no copy of the state).
    flat = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
    if algorithm == "xxh3_64":
        return {"xxh3_64": xxhash.xxh3_64_intdigest(flat)}  # releases the GIL
    if algorithm != "crc32c":
        raise ValueError(f"unknown array fingerprint {algorithm!r}")
    impl = crc.best()
    if impl is None:
        raise RuntimeError("checking a CRC-32C fingerprint needs the crc32c package "
                           "(a jaxckpt dependency): pip install crc32c")
    # An implementation that holds the GIL gets chunks, so that other threads run.
    chunk = max(flat.size, 1) if impl.releases_gil else _CHUNK
    out = 0
    for start in range(0, flat.size, chunk):
        out = impl.extend(out, flat[start:start + chunk])
    return {"crc32c": out}


def _host_algorithm(want: dict[str, int]) -> str | None:
    return next((a for a in HOST_ALGORITHMS if a in want), None)


def of_tree(tree: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """``{leaf path: (started fingerprint or None, what is saved)}`` for every leaf of a
    tree about to be saved (:func:`jaxckpt.target.to_saveable`'s)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {prefix + path_str(path): (pending(leaf), saved_leaf(leaf)) for path, leaf in flat}


def resolve(started: dict[str, tuple[Any, Any]]) -> dict[str, dict]:
    """The manifest's record of the state (blocks until every fingerprint is computed):
    ``leaves``, the fingerprint of each array; ``saved``, each leaf's shape and dtype, so
    a restore checks its target without reading Orbax's metadata."""
    return {"leaves": {path: finish(s) for path, (s, _) in started.items() if s is not None},
            "saved": {path: leaf.to_json() for path, (_, leaf) in started.items()}}


class Check:
    """Compares restored arrays with the fingerprints saved with them, each the way it was
    computed at save time, wherever the array now lives.

    A leaf read as numpy is checked by :meth:`host` before it is copied into place: its
    bytes are then read from memory once, for the check, and the copy finds them in the
    cache. :meth:`tree` checks every leaf not checked yet. Problems accumulate in
    ``problems``, one line per leaf, named by its path.
    """

    def __init__(self, expected: dict[str, dict[str, int]], prefix: str = ""):
        self.expected = expected
        self.prefix = prefix
        self.problems: list[str] = []
        self._done: set[str] = set()

    def host(self, path: str, array: np.ndarray) -> None:
        """Check a leaf read as numpy (``path`` relative to ``prefix``) if its fingerprint
        is a hash of host bytes; a device fingerprint waits for the placed array."""
        key = self.prefix + path
        want = self.expected.get(key)
        algorithm = _host_algorithm(want) if want is not None else None
        if algorithm is None:
            return
        self._done.add(key)
        self._compare(key, finish((algorithm, array)), want)

    def tree(self, tree: Any) -> "Check":
        """Check every leaf of a restored ``tree`` that :meth:`host` did not.

        Hashes of host bytes run on as many threads as there are cores (up to 4): both
        release the GIL. Weighted sums run on this thread, in the tree's order: each
        is a jitted reduction, and over an array sharded across processes a collective,
        which every process must dispatch in the same order (run from a pool, the
        processes paired different arrays' all-reduces, and a good checkpoint failed its
        check).
        """
        flat, _ = jax.tree_util.tree_flatten_with_path(tree)
        hashes, sums = [], []
        for path, leaf in flat:
            key = self.prefix + path_str(path)
            want = self.expected.get(key)
            if want is None or key in self._done or \
                    not isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
                continue  # a Python scalar (as saved, or as Orbax reads a numpy scalar back)
            (hashes if _host_algorithm(want) else sums).append((key, _key_data(leaf), want))
        got = map_on_cores(lambda t: _restored(t[1], t[2]), hashes)
        got += [_restored(leaf, want) for _, leaf, want in sums]
        for (key, _, want), value in zip(hashes + sums, got):
            self._compare(key, value, want)
        return self

    def _compare(self, key: str, got: dict[str, int], want: dict[str, int]) -> None:
        if got != {k: v for k, v in want.items() if k in got}:
            algorithm = next(iter(got))
            width = 2 + fmt.FINGERPRINT_BITS[algorithm] // 4
            self.problems.append(
                f"{key}: array data does not match its fingerprint ({algorithm} "
                f"{got[algorithm]:#0{width}x}, manifest says {want[algorithm]:#0{width}x})")


def map_on_cores(fn: Callable[[Any], Any], items: list) -> list:
    """``[fn(x) for x in items]``, on up to 4 threads (no more than the cores) when there
    is more than one item: for work that releases the GIL (XXH3, the crc32c package's
    CRC of older manifests, array copies; google-crc32c's CRC does not, but its 2 MiB
    chunks let the threads take turns)."""
    workers = min(4, os.cpu_count() or 1, len(items))
    if workers < 2:
        return [fn(x) for x in items]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def _restored(leaf: Any, want: dict[str, int]) -> dict[str, int]:
    algorithm = _host_algorithm(want)
    if algorithm is not None:
        host = _host_bytes(leaf)
        return finish((algorithm, host if host is not None else np.asarray(leaf)))
    return finish(("wsum32", _of_device_array(leaf) if isinstance(leaf, jax.Array)
                   else _wsum(_host_words(np.asarray(leaf)))))
