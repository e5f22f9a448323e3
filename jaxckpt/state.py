"""The train state: everything a run needs to continue exactly where it stopped.

Synopsis::

    state = TrainState.create(params=model.init(key, x)["params"], tx=optax.adam(1e-3),
                              rng=0, apply_fn=model.apply)
    grads = jax.grad(loss)(state.params, batch, state.step_rng())
    state = state.apply_gradients(grads)

The state is a pytree whose leaves are arrays only (the optax transform and the apply
function are static), so it can be jitted, donated, sharded and checkpointed as is.
``rng`` is stored as raw ``uint32`` key data rather than a typed key: it round-trips
through any checkpoint format, and :meth:`TrainState.step_rng` derives a per-step key
with ``fold_in(rng, step)``, which makes an exact resume natural.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

__all__ = ["TrainState", "as_key_data", "nnx_split", "nnx_merge", "nnx_checkpoint_state",
           "nnx_restore_into"]


def as_key_data(rng: int | jax.Array) -> jax.Array:
    """An int seed, a legacy uint32 key or a typed key, as raw ``uint32`` key data."""
    if isinstance(rng, int):
        return jax.random.key_data(jax.random.key(rng))
    rng = jnp.asarray(rng)
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng)
    if rng.dtype != jnp.uint32:
        raise TypeError(f"rng must be an int seed or a PRNG key, got dtype {rng.dtype}.")
    return rng


class TrainState(struct.PyTreeNode):
    """Step, params, optax state, RNG and free-form extras (e.g. BatchNorm statistics).

    Attributes:
      step: number of optimizer updates applied so far (int32 scalar).
      params: the trainable parameters (any pytree).
      opt_state: the optax state for ``params``.
      rng: raw ``uint32`` key data; use :meth:`step_rng` for per-step randomness.
      tx: the optax transformation (static, not saved).
      extras: non-trainable state that must survive a restart (any pytree or None).
      apply_fn: the model's apply function (static, not saved), for convenience.
    """

    step: jax.Array
    params: Any
    opt_state: optax.OptState
    rng: jax.Array
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    extras: Any = None
    apply_fn: Callable[..., Any] | None = struct.field(pytree_node=False, default=None)

    @classmethod
    def create(cls, *, params: Any, tx: optax.GradientTransformation, rng: int | jax.Array = 0,
               extras: Any = None, apply_fn: Callable[..., Any] | None = None) -> "TrainState":
        """A fresh state at step 0 with ``tx.init(params)`` as its optimizer state."""
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                   rng=as_key_data(rng), tx=tx, extras=extras, apply_fn=apply_fn)

    def apply_gradients(self, grads: Any, **changes: Any) -> "TrainState":
        """One optimizer update; ``changes`` replace other fields (e.g. ``extras``)."""
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **changes)

    def step_rng(self, *fold: int | jax.Array) -> jax.Array:
        """The key for this step: ``fold_in(rng, step)`` (then any extra ``fold`` values)."""
        key = jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)
        for value in fold:
            key = jax.random.fold_in(key, value)
        return key

    def checkpoint_tree(self) -> dict[str, Any]:
        """The saved part of the state as plain nested containers (no static fields)."""
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state,
                "rng": self.rng, "extras": self.extras}


# --- Flax NNX -------------------------------------------------------------------------
# NNX modules are mutable Python objects; checkpoints need pure pytrees. The split below
# is the one Flax documents for Orbax: parameters go to ``params``; every other variable
# (BatchStat, RNG counters, ...) goes to ``extras`` so a restart restores it too.


def nnx_split(model: nnx.Module, tx: optax.GradientTransformation, rng: int | jax.Array = 0
              ) -> tuple[nnx.GraphDef, TrainState]:
    """Split an NNX module into its static graph and a :class:`TrainState` of its arrays.

    ``params`` holds the ``nnx.Param`` variables, ``extras`` every other variable
    (BatchStat, RNG counters, ...), both as ``nnx.State`` pytrees.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, TrainState.create(params=params, tx=tx, rng=rng, extras=rest)


def nnx_merge(graphdef: nnx.GraphDef, state: TrainState) -> nnx.Module:
    """Rebuild the NNX module from :func:`nnx_split`'s graph and a (restored) state."""
    return nnx.merge(graphdef, state.params, state.extras)


def nnx_checkpoint_state(model: nnx.Module, optimizer: nnx.Optimizer | None = None
                         ) -> dict[str, Any]:
    """A pure-dict pytree of an NNX model (and its ``nnx.Optimizer``) to pass to ``save``."""
    tree = {"model": nnx.to_pure_dict(nnx.state(model))}
    if optimizer is not None:
        tree["optimizer"] = nnx.to_pure_dict(nnx.state(optimizer))
    return tree


def nnx_restore_into(model: nnx.Module, optimizer: nnx.Optimizer | None,
                     tree: dict[str, Any]) -> None:
    """Write a restored :func:`nnx_checkpoint_state` tree back into live NNX objects."""
    for obj, key in ((model, "model"), (optimizer, "optimizer")):
        if obj is None:
            continue
        if key not in tree:
            raise KeyError(f"checkpoint has no {key!r} entry; it holds {sorted(tree)}.")
        live = nnx.state(obj)
        nnx.replace_by_pure_dict(live, tree[key])
        nnx.update(obj, live)
