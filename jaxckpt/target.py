"""Restore targets: any user pytree in, the same pytree out.

Orbax restores arrays into abstract targets (``jax.ShapeDtypeStruct`` with shardings). A
user hands a concrete state: a Flax ``TrainState``, NNX state, optax states, dicts,
dataclasses, with typed PRNG keys among the leaves. This module converts between the two
and checks the saved structure against the target, naming every differing leaf.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np

from jaxckpt.errors import RestoreStructureError

__all__ = ["to_saveable", "is_array_metadata", "local_abstract", "check_structure",
           "abstract_target", "path_str"]


def is_prng_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_saveable(tree: Any) -> Any:
    """Typed PRNG keys become their raw key data (what Orbax can store)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if is_prng_key(x) else x, tree)


def is_array_metadata(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def local_abstract(meta: Any) -> Any:
    if not is_array_metadata(meta):
        return meta
    return jax.ShapeDtypeStruct(tuple(meta.shape), meta.dtype,
                                sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))


def path_str(path: Sequence[Any]) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def leaf_shapes(tree: Any, is_leaf=None) -> dict[str, tuple]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    out = {}
    for path, leaf in flat:
        out[path_str(path)] = tuple(getattr(leaf, "shape", np.shape(leaf)))
    return out


def check_structure(saved_tree: Any, target: Any, step: int) -> None:
    saved = leaf_shapes(saved_tree, is_leaf=is_array_metadata)
    wanted = leaf_shapes(to_saveable_abstract(target))
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    shapes = sorted(k for k in set(saved) & set(wanted) if saved[k] != wanted[k])
    if not (missing or extra or shapes):
        return
    lines = [f"restore target does not match checkpoint step {step}:"]
    if missing:
        lines.append(f"  in target, not in checkpoint: {missing}")
    if extra:
        lines.append(f"  in checkpoint, not in target: {extra}")
    for k in shapes:
        lines.append(f"  {k}: checkpoint shape {saved[k]}, target shape {wanted[k]}")
    lines.append("Build the target from the same model/optimizer config that wrote the "
                 "checkpoint, or restore with target=None to get the saved arrays as numpy.")
    raise RestoreStructureError("\n".join(lines))


def to_saveable_abstract(target: Any) -> Any:
    def one(x):
        if is_prng_key(x):
            return jax.eval_shape(jax.random.key_data, x)
        return x
    return jax.tree.map(one, target)


def abstract_target(target: Any) -> tuple[Any, Callable[[Any], Any]]:
    """The Orbax restore target for ``target`` and a function undoing the key conversion."""
    is_key = jax.tree.map(is_prng_key, target)
    impls = jax.tree.map(lambda x: key_impl(x) if is_prng_key(x) else None, target)
    host = jax.tree.map(lambda x: isinstance(x, (np.ndarray, np.generic)), target)
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def one(x):
        if is_prng_key(x):
            data = jax.eval_shape(jax.random.key_data, x)
            sharding = getattr(x, "sharding", None) or local
            return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=key_data_sharding(
                sharding, data.ndim))
        sharding = getattr(x, "sharding", None)
        if isinstance(x, (np.ndarray, np.generic)) or sharding is None:
            sharding = local
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    abstract = jax.tree.map(one, target)

    def rewrap(restored):
        def back(x, key, impl, to_host):
            if key:
                return jax.random.wrap_key_data(x, impl=impl)
            return np.asarray(x) if to_host else x
        return jax.tree.map(back, restored, is_key, impls, host)

    return abstract, rewrap


def key_impl(x: Any) -> Any:
    """The PRNG implementation of a typed key, concrete or abstract (ShapeDtypeStruct)."""
    if isinstance(x, jax.Array):
        return jax.random.key_impl(x)
    return getattr(x.dtype, "_impl", None)  # a key dtype carries its impl


def key_data_sharding(sharding: Any, ndim: int) -> Any:
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[:ndim]))
    return sharding
