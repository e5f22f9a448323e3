"""Where the train state and the batches live, and the compiled steps that use them.

Synopsis::

    initialize_distributed()                   # a no-op on one machine
    mesh = make_mesh(fsdp=1)                   # ("data", "fsdp") over all devices of all processes
    shardings = state_sharding(state, mesh)    # replicated; FSDP when the mesh's fsdp axis is > 1
    state = shard_state(state, mesh)
    train_step = make_train_step(loss_fn, mesh, shardings)
    for batch in batches:                      # this process's rows of the global batch
        state, metrics = train_step(state, shard_batch(batch, mesh))

Every step builder here takes the same loss function::

    loss_fn(params, batch, rng, state) -> (loss, metrics)
    loss_fn(params, batch, rng, state) -> (loss, metrics, new_extras)

``loss`` is the scalar mean over ``batch``, ``metrics`` a dict of scalar means (accuracy, ...),
and ``new_extras``, when returned, replaces ``state.extras`` (e.g. BatchNorm statistics).
``rng`` is ``state.step_rng()``, so a resumed run draws the keys an uninterrupted run would.
A train step returns ``(new_state, {"loss": loss, **metrics})``, an eval step the metrics
alone; metrics are scalars averaged over the global batch in every mode.

One jitted step serves one device, data parallelism and FSDP: they differ only in the mesh
and the shardings, never in the code. The ``pmap`` mode, for pmap-era code, runs the same step
body with ``lax.pmean`` over a leading device axis; :func:`unreplicate` turns its state into an
ordinary :class:`~jaxckpt.state.TrainState`, so checkpoints hold one copy and restore in either
mode, on any device count.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

__all__ = ["DATA_AXIS", "FSDP_AXIS", "BATCH_AXES", "initialize_distributed", "make_mesh",
           "fsdp_spec", "state_sharding", "shard_state", "abstract_state", "batch_sharding",
           "shard_batch", "make_train_step", "make_eval_step", "replicate", "unreplicate",
           "split_batch", "make_pmap_train_step", "make_pmap_eval_step"]

logger = logging.getLogger(__name__)

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
# FSDP is data parallelism whose parameters are also split: every device, along either axis,
# sees different examples, so the batch is split over both axes.
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
# Only these TrainState fields (or checkpoint-tree keys) are FSDP-sharded: step, rng and
# extras are small, and an rng of shape (2,) must not be split just because 2 divides it.
_FSDP_FIELDS = ("params", "opt_state")

LossFn = Callable[..., tuple]


# --- processes and meshes -----------------------------------------------------------------


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Join the processes of a multi-host run into one JAX runtime, before any JAX call.

    A no-op (returns False) for a single process: ``num_processes`` of 1, or no arguments
    with neither ``JAX_COORDINATOR_ADDRESS`` nor a cluster JAX detects (TPU pod, SLURM,
    Open MPI, Kubernetes). Otherwise wraps :func:`jax.distributed.initialize`, after choosing
    gloo for CPU collectives (without it CPU processes cannot all-reduce). Safe to call twice.

    Returns:
      True when the process is part of an initialized distributed runtime.
    """
    if jax.distributed.is_initialized():
        return True
    if num_processes == 1:
        return False
    explicit = (coordinator_address, num_processes, process_id) != (None, None, None)
    if not (explicit or os.environ.get("JAX_COORDINATOR_ADDRESS") or _cluster_detected()):
        return False
    if jax.config.jax_cpu_collectives_implementation in (None, "none", "gloo"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    logger.info("joined distributed runtime: process %d of %d, %d global devices",
                jax.process_index(), jax.process_count(), jax.device_count())
    return True


def _cluster_detected() -> bool:
    """Whether JAX's own auto-detection would find a cluster (opt-in methods excluded)."""
    try:
        from jax._src.clusters import ClusterEnv  # private, hence the guard
    except ImportError:
        return False
    return any(not env.opt_in_only_method and env.is_env_present()
               for env in ClusterEnv._cluster_types)


def make_mesh(data: int | None = None, fsdp: int = 1, *,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``("data", "fsdp")`` mesh over all devices of all processes, or the first data*fsdp.

    Args:
      data: size of the data axis; default: every device not used by ``fsdp``.
      fsdp: size of the FSDP axis (1: plain data parallelism).
      devices: devices to use, default ``jax.devices()``. A smaller mesh than the device
        list (a sub-mesh) takes its first devices; in multi-process runs every process
        must own some of them.

    Returns:
      A mesh with both axes always present, so shardings never depend on the mode.
    """
    devices = list(jax.devices() if devices is None else devices)
    if fsdp < 1:
        raise ValueError(f"fsdp must be >= 1, got {fsdp}.")
    if data is None:
        if len(devices) % fsdp:
            raise ValueError(f"fsdp={fsdp} does not divide the {len(devices)} devices; "
                             f"pass data= explicitly to use a sub-mesh.")
        data = len(devices) // fsdp
    if data < 1 or data * fsdp > len(devices):
        raise ValueError(f"a data={data} x fsdp={fsdp} mesh needs {data * fsdp} devices; "
                         f"{len(devices)} are available.")
    # jax.make_mesh orders devices for the physical topology (TPU rings); Auto axes keep
    # jit's classic in/out_shardings semantics instead of explicit-sharding types.
    mesh = jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=(AxisType.Auto,) * 2,
                         devices=devices)
    logger.debug("mesh %s over %d of %d devices", dict(mesh.shape), data * fsdp, len(devices))
    return mesh


# --- the train state --------------------------------------------------------------------


def fsdp_spec(shape: Sequence[int], axis_size: int, axis: str = FSDP_AXIS) -> P:
    """Split the largest dimension that ``axis_size`` divides; replicate if none does.

    The largest dimension gives the smallest shards and the fewest gathers per byte.
    """
    if axis_size > 1:
        for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if shape[dim] > 0 and shape[dim] % axis_size == 0:
                return P(*(axis if d == dim else None for d in range(len(shape))))
    return P()


def state_sharding(state: Any, mesh: Mesh, *, fsdp: bool | None = None) -> Any:
    """The ``NamedSharding`` of every leaf of a TrainState (or its checkpoint-tree dict).

    Args:
      state: a TrainState or ``{"params": ..., "opt_state": ..., ...}`` tree of arrays or
        ``jax.ShapeDtypeStruct`` (so it can describe a restore target).
      mesh: a :func:`make_mesh` mesh.
      fsdp: shard params and optimizer state along the fsdp axis (see :func:`fsdp_spec`);
        None: when the mesh's fsdp axis is larger than 1. Other fields stay replicated.

    Returns:
      The same tree with a ``NamedSharding`` per leaf: jit's in/out_shardings for the state.
    """
    size = 1 if fsdp is False else mesh.shape[FSDP_AXIS]

    def leaf(path, x):
        shard = _field_name(path) in _FSDP_FIELDS
        return NamedSharding(mesh, fsdp_spec(np.shape(x), size if shard else 1))

    return jax.tree_util.tree_map_with_path(leaf, state)


def _field_name(path: tuple) -> Any:
    """The top-level field a leaf belongs to: an attribute name or a dict key."""
    if not path:
        return None
    first = path[0]
    return getattr(first, "name", getattr(first, "key", None))


def shard_state(state: Any, mesh: Mesh, *, fsdp: bool | None = None) -> Any:
    """Place a state (on host, one device or another mesh) as :func:`state_sharding` says.

    Buffers already in place are reused, not copied: once a donating step has consumed the
    result, the state passed in may be gone too. Rebind: ``state = shard_state(state, mesh)``.
    """
    return jax.device_put(state, state_sharding(state, mesh, fsdp=fsdp))


def abstract_state(state: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves carrying ``shardings``: a restore target, no memory."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)


# --- batches ----------------------------------------------------------------------------


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Split the leading (example) axis over every device of the mesh."""
    return NamedSharding(mesh, P(BATCH_AXES))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """A global batch array from this process's rows (all rows when there is one process).

    Each process passes its own slice; ``jax.make_array_from_process_local_data`` assembles
    the global array without any process holding the others' rows.
    """
    sharding = batch_sharding(mesh)
    local = len(mesh.local_devices)

    def put(path, x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim == 0 or x.shape[0] % local:
            raise ValueError(
                f"batch leaf {jax.tree_util.keystr(path)!r} has shape {x.shape}; its leading "
                f"axis must split evenly over this process's {local} devices of the mesh "
                f"{dict(mesh.shape)}. Use a batch size divisible by {local} (drop or pad the "
                f"last batch).")
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree_util.tree_map_with_path(put, batch)


# --- the step body, shared by jit and pmap ------------------------------------------------


def _split_output(out: Any) -> tuple[jax.Array, dict[str, Any], list]:
    """``(loss, metrics[, new_extras])`` -> loss, ``{"loss": ..., **metrics}``, [new_extras]."""
    if not isinstance(out, tuple) or len(out) not in (2, 3) or not isinstance(out[1], dict):
        raise TypeError("loss_fn must return (loss, metrics_dict) or "
                        f"(loss, metrics_dict, new_extras); got {type(out).__name__} "
                        f"{jax.tree.map(jnp.shape, out)}.")
    loss, metrics, *extras = out
    return loss, {**metrics, "loss": loss}, extras


def _pmean(tree: Any, axis_name: str | None) -> Any:
    """Average float leaves over the pmap axis; integer leaves are equal there already."""
    if axis_name is None:
        return tree
    return jax.tree.map(
        lambda x: jax.lax.pmean(x, axis_name) if jnp.issubdtype(x.dtype, jnp.inexact) else x,
        tree)


def _step_key(state: Any, axis_name: str | None) -> jax.Array:
    """``state.step_rng()``; under pmap each device folds in its index so that devices
    draw independent noise (the same key on every device would repeat dropout masks)."""
    if axis_name is None:
        return state.step_rng()
    return state.step_rng(jax.lax.axis_index(axis_name))


def _train_body(loss_fn: LossFn, axis_name: str | None = None) -> Callable:
    """One optimizer update. With ``axis_name`` (pmap), grads, metrics and extras are
    averaged over devices, which equals the global-batch mean since shards are equal."""

    def step(state, batch):
        rng = _step_key(state, axis_name)

        def objective(params):
            loss, metrics, extras = _split_output(loss_fn(params, batch, rng, state))
            return loss, (metrics, extras)

        (_, (metrics, extras)), grads = jax.value_and_grad(objective, has_aux=True)(
            state.params)
        grads, metrics, extras = _pmean((grads, metrics, extras), axis_name)
        changes = {"extras": extras[0]} if extras else {}
        return state.apply_gradients(grads, **changes), metrics

    return step


def _eval_body(loss_fn: LossFn, axis_name: str | None = None) -> Callable:
    """Loss and metrics of ``state.params`` on a batch; nothing is updated."""

    def step(state, batch):
        out = loss_fn(state.params, batch, _step_key(state, axis_name), state)
        return _pmean(_split_output(out)[1], axis_name)

    return step


# --- jit mode: one device, data parallel, FSDP ----------------------------------------------


def make_train_step(loss_fn: LossFn, mesh: Mesh, state_shardings: Any, *,
                    donate: bool = True) -> Callable:
    """A jitted ``step(state, batch) -> (new_state, metrics)`` on ``mesh``.

    Args:
      loss_fn: see the module docstring for the convention.
      mesh: the mesh; a 1-device mesh is the single-device case.
      state_shardings: :func:`state_sharding` of the state; the new state keeps them.
      donate: donate the input state's buffers (the caller must not reuse that state);
        halves peak memory for params and optimizer state.

    Returns:
      The step. Pass ``shard_batch(batch, mesh)``; metrics come back replicated scalars.
    """
    return jax.jit(_train_body(loss_fn),
                   in_shardings=(state_shardings, batch_sharding(mesh)),
                   out_shardings=(state_shardings, NamedSharding(mesh, P())),
                   donate_argnums=0 if donate else ())


def make_eval_step(loss_fn: LossFn, mesh: Mesh, state_shardings: Any) -> Callable:
    """A jitted ``step(state, batch) -> metrics`` (``"loss"`` included); the state is kept.

    ``loss_fn`` receives ``state.step_rng()``; pass one that ignores it (dropout off).
    """
    return jax.jit(_eval_body(loss_fn),
                   in_shardings=(state_shardings, batch_sharding(mesh)),
                   out_shardings=NamedSharding(mesh, P()))


# --- pmap mode ------------------------------------------------------------------------------


def replicate(tree: Any, devices: Sequence[jax.Device] | None = None) -> Any:
    """One copy of every leaf per local device, stacked on a new leading axis (pmap's input)."""
    devices = list(jax.local_devices() if devices is None else devices)
    sharding = NamedSharding(Mesh(np.asarray(devices), ("replica",)), P("replica"))

    def put(x):
        row = (x if isinstance(x, jax.Array) else np.asarray(x))[None]
        return jax.make_array_from_single_device_arrays(
            (len(devices),) + row.shape[1:], sharding,
            [jax.device_put(row, d) for d in devices])

    return jax.tree.map(put, tree)


def unreplicate(tree: Any) -> Any:
    """The first device's copy: an ordinary state, as checkpoints and jit mode expect."""
    return jax.tree.map(lambda x: x[0], tree)


def split_batch(batch: Any, n_devices: int | None = None) -> Any:
    """Reshape leading axes ``[rows, ...]`` to ``[n_devices, rows // n_devices, ...]``."""
    n = jax.local_device_count() if n_devices is None else n_devices

    def split(path, x):
        if np.ndim(x) == 0 or np.shape(x)[0] % n:
            raise ValueError(f"batch leaf {jax.tree_util.keystr(path)!r} has shape "
                             f"{np.shape(x)}; its leading axis must split evenly over {n} "
                             f"devices. Use a batch size divisible by {n}.")
        return x.reshape((n, x.shape[0] // n) + tuple(x.shape[1:]))

    return jax.tree_util.tree_map_with_path(split, batch)


def _pmap_devices(devices: Sequence[jax.Device] | None) -> tuple[list | None, int]:
    """pmap's device list and how many of them feed this process's batch."""
    if devices is None:
        return None, jax.local_device_count()
    devices = list(devices)
    return devices, sum(d.process_index == jax.process_index() for d in devices)


def make_pmap_train_step(loss_fn: LossFn, axis_name: str = DATA_AXIS, *, donate: bool = True,
                         devices: Sequence[jax.Device] | None = None) -> Callable:
    """A pmapped ``step(replicated_state, batch) -> (new_replicated_state, metrics)``.

    ``batch`` is this process's flat batch (split here with :func:`split_batch`); grads and
    metrics are ``lax.pmean``-ed, and metrics come back as scalars, as in jit mode.
    The state is :func:`replicate`-d; save ``unreplicate(state)``.
    """
    devices, n_local = _pmap_devices(devices)
    step = jax.pmap(_train_body(loss_fn, axis_name), axis_name=axis_name, devices=devices,
                    donate_argnums=0 if donate else ())

    def train_step(state, batch):
        state, metrics = step(state, split_batch(batch, n_local))
        return state, unreplicate(metrics)

    return train_step


def make_pmap_eval_step(loss_fn: LossFn, axis_name: str = DATA_AXIS, *,
                        devices: Sequence[jax.Device] | None = None) -> Callable:
    """A pmapped ``step(replicated_state, batch) -> metrics`` (scalars, ``"loss"`` included)."""
    devices, n_local = _pmap_devices(devices)
    step = jax.pmap(_eval_body(loss_fn, axis_name), axis_name=axis_name, devices=devices)
    return lambda state, batch: unreplicate(step(state, split_batch(batch, n_local)))
