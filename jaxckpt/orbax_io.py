"""The only module that talks to Orbax: its manager for async saves, its checkpointer for
restores. Public Orbax API only.

Saves go through ``ocp.CheckpointManager`` (atomic finalize, async write, temporary
directory cleanup). Restores read one item directory with a ``PyTreeCheckpointer``, so a
checkpoint restores the same whoever wrote it: jaxckpt (item ``state``) or plain Orbax
(``default``, or named items of a Composite save).
"""

from __future__ import annotations

import logging
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from jaxckpt import format as fmt
from jaxckpt.policy import CheckpointPolicy

__all__ = ["new_manager", "save", "close_quietly", "pytree_items", "item_metadata",
           "restore_item"]

log = logging.getLogger("jaxckpt")


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    """Orbax's PyTree handler without zstd.

    Weights and Adam moments are float noise: zstd shrinks them ~9% yet costs ~1 CPU-s per
    GB on the training host, slows restore and holds a compressed copy of the state during
    the write (peak extra RAM 2.0x the state instead of 1.1x; bench/README.md). Files read
    back with either setting.
    """
    return ocp.PyTreeCheckpointHandler(use_compression=False)


def new_manager(directory: epath.Path, *, async_save: bool, read_only: bool,
                policy: CheckpointPolicy) -> ocp.CheckpointManager:
    """An Orbax manager that saves what it is told and deletes nothing (jaxckpt decides).

    With a monitored metric, Orbax also stores each step's metrics in its ``metrics`` item,
    where a plain ``ocp.CheckpointManager(best_fn=...)`` finds them.
    """
    monitor = policy.monitor
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only,
        create=not read_only,
        read_only=read_only,
        best_fn=(lambda m: m[monitor]) if monitor else None,
        best_mode=policy.resolved_mode,
    )
    handlers = {fmt.STATE: _state_handler(), fmt.META: ocp.JsonCheckpointHandler(),
                fmt.DATA_STATE: ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict,
         data_state: dict | None, metrics: dict[str, float] | None) -> None:
    items = {fmt.STATE: ocp.args.PyTreeSave(state), fmt.META: ocp.args.JsonSave(meta)}
    if data_state is not None:
        items[fmt.DATA_STATE] = ocp.args.JsonSave(data_state)
    manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)


def close_quietly(manager: ocp.CheckpointManager, reported: BaseException | None) -> None:
    """Close ``manager`` after a failed save.

    Orbax keeps a failed save's error in several places and raises it again at later
    calls: once per calling thread, and once per queued metadata write. Each close drains
    one; ``reported`` (the error being raised to the user) is not logged again.
    """
    for _ in range(5):
        try:
            manager.close()
            return
        except Exception as again:  # noqa: BLE001 - the error being reported, or logged
            if reported is None or (again is not reported and again is not reported.__cause__):
                log.error("another background error in %s: %r", manager.directory, again)


def pytree_items(step_dir: epath.Path) -> list[str]:
    """Items of a step that hold a PyTree (``state``, ``default``, or user-named)."""
    out = []
    for child in sorted(step_dir.iterdir(), key=lambda p: p.name):
        if child.is_dir() and ((child / "_METADATA").exists()
                               or (child / "manifest.ocdbt").exists()):
            out.append(child.name)
    return out


def item_metadata(item_dir: epath.Path) -> Any:
    """The saved tree of an item: ``ArrayMetadata`` leaves (shape, dtype) and scalars."""
    meta = ocp.PyTreeCheckpointer().metadata(item_dir)
    meta = getattr(meta, "item_metadata", meta)
    return meta.tree if hasattr(meta, "tree") else meta


def restore_item(item_dir: epath.Path, abstract: Any) -> Any:
    """Read an item into ``abstract`` (``jax.ShapeDtypeStruct`` leaves with shardings)."""
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
    return ocp.PyTreeCheckpointer().restore(
        item_dir, args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args))
