"""One call to start or resume a training loop of your own.

In the spirit of Levanter's ``load_checkpoint_or_initialize``: the state's shapes come from
``jax.eval_shape`` of the init function, so no full-size concrete template is ever built.
With a checkpoint in the directory, the state is restored straight into those abstract
shapes (placed by ``shardings``); without one, the init function runs once, under
``jax.jit`` with ``out_shardings``, and each array is created where it belongs.

Synopsis::

    with jaxckpt.CheckpointManager(workdir, policy) as mngr:
        ckpt = jaxckpt.restore_or_init(mngr, create_state, jax.random.key(0))
        state, position = ckpt.state, ckpt.data_state or 0
        ...
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

from jaxckpt.catalog import Which
from jaxckpt.manager import Checkpoint, CheckpointManager

__all__ = ["restore_or_init"]


def restore_or_init(manager: CheckpointManager, init_fn: Callable[..., Any], *args: Any,
                    shardings: Any = None, which: Which = "latest", **kwargs: Any
                    ) -> Checkpoint:
    """The checkpoint ``which`` restored into the shapes ``init_fn`` makes, or, in a
    directory without checkpoints, ``init_fn(*args, **kwargs)`` itself.

    Args:
      manager: the run's :class:`CheckpointManager` (``read_only`` too, for evaluation).
      init_fn: builds the initial state (a Flax ``TrainState``, a dict, any pytree); it
        must be traceable by JAX: called under ``jax.eval_shape`` always and under
        ``jax.jit`` when there is nothing to restore.
      *args: arrays for ``init_fn`` (a PRNG key, an example batch); ``**kwargs`` are
        passed as constants (configs, shapes).
      shardings: where the state's arrays go: one ``jax.sharding.Sharding`` for every
        leaf, or a pytree of them shaped like the state (as for ``jax.jit``'s
        ``out_shardings``); None: the default device.
      which: ``"latest"`` (resume), ``"best"`` or a step. An empty directory initialises
        for ``"latest"``/``"best"``; a step that is not there raises.

    Returns:
      A :class:`Checkpoint`: ``state``, ``step``, ``epoch``, ``metrics`` and
      ``data_state`` as saved; after an initialisation ``step`` is 0 and the others are
      None.

    Raises:
      CheckpointCorruptError: the directory has checkpoints but none verifies (never
        silently restarted from scratch).
      RestoreStructureError: the checkpoint does not fit what ``init_fn`` builds (names
        the differing leaves).
    """
    init = functools.partial(init_fn, **kwargs)
    abstract = jax.eval_shape(init, *args)
    if shardings is not None:
        abstract = _placed(abstract, shardings)
    if _nothing_to_restore(manager, which):
        state = jax.jit(init, out_shardings=shardings)(*args)
        return Checkpoint(step=0, state=state, metrics=None, epoch=None, data_state=None)
    return manager.restore_checkpoint(which, target=abstract)


def _nothing_to_restore(manager: CheckpointManager, which: Which) -> bool:
    """An empty directory: no usable checkpoint and none set aside as corrupt."""
    if which not in ("latest", "best") or manager.latest_step() is not None:
        return False
    return not any(v.problems and not v.incomplete for v in manager.verdicts().values())


def _placed(abstract: Any, shardings: Any) -> Any:
    """``abstract`` with each leaf's sharding taken from ``shardings`` (a prefix tree)."""
    def attach(sharding: Any, subtree: Any) -> Any:
        if sharding is None:
            return subtree
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(
            a.shape, a.dtype, sharding=sharding, weak_type=a.weak_type), subtree)
    return jax.tree.map(attach, shardings, abstract,
                        is_leaf=lambda x: x is None or isinstance(x, jax.sharding.Sharding))
