"""Restore targets: any user pytree in, the same pytree out.

Orbax restores arrays into abstract targets (``jax.ShapeDtypeStruct`` with shardings). A
user hands a state of their own: a Flax ``TrainState`` (its ``step`` a Python int after
``create``), NNX state, optax states, dicts, registered dataclasses, with typed PRNG keys,
numpy arrays, Python scalars and ``None`` among the leaves. This module turns such a
target into what Orbax restores into, checks it against what was saved (naming every
differing leaf, never casting silently), and turns Orbax's result back into the target's
own pytree, each leaf of the target's kind and placement.

Synopsis::

    saveable = to_saveable(state)         # TypeError naming any leaf that cannot be saved
    plan = restore_plan(saved_tree, target, step)   # saved_tree: Orbax's item metadata
    state = plan.finish(orbax_restore(plan.abstract))

What a leaf is saved as, and what it comes back as in a target leaf of the same kind:

- ``jax.Array``: its dtype and shape; a ``jax.Array`` placed with the target's sharding.
- typed PRNG key (``jax.random.key``): its raw ``uint32`` key data; a typed key of the
  target's impl. Raw ``jax.random.PRNGKey`` keys are plain ``uint32`` arrays.
- numpy array or scalar: its dtype and shape; the same numpy type.
- Python ``int``/``float``/``bool``: Orbax's scalar (a 0-d int64, float64 or bool value);
  the same Python type.
- ``None``: nothing (an empty subtree); ``None``.

A target leaf whose dtype differs from the saved one is refused (``RestoreStructureError``),
except Python scalar targets, which take the saved value converted to their type when the
kinds agree (an int from any integer dtype, a float from any float dtype, a bool from
bool). A saved Python scalar is weakly typed, as in JAX: it restores into an array leaf of
a compatible kind in the array's dtype, and an integer that does not fit that dtype is
refused rather than wrapped around.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from orbax.checkpoint import metadata as ocp_metadata

from jaxckpt.errors import RestoreStructureError

__all__ = [
    "RestorePlan",
    "abstract_target",
    "check_saveable",
    "check_structure",
    "is_array_metadata",
    "local_abstract",
    "path_str",
    "restore_plan",
    "to_saveable",
]

_PY_SCALARS = (bool, int, float)
_INT64 = np.iinfo(np.int64)


def _is_python_scalar(x: Any) -> bool:
    """A Python ``bool``/``int``/``float``; not ``np.float64``, a subclass of ``float``
    that is a numpy scalar with a dtype of its own."""
    return isinstance(x, _PY_SCALARS) and not isinstance(x, np.generic)


# -- what a leaf is ---------------------------------------------------------------------


def is_prng_key(x: Any) -> bool:
    """A typed PRNG key (concrete or abstract); raw ``uint32`` keys are plain arrays."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return False
    try:
        return _is_key_dtype(dtype)
    except TypeError:  # an unhashable dtype attribute
        return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


@functools.lru_cache(maxsize=256)
def _is_key_dtype(dtype: Any) -> bool:
    """Cached per dtype: ``issubdtype`` costs ~5 µs, asked of every leaf at every save."""
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def is_array_metadata(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _is_saved_leaf(x: Any) -> bool:
    return isinstance(x, ocp_metadata.Metadata) or is_array_metadata(x)


def _saved_as_python_scalar(meta: Any) -> bool:
    # Orbax writes Python int/float/bool leaves with its scalar handler: no fixed dtype of
    # the user's, and read back as a Python scalar.
    return isinstance(meta, ocp_metadata.ScalarMetadata) or (
        isinstance(meta, SavedLeaf) and meta.scalar)


@dataclasses.dataclass(frozen=True)
class SavedLeaf:
    """A saved leaf as jaxckpt's manifest records it: what Orbax's metadata says of it
    (shape, dtype, whether its scalar handler stored it), known without reading Orbax's
    per-array metadata, which costs a read per array at every restore."""

    shape: tuple[int, ...]
    dtype: np.dtype
    scalar: bool = False

    def to_json(self) -> dict[str, Any]:
        out = {"shape": list(self.shape), "dtype": self.dtype.name}
        return {**out, "scalar": True} if self.scalar else out

    @classmethod
    def from_json(cls, d: Any) -> "SavedLeaf":
        """Raises ValueError/TypeError/KeyError for a malformed record."""
        shape = tuple(d["shape"])
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
            raise ValueError(f"shape {d['shape']!r}")
        if d.get("scalar", False) not in (True, False):
            raise ValueError(f"scalar {d['scalar']!r}")
        return cls(shape, np.dtype(d["dtype"]), bool(d.get("scalar", False)))


def saved_leaf(x: Any) -> SavedLeaf:
    """What Orbax records for leaf ``x`` of a :func:`to_saveable` tree: Python scalars go
    to its scalar handler (ints as int64, floats as float64); numpy scalars are 0-d arrays."""
    if isinstance(x, np.generic):  # not saved as such: to_saveable makes it a 0-d array
        return _saved_array((), x.dtype, False)
    if isinstance(x, bool):
        return SavedLeaf((), np.dtype(np.bool_), scalar=True)
    if isinstance(x, int):
        return SavedLeaf((), np.dtype(np.int64), scalar=True)
    if isinstance(x, float):
        return SavedLeaf((), np.dtype(np.float64), scalar=True)
    return _saved_array(tuple(x.shape), x.dtype, False)


@functools.lru_cache(maxsize=4096)
def _saved_array(shape: tuple[int, ...], dtype: Any, scalar: bool) -> SavedLeaf:
    """Cached (a SavedLeaf is immutable): a model's leaves share a few shapes and dtypes,
    and each is recorded at every save."""
    return SavedLeaf(shape, np.dtype(dtype), scalar=scalar)


def _kind(dtype: Any) -> str | None:
    """bool/int/float/complex: the kinds between which a Python scalar may move."""
    dtype = np.dtype(dtype)
    for name, base in (("bool", np.bool_), ("int", np.integer), ("float", np.floating),
                       ("complex", np.complexfloating)):
        if jnp.issubdtype(dtype, base):
            return name
    return None


def path_str(path: Sequence[Any]) -> str:
    """``params/Dense_0/kernel``: a key path as the same text for the target and the
    saved tree (Orbax saves attributes, dict keys and indices all as names)."""
    try:
        return _cached_path_str(tuple(path))
    except TypeError:  # a key that cannot be hashed
        return _path_str(path)


@functools.lru_cache(maxsize=1 << 16)
def _cached_path_str(path: tuple[Any, ...]) -> str:
    """Cached: the same leaves' paths are named at every save (~4 µs each)."""
    return _path_str(path)


def _path_str(path: Sequence[Any]) -> str:
    return "/".join(_key_parts(path))


def per_sharding(fn: Callable[[jax.sharding.Sharding], bool]
                 ) -> Callable[[jax.sharding.Sharding], bool]:
    """``fn``, cached per sharding: a state of a thousand leaves has a handful of
    shardings, and what is asked of one costs ~70 µs (``is_fully_addressable`` asks for the
    process index). An unhashable sharding is asked each time."""
    cached = functools.lru_cache(maxsize=64)(fn)

    @functools.wraps(fn)
    def lookup(sharding: jax.sharding.Sharding) -> bool:
        try:
            return cached(sharding)
        except TypeError:  # unhashable
            return fn(sharding)
    return lookup


def _local_sharding() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


# -- save side --------------------------------------------------------------------------


def _unsaveable(x: Any) -> str | None:
    """Why ``x`` cannot be a saved leaf, with the fix; None when it can."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return ("is abstract (jax.ShapeDtypeStruct): save concrete arrays; abstract "
                "leaves belong in a restore target")
    if isinstance(x, jax.core.Tracer):
        return ("is a traced value: save() was called inside jax.jit (or grad, vmap, "
                "scan); call it outside the jitted step, on the state the step returned")
    if isinstance(x, jax.Array) and x.is_deleted():
        return ("was deleted: its buffer was donated to a jitted step (donate_argnums) or "
                "freed with .delete(); save the state the step returned, not its input")
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
        dtype = np.dtype(x.dtype) if not is_prng_key(x) else None
        if dtype is not None and (dtype.kind in "OUSMm" or dtype.fields is not None):
            return (f"is an array of dtype {dtype}, which Orbax cannot store: convert it to "
                    "a numeric array, or pass it as data_state (JSON) instead")
        if np.ndim(x) > 0 and math.prod(x.shape) == 0:
            return (f"is an empty array (shape {tuple(x.shape)}), which Orbax cannot store: "
                    "leave it out of the saved state, or give it at least one element")
        return None
    if isinstance(x, int) and not isinstance(x, bool) and not _INT64.min <= x <= _INT64.max:
        return (f"is the Python int {x}, outside int64: store it as an array of smaller "
                "numbers or pass it as data_state (JSON)")
    if _is_python_scalar(x):
        return None
    if isinstance(x, (str, bytes)):
        return ("is text; the state holds arrays only: pass text as data_state (JSON or "
                "bytes) or mark the field static (flax.struct.field(pytree_node=False))")
    if callable(x):
        return ("is a function, not data: mark the field static (flax.struct.field("
                "pytree_node=False), or dataclasses.field(metadata={'static': True}) with "
                "jax.tree_util.register_dataclass) or leave it out of the saved state (an "
                "equinox model: save eqx.filter(model, eqx.is_array))")
    return (f"is a {type(x).__module__}.{type(x).__qualname__}, not an array: register its "
            "class as a pytree (jax.tree_util.register_dataclass) with arrays as children "
            "and the rest static, or leave it out of the saved state")


def check_saveable(tree: Any) -> None:
    """Refuse, before anything is written, a state with a leaf Orbax cannot store.

    Saveable leaves: ``jax.Array`` (typed PRNG keys included), numpy arrays and scalars of
    a numeric or bool dtype, and Python ``int`` (within int64), ``float`` and ``bool``.
    ``None`` is an empty subtree and is saved as such.

    Raises:
      TypeError: naming each unsaveable leaf by its path, what it is and the fix.
      ValueError: the state has no leaf at all (an empty dict, only ``None``), or a
        dict's keys cannot be sorted (``{1: x, "1": y}``).
    """
    try:
        flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    except ValueError as e:
        mixed = _mixed_keys(tree)
        if mixed is None:
            raise
        raise ValueError(
            f"the state cannot be saved: the dict at {mixed[0]} has keys of different "
            f"types ({mixed[1]}), which JAX cannot sort into a fixed leaf order. Use keys "
            "of one type, e.g. str(key) for every key.") from e
    if not flat:
        raise ValueError(f"the state to save has no arrays or numbers (it is {tree!r:.80}): "
                         "pass the train state itself (params, optimizer state, step).")
    problems = [f"  {path_str(p) or '<root>'} {why}" for p, x in flat
                if (why := _unsaveable(x)) is not None]
    if problems:
        raise TypeError("the state cannot be saved; these leaves cannot be stored:\n"
                        + "\n".join(problems))
    _check_distinct_names([p for p, _ in flat])


def _mixed_keys(tree: Any, path: str = "<root>") -> tuple[str, str] | None:
    """``(path, key types)`` of the first dict (depth first, dicts and sequences) whose
    keys are of more than one type, or None."""
    if isinstance(tree, dict):
        kinds = sorted({type(k).__name__ for k in tree})
        if len(kinds) > 1:
            return path, ", ".join(kinds)
        items = [(f"{path}[{k!r}]", v) for k, v in tree.items()]
    elif isinstance(tree, (list, tuple)):
        items = [(f"{path}[{i}]", v) for i, v in enumerate(tree)]
    else:
        return None
    return next((m for p, v in items if (m := _mixed_keys(v, p)) is not None), None)


def _check_distinct_names(paths: list[Sequence[Any]]) -> None:
    """Refuse two leaves whose paths read as the same name: jaxckpt records leaves as
    ``a/b`` and Orbax stores them as ``a.b``, so ``{"a/b": x, "a": {"b": y}}`` (or
    ``{"a.b": x, "a": {"b": y}}``, which Orbax silently overwrites) saves a checkpoint
    that cannot be restored as it was."""
    names = [path_str(p) for p in paths]
    if len(set(names)) == len(names) and not any("." in n for n in names):
        return  # the common case: no key holds a separator
    for sep, who in (("/", "jaxckpt's manifest"), (".", "Orbax's files")):
        seen: dict[str, str] = {}
        for p in paths:
            joined, name = sep.join(_key_parts(p)), jax.tree_util.keystr(tuple(p))
            if joined in seen:
                raise ValueError(
                    f"the state cannot be saved: leaves {seen[joined]} and {name} "
                    f"would both be stored as {joined!r} in {who}. Rename the keys so that "
                    "none holds '/' or '.' (e.g. 'a_b').")
            seen[joined] = name


def _key_parts(path: Sequence[Any]) -> list[str]:
    return [next((str(getattr(k, a)) for a in ("key", "name", "idx") if hasattr(k, a)),
                 str(k)) for k in path]


def to_saveable(tree: Any, *, snapshot: bool = False) -> Any:
    """The tree handed to Orbax's save, after :func:`check_saveable`.

    With ``snapshot`` (an async save), numpy arrays are copied: the caller may change them
    in place as soon as ``save`` returns (an EMA buffer, a numpy loop), while the write
    reads them later. JAX arrays are immutable (a donated buffer is not reused while the
    save holds it), so they are never copied.

    A numpy scalar (``np.float32(0.1)``, ``np.bool_``, ``ml_dtypes.bfloat16``) becomes a
    0-d array of its dtype: Orbax's scalar handler would store it as a Python number
    (losing its dtype) or not at all (bool, bfloat16, float8: a failure in the background
    write; complex: a checkpoint Orbax cannot read back).

    Typed PRNG keys become their raw ``uint32`` key data (readable by any Orbax user, and
    wrapped back into a typed key of the target's impl on restore). Python ``int``,
    ``float`` and ``bool`` leaves are left to Orbax, which stores them as 0-d int64,
    float64 and bool values and reads them back as the same Python type: a Flax
    ``TrainState.create`` step of ``0`` comes back as ``0``, an int. Into an array target
    leaf, such a value takes the array's dtype (see the module docstring).

    Raises:
      TypeError: a leaf cannot be saved (see :func:`check_saveable`).
    """
    check_saveable(tree)

    def leaf(x: Any) -> Any:
        if is_prng_key(x):
            return jax.random.key_data(x)
        if snapshot and isinstance(x, np.ndarray):
            return np.array(x, copy=True)
        if isinstance(x, np.generic):
            return np.asarray(x)
        return x
    return jax.tree.map(leaf, tree)


@dataclasses.dataclass(frozen=True)
class Pinned:
    """A single-process CPU state whose array buffers are pinned by host views (see
    :func:`pinned_on_host`)."""

    tree: Any
    views: list[np.ndarray]
    shardings: list[jax.sharding.Sharding]

    def arrays(self) -> Any:
        """``tree`` with each ``jax.Array`` replaced by a new one over the same pinned
        buffer (no copy): what Orbax is given, so that the caller's arrays, donated or
        deleted since, are never touched by the write."""
        if not self.views:
            return self.tree
        placed = iter(jax.device_put(self.views, self.shardings, may_alias=True))
        return jax.tree.map(lambda x: next(placed) if isinstance(x, jax.Array) else x,
                            self.tree)


def pinned_on_host(tree: Any) -> Pinned | None:
    """``tree`` with views of the buffers of its ``jax.Array`` leaves, when each one lives
    whole on one CPU device of a single-process run; else None.

    While a view of a buffer exists, XLA does not donate that buffer (a jitted step that
    donates the array copies it instead) and ``Array.delete()`` does not free it. Holding
    the views, an async save of a CPU state hands the arrays to Orbax on the background
    thread, and ``save()`` returns without Orbax's ~10-30 ms of preparing a write (thread
    starts, per-array bookkeeping). On an accelerator a view would be a copy, and in a
    multi-process run every process enters Orbax's save together: there the arrays go to
    Orbax before ``save()`` returns.
    """
    if jax.process_count() != 1:
        return None
    views, shardings = [], []
    for x in jax.tree.leaves(tree):
        if not isinstance(x, jax.Array):
            continue
        if not _one_cpu_device(x.sharding):
            return None
        view = np.asarray(x)
        if view.__array_interface__["data"][0] != x.unsafe_buffer_pointer():
            return None  # a copy (an unusual layout): it would not hold the buffer
        views.append(view)
        shardings.append(x.sharding)
    return Pinned(tree, views, shardings)


@per_sharding
def _one_cpu_device(sharding: jax.sharding.Sharding) -> bool:
    devices = sharding.device_set
    return len(devices) == 1 and next(iter(devices)).platform == "cpu"


# -- restore side -----------------------------------------------------------------------


class SavedLeaves(dict):
    """``{leaf path: SavedLeaf}``: a saved tree known from its manifest, not Orbax."""

    @classmethod
    def from_json(cls, saved: Any) -> "SavedLeaves":
        """A manifest's ``arrays.saved`` record, parsed (once: a restore plans from it).

        Raises:
          ValueError: a malformed record, named by its leaf path.
        """
        if not isinstance(saved, dict):
            raise ValueError("'arrays.saved' must be an object")
        out = cls()
        for path, d in saved.items():
            try:
                out[path] = SavedLeaf.from_json(d)
            except (ValueError, TypeError, KeyError, AttributeError):
                raise ValueError(f"malformed saved leaf record for {path!r}: {d!r}") from None
        return out

    def under(self, prefix: str) -> "SavedLeaves | None":
        """The leaves below ``prefix`` (``"params/"``; paths relative to it); None when
        there are none (the caller then asks Orbax, whose error names what is saved)."""
        if not prefix:
            return self or None
        out = SavedLeaves((path[len(prefix):], leaf) for path, leaf in self.items()
                          if path.startswith(prefix))
        return out or None


@dataclasses.dataclass(frozen=True)
class RestorePlan:
    """How to restore one saved tree into one target.

    Attributes:
      abstract: what to hand Orbax's restore (the target's pytree, each leaf a
        ``jax.ShapeDtypeStruct`` with a sharding, a numpy array or a Python scalar).
      finish: maps Orbax's result to the target's own leaf kinds (typed keys rewrapped,
        numpy stays numpy, Python scalars stay Python scalars, arrays placed like the
        target).
    """

    abstract: Any
    finish: Callable[[Any], Any]


@dataclasses.dataclass(frozen=True)
class _LeafPlan:
    abstract: Any
    finish: Callable[[Any], Any]


def restore_plan(saved_tree: Any, target: Any, step: int | None = None) -> RestorePlan:
    """Check ``target`` against ``saved_tree`` and plan the restore into it.

    Args:
      saved_tree: the saved item's metadata tree (Orbax ``item_metadata(...).tree``), its
        leaves as the manifest records them (:class:`SavedLeaves`, with a target), or
        None to trust ``target`` (no checks; a saved Python scalar then restores through
        Orbax's own conversion).
      target: any pytree of ``jax.Array``, ``jax.ShapeDtypeStruct`` (with or without a
        sharding), typed or raw PRNG keys, numpy arrays and scalars, Python scalars and
        ``None``; or None for the saved tree as numpy arrays (Python scalars as saved).
      step: the checkpoint's step, for messages.

    Raises:
      RestoreStructureError: leaves missing on either side, or differing in shape or
        dtype; each listed by path, with the fix.
      TypeError: a target leaf is not an array, abstract array or Python scalar.
    """
    if target is None:
        return _saved_plan(saved_tree)
    flat, treedef = jax.tree_util.tree_flatten_with_path(target)
    paths = [path_str(p) for p, _ in flat]
    leaves = [x for _, x in flat]
    _check_target_leaves(paths, leaves)
    saved = None if saved_tree is None else (
        saved_tree if isinstance(saved_tree, SavedLeaves) else _saved_leaves(saved_tree))
    if saved is not None:
        _check_against_saved(saved, dict(zip(paths, leaves)), step)
    plans = [_leaf_plan(p, x, None if saved is None else saved[p])
             for p, x in zip(paths, leaves)]
    return _assemble(treedef, plans)


def _assemble(treedef: Any, plans: list[_LeafPlan]) -> RestorePlan:
    def finish(restored: Any) -> Any:
        values = treedef.flatten_up_to(restored)
        return treedef.unflatten([p.finish(v) for p, v in zip(plans, values)])
    return RestorePlan(treedef.unflatten([p.abstract for p in plans]), finish)


def _saved_leaves(saved_tree: Any) -> dict[str, Any]:
    flat, _ = jax.tree_util.tree_flatten_with_path(saved_tree, is_leaf=_is_saved_leaf)
    return {path_str(p): m for p, m in flat}


def _check_target_leaves(paths: list[str], leaves: list[Any]) -> None:
    bad = [f"  {p or '<root>'}: a {type(x).__qualname__}" for p, x in zip(paths, leaves)
           if not isinstance(x, (jax.Array, jax.ShapeDtypeStruct, np.ndarray, np.generic)
                             + _PY_SCALARS)]
    if bad:
        raise TypeError("restore target leaves must be arrays, jax.ShapeDtypeStruct or "
                        "Python scalars; these are not:\n" + "\n".join(bad) +
                        "\nMark such fields static (flax.struct.field(pytree_node=False)) "
                        "or build the target from the same code that built the saved state.")


def _expected(x: Any) -> tuple[tuple, Any]:
    """Shape and dtype of what is saved for target leaf ``x``."""
    if is_prng_key(x):
        data = jax.eval_shape(jax.random.key_data, x)
        return tuple(data.shape), np.dtype(data.dtype)
    if _is_python_scalar(x):
        return (), None
    return tuple(x.shape), np.dtype(x.dtype)


def _shape_problem(path: str, x: Any, meta: Any) -> str | None:
    if not is_array_metadata(meta):
        return f"  {path}: checkpoint holds a {type(meta).__name__}, not an array"
    shape = _expected(x)[0]
    if tuple(meta.shape) != shape:
        line = f"  {path}: checkpoint shape {tuple(meta.shape)}, target shape {shape}"
        if is_prng_key(x) and tuple(meta.shape[:-1]) == shape[:-1]:
            impl = key_impl(x)
            line += (f" (the key data of a typed PRNG key: the target's impl "
                     f"{str(getattr(impl, 'name', impl))!r} has {shape[-1]} words per key, "
                     f"the saved key {meta.shape[-1]}; build the target's key with the saved "
                     "impl, e.g. jax.random.key(0, impl='rbg'))")
        return line
    return None


def _dtype_problem(path: str, x: Any, meta: Any) -> str | None:
    saved = np.dtype(meta.dtype)
    if _is_python_scalar(x):
        wanted = type(x).__name__
        if _kind(saved) != wanted:
            return f"  {path}: checkpoint dtype {saved}, target is a Python {wanted}"
        return None
    dtype = _expected(x)[1]
    if _saved_as_python_scalar(meta):
        if _kind(saved) == _kind(dtype) or (_kind(saved), _kind(dtype)) == ("int", "float"):
            return None
        return f"  {path}: checkpoint holds a Python {_kind(saved)}, target dtype {dtype}"
    if saved != dtype:
        return f"  {path}: checkpoint dtype {saved}, target dtype {dtype}"
    return None


def _matching_subtrees(saved: dict[str, Any], wanted: dict[str, Any],
                       differing: list[str]) -> list[str]:
    """Top-level names under which target and checkpoint agree, when others differ."""
    top = lambda key: key.split("/", 1)[0]  # noqa: E731
    bad = {top(k) for k in differing}
    return sorted({top(k) for k in wanted} & {top(k) for k in saved} - bad)


def _check_against_saved(saved: dict[str, Any], wanted: dict[str, Any], step: Any) -> None:
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    both = sorted(set(saved) & set(wanted))
    shapes = {k: line for k in both
              if (line := _shape_problem(k, wanted[k], saved[k])) is not None}
    dtypes = [line for k in both if k not in shapes
              and (line := _dtype_problem(k, wanted[k], saved[k])) is not None]
    if not (missing or extra or shapes or dtypes):
        return
    at = f" step {step}" if step is not None else ""
    lines = [f"restore target does not match checkpoint{at}:"]
    if missing:
        lines.append(f"  in target, not in checkpoint: {missing}")
    if extra:
        lines.append(f"  in checkpoint, not in target: {extra}")
    lines += list(shapes.values()) + dtypes
    if missing or extra or shapes:
        lines.append("Build the target from the same model/optimizer config that wrote the "
                     "checkpoint, or restore with target=None to get the saved arrays as "
                     "numpy.")
        same = _matching_subtrees(saved, wanted, [*missing, *extra, *shapes])
        if same:
            name = "params" if "params" in same else same[0]
            lines.append(f"These parts match: {same}. To take one of them alone (the params "
                         f"for a new optimizer), restore(..., target=state.{name}, "
                         f"subtree={name!r}).")
    if dtypes:
        lines.append("Nothing is cast silently: restore with target=None, or build the target "
                     "with the saved dtype (e.g. jax.ShapeDtypeStruct(shape, saved_dtype, "
                     "sharding=...)) and cast after restoring.")
    raise RestoreStructureError("\n".join(lines))


def _leaf_plan(path: str, x: Any, meta: Any) -> _LeafPlan:
    if _is_python_scalar(x):
        kind = type(x)
        return _LeafPlan(kind(), kind)
    if is_prng_key(x):
        return _key_plan(x)
    if isinstance(x, (np.ndarray, np.generic)):
        return _numpy_plan(path, x, meta)
    return _array_plan(path, x, meta)


def _target_sharding(x: Any) -> jax.sharding.Sharding:
    # A numpy array has no sharding; a ShapeDtypeStruct may have none.
    return getattr(x, "sharding", None) or _local_sharding()


def _placed(value: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    # Orbax hands back numpy for leaves it read as host values; the target wants devices.
    return value if isinstance(value, jax.Array) else jax.device_put(value, sharding)


def _key_plan(x: Any) -> _LeafPlan:
    data = jax.eval_shape(jax.random.key_data, x)
    sharding = key_data_sharding(_target_sharding(x), data.ndim)
    impl = key_impl(x)
    abstract = jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
    return _LeafPlan(abstract, lambda v: jax.random.wrap_key_data(_placed(v, sharding),
                                                                  impl=impl))


def _array_plan(path: str, x: Any, meta: Any) -> _LeafPlan:
    sharding = _target_sharding(x)
    dtype = np.dtype(x.dtype)
    if meta is not None and _saved_as_python_scalar(meta):
        return _LeafPlan(_python_zero(meta),
                         lambda v: _placed(_weak_scalar(path, v, dtype), sharding))
    abstract = jax.ShapeDtypeStruct(tuple(x.shape), dtype, sharding=sharding)
    return _LeafPlan(abstract, lambda v: _placed(v, sharding))


def _numpy_plan(path: str, x: Any, meta: Any) -> _LeafPlan:
    dtype = np.dtype(x.dtype)
    again = dtype.type if isinstance(x, np.generic) else np.asarray
    if meta is not None and _saved_as_python_scalar(meta):
        return _LeafPlan(_python_zero(meta), lambda v: again(_weak_scalar(path, v, dtype)))
    # Orbax reads into numpy when handed a numpy array of the saved shape and dtype.
    return _LeafPlan(np.asarray(x), lambda v: again(np.asarray(v)))


def _python_zero(meta: Any) -> Any:
    """A Python scalar of the saved kind: Orbax then reads the value as that type."""
    return {"bool": False, "int": 0, "float": 0.0, "complex": 0j}[_kind(meta.dtype)]


def _weak_scalar(path: str, value: Any, dtype: np.dtype) -> np.ndarray:
    """A saved Python scalar in ``dtype``, as JAX converts a weakly typed scalar; an
    integer that does not fit is refused, not wrapped around."""
    if isinstance(value, (np.ndarray, np.generic)):
        value = value.item()
    if _kind(dtype) == "int" and isinstance(value, int) and not isinstance(value, bool):
        info = np.iinfo(dtype)
        if not info.min <= value <= info.max:
            raise RestoreStructureError(
                f"restore target leaf {path} has dtype {dtype}, but the checkpoint holds the "
                f"Python int {value}, which does not fit. Build the target with a wider "
                "dtype (or a Python int), or restore with target=None.")
    return np.asarray(value, dtype=dtype)


def _saved_plan(saved_tree: Any) -> RestorePlan:
    """target=None: arrays as numpy on the local host, Python scalars as saved."""
    leaves, treedef = jax.tree_util.tree_flatten(saved_tree, is_leaf=_is_saved_leaf)
    plans = []
    for meta in leaves:
        if _saved_as_python_scalar(meta):
            plans.append(_LeafPlan(_python_zero(meta), lambda v: v))
        elif isinstance(meta, ocp_metadata.StringMetadata):
            plans.append(_LeafPlan("", lambda v: v))  # foreign checkpoints may hold text
        elif is_array_metadata(meta):
            plans.append(_LeafPlan(_numpy_placeholder(meta), np.asarray))
        else:
            plans.append(_LeafPlan(meta, np.asarray))
    return _assemble(treedef, plans)


def _numpy_placeholder(meta: Any) -> np.ndarray:
    """A numpy "array" of the saved shape and dtype that takes no memory: Orbax reads a
    numpy leaf as numpy, in the saved dtype (a JAX target would turn float64 into float32
    unless x64 is on), whatever topology wrote it."""
    return np.broadcast_to(np.zeros((), np.dtype(meta.dtype)), tuple(meta.shape))


def local_abstract(meta: Any) -> Any:
    """A saved array's shape and dtype on this host's first device (any topology)."""
    if not is_array_metadata(meta):
        return meta
    return jax.ShapeDtypeStruct(tuple(meta.shape), meta.dtype, sharding=_local_sharding())


def key_impl(x: Any) -> Any:
    """The PRNG implementation of a typed key, concrete or abstract (ShapeDtypeStruct)."""
    if isinstance(x, jax.Array):
        return jax.random.key_impl(x)
    # key_impl takes arrays only; under tracing an abstract key is one.
    found = []
    jax.eval_shape(lambda k: found.append(jax.random.key_impl(k)), x)
    return found[0]


def key_data_sharding(sharding: Any, ndim: int) -> Any:
    """A typed key's sharding, extended over the trailing key-data axis (replicated)."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[:ndim]))
    return sharding


# -- the manager's current calls (kept until it calls restore_plan) ----------------------


def check_structure(saved_tree: Any, target: Any, step: int) -> None:
    """Raise :class:`RestoreStructureError` when ``target`` does not fit ``saved_tree``."""
    restore_plan(saved_tree, target, step)


def abstract_target(target: Any) -> tuple[Any, Callable[[Any], Any]]:
    """``(abstract, rewrap)`` for ``target``, trusting that it fits what was saved."""
    plan = restore_plan(None, target)
    return plan.abstract, plan.finish
