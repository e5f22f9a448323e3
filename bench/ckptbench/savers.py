"""jaxckpt and raw Orbax behind one interface, so every phase treats them alike.

Both go through public API only. Raw Orbax is what a user who knows Orbax would write
for the same job: an async ``orbax.checkpoint.CheckpointManager`` keeping two
checkpoints (jaxckpt keeps the best and the latest), the state in a
``PyTreeCheckpointHandler`` with the same storage settings as jaxckpt's (no zstd:
float noise compresses by ~9% at ~1 CPU-s per GB; see bench/README.md), and the step's
metrics in a JSON item beside it.
"""

from __future__ import annotations

import time
from typing import Any

ORBAX_STATE_OPTIONS = {"use_compression": False}
ORBAX_MAX_TO_KEEP = 2


class JaxckptSaver:
    """``jaxckpt.CheckpointManager`` keeping the best (by ``loss``) and the latest."""

    kind = "jaxckpt"

    def __init__(self, directory: str, async_save: bool = True):
        import jaxckpt

        self.directory = directory
        self.policy = jaxckpt.CheckpointPolicy(monitor="loss", keep_best=1, keep_latest=1)
        self._m = jaxckpt.CheckpointManager(directory, self.policy, async_save=async_save)

    def save(self, step: int, state: Any, loss: float) -> float:
        """Save ``state``; returns the seconds the call blocked the caller."""
        t = time.perf_counter()
        self._m.save(step, state, metrics={"loss": loss})
        return time.perf_counter() - t

    def wait(self) -> None:
        self._m.wait()

    def settled(self) -> None:
        """Block until the checkpoints the last saves replaced are gone from the disk.

        ``wait()`` returns once a replaced checkpoint is renamed out of sight
        (``.jaxckpt-deleting-*``); its files are removed on a thread of their own after
        that. A phase that measures the CPU a save costs waits for this too
        (``wait(reclaimed=True)``: a join, as Orbax's own wait; polling the directory
        every 5 ms cost ~5 ms of CPU per 0.3 s removal), and no phase leaves it running
        into another process's measurement. Raw Orbax removes inside
        ``wait_until_finished``: its ``settled`` has nothing to wait for.
        """
        self._m.wait(reclaimed=True)

    def restore(self, step: int, target: Any) -> Any:
        return self._m.restore(step, target=target)

    def verify(self) -> Any:
        return self._m.verify()

    def step_dir(self, step: int) -> str:
        return f"{self.directory}/{step}"

    def close(self) -> None:
        self._m.close()


class OrbaxSaver:
    """A raw async ``orbax.checkpoint.CheckpointManager`` (see the module docstring)."""

    kind = "orbax"

    def __init__(self, directory: str, state_options: dict | None = None):
        import orbax.checkpoint as ocp

        self.directory = directory
        self.state_options = dict(ORBAX_STATE_OPTIONS if state_options is None
                                  else state_options)
        self._ocp = ocp
        self._m = ocp.CheckpointManager(
            directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=ORBAX_MAX_TO_KEEP,
                                                 enable_async_checkpointing=True),
            item_handlers={"state": ocp.PyTreeCheckpointHandler(**self.state_options),
                           "meta": ocp.JsonCheckpointHandler()})

    def save(self, step: int, state: Any, loss: float) -> float:
        ocp = self._ocp
        t = time.perf_counter()
        self._m.save(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(state),
            meta=ocp.args.JsonSave({"step": step, "metrics": {"loss": loss}})))
        return time.perf_counter() - t

    def wait(self) -> None:
        self._m.wait_until_finished()

    def settled(self) -> None:
        """Nothing runs after ``wait()`` (see ``JaxckptSaver.settled``)."""

    def restore(self, step: int, target: Any) -> Any:
        ocp = self._ocp
        args = ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))
        return self._m.restore(step, args=ocp.args.Composite(state=args))["state"]

    def step_dir(self, step: int) -> str:
        return f"{self.directory}/{step}"

    def close(self) -> None:
        self._m.close()


def describe() -> dict:
    """How the raw Orbax side is configured, for the result document."""
    return {"manager": "orbax.checkpoint.CheckpointManager, async",
            "max_to_keep": ORBAX_MAX_TO_KEEP,
            "state_handler": f"PyTreeCheckpointHandler(**{ORBAX_STATE_OPTIONS})",
            "items": ["state (PyTreeSave/PyTreeRestore)", "meta (JsonSave)"]}
