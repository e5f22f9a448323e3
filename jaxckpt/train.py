"""``Trainer.fit``: epochs, evaluation, checkpoints, early stopping, exact auto-resume.

Synopsis::

    trainer = jaxckpt.Trainer(model, optax.adam(1e-3), metrics=("accuracy",))
    history = trainer.fit(train, val, epochs=50, batch_size=64, checkpoint="/tmp/run/ckpt")
    history.plot("/tmp/run/history.png")

Run the same command again after a crash and ``fit`` continues from the newest checkpoint:
parameters, optimizer state, step, RNG, data position, history and the early-stopping and
best-metric trackers all come back, so the run ends bitwise equal to one never interrupted.
What makes that possible: randomness is ``fold_in(rng, step)``; batch ``k`` is a pure
function of ``(dataset, seed, k)``; and the loop's own state (history, trackers, data
position, skipped batches) is saved *inside* each checkpoint, atomically with the arrays.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import os
import signal
import sys
import time
from typing import Any, Callable, Literal, Mapping, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx

from jaxckpt import data as data_lib
from jaxckpt import parallel
from jaxckpt.history import History
from jaxckpt.manager import CheckpointManager
from jaxckpt.policy import CheckpointPolicy, resolve_mode
from jaxckpt.state import TrainState, nnx_split

__all__ = ["Trainer", "EarlyStopping", "NonFiniteLossError"]

log = logging.getLogger("jaxckpt")

PerExample = Callable[[jax.Array, jax.Array], jax.Array]
_LOOP_FORMAT = "jaxckpt-loop/1"


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite (``on_nonfinite="raise"``)."""


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience`` epochs.

    With ``restore_best_weights``, ``fit`` ends with the state of the best epoch (from the
    best checkpoint when the checkpoint policy monitors the same metric, else from a copy
    kept in host memory).
    """

    monitor: str = "val_loss"
    patience: int = 5
    min_delta: float = 0.0
    mode: Literal["min", "max", "auto"] = "auto"
    restore_best_weights: bool = True

    def __post_init__(self):
        resolve_mode(self.monitor, self.mode)
        if self.patience < 0 or self.min_delta < 0:
            raise ValueError("EarlyStopping needs patience >= 0 and min_delta >= 0.")


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example 0/1 accuracy of integer labels."""
    return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)


_BUILTIN_METRICS: dict[str, PerExample] = {"accuracy": accuracy, "acc": accuracy}


class Trainer:
    """Trains a Flax model (Linen or NNX) with a jit-compiled, data-parallel step.

    Args:
      model: a ``flax.linen.Module`` (initialised on the first batch) or an ``nnx.Module``.
      optimizer: an optax transformation.
      loss_fn: per-example loss ``(logits, labels) -> [B]``; default softmax cross-entropy
        with integer labels.
      metrics: names (``"accuracy"``) or ``{name: fn(logits, labels) -> [B]}``.
      mode: ``"jit"`` (sharded over a mesh: one device, data parallel or FSDP) or
        ``"pmap"`` (replicated state, for pmap-era code). Checkpoints are the same in both.
      fsdp: size of the mesh's FSDP axis (parameters sharded over it) in jit mode.
      on_nonfinite: ``"raise"`` (stop and name the step), ``"rollback"`` (restore the last
        checkpoint, skip the offending batch, record the event) or ``"ignore"``.
      input_key, label_key: the batch entries holding inputs and integer labels.
      quiet: no progress bars or per-epoch lines (for logs).
      handle_sigterm: on SIGTERM, finish the step, save a checkpoint and exit with status 0.
    """

    def __init__(self, model: Any, optimizer: optax.GradientTransformation,
                 loss_fn: PerExample | None = None,
                 metrics: Sequence[str] | Mapping[str, PerExample] = ("accuracy",), *,
                 mode: Literal["jit", "pmap"] = "jit", fsdp: int = 1,
                 on_nonfinite: Literal["raise", "rollback", "ignore"] = "raise",
                 input_key: str = "image", label_key: str = "label", quiet: bool = False,
                 handle_sigterm: bool = True):
        if mode not in ("jit", "pmap"):
            raise ValueError(f"mode must be 'jit' or 'pmap', got {mode!r}.")
        if on_nonfinite not in ("raise", "rollback", "ignore"):
            raise ValueError("on_nonfinite must be 'raise', 'rollback' or 'ignore', got "
                             f"{on_nonfinite!r}.")
        self.model = model
        self.optimizer = optimizer
        self.per_example_loss = loss_fn or optax.softmax_cross_entropy_with_integer_labels
        self.metric_fns = _metric_fns(metrics)
        self.mode = mode
        self.fsdp = fsdp
        self.on_nonfinite = on_nonfinite
        self.input_key, self.label_key = input_key, label_key
        self.quiet = quiet
        self.handle_sigterm = handle_sigterm
        self.state: TrainState | None = None
        self._nnx_graphdef = None
        self._stop_signal = self._stopping = False

    # -- model plumbing ------------------------------------------------------------------

    def init_state(self, sample_batch: Mapping[str, Any], seed: int = 0) -> TrainState:
        """The initial state: parameters from ``seed``, optimizer state, RNG."""
        init_key, rng = jax.random.split(jax.random.key(seed))
        if isinstance(self.model, nnx.Module):
            graphdef, state = nnx_split(self.model, self.optimizer, rng=rng)
            self._nnx_graphdef = graphdef
            return state
        if isinstance(self.model, nn.Module):
            x = jnp.asarray(sample_batch[self.input_key][:1])
            variables = dict(self.model.init({"params": init_key, "dropout": init_key}, x,
                                             **self._linen_kwargs(train=False)))
            params = variables.pop("params")
            return TrainState.create(params=params, tx=self.optimizer, rng=rng,
                                     extras=variables or None, apply_fn=self.model.apply)
        raise TypeError(f"model must be a flax.linen.Module or flax.nnx.Module, got "
                        f"{type(self.model).__name__}.")

    def nnx_model(self, state: TrainState | None = None) -> nnx.Module:
        """An NNX model holding ``state`` (default: the trained state), in eval mode."""
        if self._nnx_graphdef is None:
            raise TypeError("nnx_model() is for NNX models; this Trainer trains a Linen one "
                            "(use state.apply_fn / model.apply with state.params).")
        model = nnx.merge(self._nnx_graphdef, (state or self.state).params,
                          (state or self.state).extras, copy=True)
        model.eval()
        return model

    def _linen_kwargs(self, train: bool) -> dict[str, Any]:
        params = inspect.signature(self.model.__call__).parameters
        if "train" in params:
            return {"train": train}
        if "deterministic" in params:
            return {"deterministic": not train}
        return {}

    def _apply(self, params, state: TrainState, x, rng, train: bool):
        """Logits and the new non-trainable state (BatchNorm statistics, RNG counters)."""
        if self._nnx_graphdef is not None:
            # copy=True: fresh Variables in this trace, so Dropout may advance its RNG count.
            model = nnx.merge(self._nnx_graphdef, params, state.extras, copy=True)
            model.train() if train else model.eval()
            logits = model(x)
            _, _, extras = nnx.split(model, nnx.Param, ...)
            return logits, extras
        variables = {"params": params, **(state.extras or {})}
        mutable = list(state.extras) if train and state.extras else False
        out = self.model.apply(variables, x, rngs={"dropout": rng}, mutable=mutable,
                               **self._linen_kwargs(train))
        if mutable:
            logits, updates = out
            return logits, {**state.extras, **updates}
        return out, state.extras

    def _loss_fn(self, train: bool):
        """The ``parallel`` loss convention; masked sums over the batch rows (see below)."""

        def loss_fn(params, batch, rng, state):
            logits, extras = self._apply(params, state, batch[self.input_key], rng, train)
            labels = batch[self.label_key]
            # Padded eval rows carry mask 0. Dividing sums by the row count (not the mask
            # sum) keeps per-device means averageable; fit divides by "_weight" at the end.
            mask = batch.get("_mask", jnp.ones(labels.shape[0], jnp.float32))
            n = labels.shape[0]
            loss = jnp.sum(self.per_example_loss(logits, labels) * mask) / n
            metrics = {name: jnp.sum(fn(logits, labels) * mask) / n
                       for name, fn in self.metric_fns.items()}
            metrics["_weight"] = jnp.sum(mask) / n
            return (loss, metrics, extras) if train else (loss, metrics)

        return loss_fn

    # -- fit -----------------------------------------------------------------------------

    def fit(self, train_data: Any, val_data: Any = None, *, epochs: int = 10,
            batch_size: int = 32, checkpoint: CheckpointManager | str | os.PathLike | None = None,
            policy: CheckpointPolicy | None = None, early_stopping: EarlyStopping | None = None,
            seed: int = 0, eval_batch_size: int | None = None, max_steps: int | None = None
            ) -> History:
        """Train for ``epochs``; checkpoint, evaluate and resume as configured.

        Args:
          train_data, val_data: ``grain.MapDataset`` of example dicts (e.g. from
            :func:`jaxckpt.data.digits_splits`), or dicts of equal-length arrays.
          epochs: total epochs (a resumed run trains only what is left).
          batch_size: global batch size (split over processes and devices).
          checkpoint: a :class:`CheckpointManager` or a directory. When it already holds
            checkpoints, training resumes from the latest.
          policy: the checkpoint policy when ``checkpoint`` is a directory; default keeps
            the best by ``val_loss`` (``loss`` without validation data) and the latest,
            saving every epoch.
          early_stopping: an :class:`EarlyStopping`, or None.
          seed: seeds parameters, dropout and shuffling.
          eval_batch_size: batch size for evaluation (default ``batch_size``).
          max_steps: stop after this many steps in total (for tests and smoke runs).

        Returns:
          The :class:`History` of every epoch, including those before a resume.
        """
        train_ds, val_ds = _as_dataset(train_data), _as_dataset(val_data)
        nproc, pid = jax.process_count(), jax.process_index()
        if batch_size % nproc:
            raise ValueError(f"batch_size {batch_size} must split evenly over {nproc} processes.")
        local_bs = batch_size // nproc
        steps_per_epoch = data_lib.num_batches(train_ds, local_bs, shard_count=nproc)
        total_steps = epochs * steps_per_epoch
        if max_steps is not None:
            total_steps = min(total_steps, max_steps)
        monitor = "val_loss" if val_ds is not None else "loss"
        manager, own_manager = _open_manager(checkpoint, policy, monitor)
        if manager is not None and manager.policy.monitor and val_ds is None and \
                manager.policy.monitor.startswith("val_"):
            raise ValueError(f"the checkpoint policy monitors {manager.policy.monitor!r} but "
                             "fit() got no val_data; pass val_data or monitor a train metric.")
        make_iter = lambda: data_lib.batches(  # noqa: E731 - the one pipeline, rebuilt on resume
            train_ds, local_bs, seed=seed, num_epochs=None, transform=None, shard_index=pid,
            shard_count=nproc)
        iterator = make_iter()
        # One example as a batch of one, for Linen's init: no second pipeline to spin up.
        first = jax.tree.map(lambda v: np.asarray(v)[None], train_ds[0])
        state = template = self.init_state(first, seed)
        placement = _Placement(self.mode, self.fsdp)
        loop = _LoopState(history=History(monitor=monitor))
        if early_stopping is not None:
            loop.history.monitor, loop.history.mode = early_stopping.monitor, early_stopping.mode
        elif manager is not None and manager.policy.monitor:
            loop.history.monitor, loop.history.mode = manager.policy.monitor, manager.policy.mode

        if manager is not None and manager.latest_step() is not None:
            state, loop = self._resume(manager, template, placement, loop, iterator)
        state = placement.place(state)
        train_step = placement.train_step(self._loss_fn(train=True))
        eval_step = placement.eval_step(self._loss_fn(train=False))
        best_copy = None
        self.state = state
        previous = self._install_sigterm()
        try:
            while loop.position < total_steps and not loop.stopped:
                epoch = loop.position // steps_per_epoch
                end = min((epoch + 1) * steps_per_epoch, total_steps)
                state, sums, iterator = self._train_epoch(
                    state, template, train_step, iterator, make_iter, loop, manager, placement,
                    epoch, end, steps_per_epoch, epochs)
                if self._stopping:  # agreed by every process; the flag alone may not be
                    self._preempt(manager, state, loop, iterator, placement, sums)
                if loop.position < (epoch + 1) * steps_per_epoch:
                    break  # max_steps ended the run inside an epoch
                row = {"epoch": epoch + 1, **_finish(sums)}
                if val_ds is not None:
                    val = self.evaluate(val_ds, eval_batch_size or batch_size, state=state,
                                        _step=eval_step, _placement=placement)
                    row.update({f"val_{k}": v for k, v in val.items()})
                row["time"] = time.time()
                loop.history.rows.append(row)
                improved = _update_early_stopping(loop, early_stopping, row)
                if improved and early_stopping and early_stopping.restore_best_weights and not \
                        _manager_tracks(manager, early_stopping.monitor):
                    best_copy = _host_copy(placement.checkpointable(state))
                saved = False
                if manager is not None:
                    saved = manager.save(loop.position, placement.checkpointable(state),
                                         metrics=_checkpoint_metrics(row),
                                         data_state=loop.to_json(iterator), epoch=epoch + 1)
                self._epoch_line(row, epochs, saved, manager)
                if loop.stopped:
                    loop.history.events.append({"event": "early_stop", "epoch": epoch + 1})
                    self._print(f"early stopping at epoch {epoch + 1}: "
                                f"{early_stopping.monitor} did not improve for "
                                f"{early_stopping.patience} epochs")
            if early_stopping and early_stopping.restore_best_weights and loop.es_best_epoch:
                state = self._restore_best(state, template, manager, placement, best_copy, loop,
                                           early_stopping)
        finally:
            self._restore_sigterm(previous)
            if own_manager and manager is not None:
                manager.close()
            elif manager is not None:
                manager.wait()
        self.state = placement.checkpointable(state)  # unreplicated in pmap mode
        return loop.history

    def evaluate(self, data: Any, batch_size: int = 256, *, state: TrainState | None = None,
                 _step=None, _placement=None) -> dict[str, float]:
        """Loss and metrics over all of ``data`` (the last partial batch is padded, masked)."""
        ds = _as_dataset(data)
        state = state if state is not None else self.state
        if state is None:
            raise ValueError("evaluate() needs a trained state: call fit() first or pass state=.")
        placement = _placement or _Placement(self.mode, self.fsdp)
        if _step is None:
            state = placement.place(state)
        step = _step or placement.eval_step(self._loss_fn(train=False))
        nproc, pid = jax.process_count(), jax.process_index()
        local_bs = max(1, batch_size // nproc)
        local_bs += (-local_bs) % placement.local_devices
        it = data_lib.batches(ds, local_bs, shuffle=False, drop_remainder=False, transform=None,
                              shard_index=pid, shard_count=nproc)
        sums: dict[str, Any] = {}
        for batch in it:
            batch = _pad(dict(batch), local_bs)
            _accumulate(sums, step(state, placement.batch(batch)))
        return _finish(sums)

    # -- the epoch -----------------------------------------------------------------------

    def _train_epoch(self, state, template, train_step, iterator, make_iter, loop, manager,
                     placement, epoch, end, steps_per_epoch, epochs):
        """Train from ``loop.position`` to ``end``; return state, metric sums, iterator."""
        sums, loop.sums = dict(loop.sums), {}  # a resumed epoch continues its running sums
        every = manager.every_n_steps if manager is not None else None
        with _progress(self.quiet or jax.process_index() != 0, epoch, epochs,
                       end - epoch * steps_per_epoch, loop.position - epoch * steps_per_epoch
                       ) as advance:
            while loop.position < end:
                batch = next(iterator)
                position = loop.position
                loop.position += 1
                if position in loop.skipped:
                    advance(None)
                    continue
                new_state, metrics = train_step(state, placement.batch(batch))
                if self.on_nonfinite != "ignore" and not math.isfinite(float(metrics["loss"])):
                    state, iterator = self._nonfinite(template, manager, placement, loop,
                                                      position, make_iter)
                    sums, loop.sums = dict(loop.sums), {}  # as they were at that checkpoint
                    continue
                state = new_state
                _accumulate(sums, metrics)
                advance(metrics)
                if self._sync_stop():
                    self._stopping = True
                    return state, sums, iterator
                if every and manager is not None and loop.position % every == 0 and \
                        loop.position < end:
                    manager.save(loop.position, placement.checkpointable(state),
                                 data_state=loop.to_json(iterator, sums))
        return state, sums, iterator

    def _sync_stop(self) -> bool:
        """Whether to stop after this step. In multi-process runs every process calls the
        allgather after every step, the signalled one too, so all agree on the step."""
        if jax.process_count() == 1:
            return self._stop_signal
        from jax.experimental import multihost_utils
        flags = multihost_utils.process_allgather(np.int32(self._stop_signal))
        return bool(np.any(flags))

    # -- resume, rollback, preemption, best weights --------------------------------------

    def _resume(self, manager, template, placement, loop, iterator):
        target = placement.restore_target(template)
        ckpt = manager.restore_checkpoint("latest", target=target)
        restored = loop.from_json(ckpt.data_state, iterator)
        what = ["params", "optimizer state", "step", "RNG", "extras"]
        if restored:
            what += ["data position", f"history ({len(loop.history.rows)} epoch(s))",
                     "early-stopping state"]
        loop.history.events.append({"event": "resume", "step": ckpt.step,
                                    "position": loop.position})
        self._print(f"resumed from checkpoint step {ckpt.step} in {manager.directory} "
                    f"(epoch {loop.history.rows[-1]['epoch'] if loop.history.rows else 0} done, "
                    f"position {loop.position}): restored {', '.join(what)}")
        return _merge_static(template, ckpt.state), loop

    def _nonfinite(self, template, manager, placement, loop, position, make_iter):
        if self.on_nonfinite == "raise":
            raise NonFiniteLossError(
                f"training loss is not finite at step {position} (epoch "
                f"{len(loop.history.rows) + 1}). Lower the learning rate, clip gradients "
                "(optax.clip_by_global_norm), or use Trainer(on_nonfinite='rollback') to "
                "restore the last checkpoint and skip the batch.")
        if manager is None or manager.latest_step() is None:
            raise NonFiniteLossError(
                f"training loss is not finite at step {position} and there is no checkpoint "
                "to roll back to. Pass checkpoint=... to fit(), or fix the divergence.")
        if loop.rollbacks >= 10:
            raise NonFiniteLossError(f"training loss is not finite at step {position} after "
                                     f"{loop.rollbacks} rollbacks; the run keeps diverging.")
        skipped = sorted(loop.skipped | {position})
        ckpt = manager.restore_checkpoint("latest", target=placement.restore_target(template))
        events = list(loop.history.events)
        iterator = make_iter()
        loop.from_json(ckpt.data_state, iterator)
        loop.skipped = set(skipped)
        loop.rollbacks += 1
        loop.history.events = events + [{"event": "nonfinite_rollback", "step": position,
                                         "restored_step": ckpt.step}]
        self._print(f"non-finite loss at step {position}: rolled back to checkpoint "
                    f"{ckpt.step}, skipping batch {position}")
        return placement.place(_merge_static(template, ckpt.state)), iterator

    def _preempt(self, manager, state, loop, iterator, placement, sums):
        if manager is not None:
            manager.save(loop.position, placement.checkpointable(state),
                         data_state=loop.to_json(iterator, sums), force=True)
            manager.wait()
            self._print(f"SIGTERM: saved checkpoint at step {loop.position} in "
                        f"{manager.directory}; exiting. Run the same command to resume.")
        else:
            self._print("SIGTERM: no checkpoint directory given; exiting without saving.")
        manager.close() if manager is not None else None
        raise SystemExit(0)

    def _restore_best(self, state, template, manager, placement, best_copy, loop, early_stopping):
        if _manager_tracks(manager, early_stopping.monitor) and manager.best_step() is not None:
            ckpt = manager.restore_checkpoint("best", target=placement.restore_target(template))
            self._print(f"restored best weights: checkpoint step {ckpt.step}")
            return placement.place(_merge_static(template, ckpt.state))
        if best_copy is not None:
            self._print(f"restored best weights of epoch {loop.es_best_epoch}")
            return placement.place(_merge_static(template, best_copy))
        log.warning("restore_best_weights: no copy of the best weights survived the restart "
                    "and the checkpoint policy does not monitor %s", early_stopping.monitor)
        return state

    # -- signals and output ----------------------------------------------------------------

    def _install_sigterm(self):
        self._stop_signal = self._stopping = False
        if not self.handle_sigterm or not _main_thread():
            return None

        def handler(signum, frame):
            self._stop_signal = True

        return signal.signal(signal.SIGTERM, handler)

    def _restore_sigterm(self, previous) -> None:
        if previous is not None and _main_thread():
            signal.signal(signal.SIGTERM, previous)

    def _print(self, message: str, *, routine: bool = False) -> None:
        """Events (resume, preemption, rollback) print even when quiet; epoch lines don't."""
        if jax.process_index() == 0:
            log.info(message)
            if not (self.quiet and routine):
                print(message, flush=True)

    def _epoch_line(self, row, epochs, saved, manager) -> None:
        metrics = "  ".join(f"{k}={v:.4f}" for k, v in row.items() if k not in ("epoch", "time"))
        note = ""
        if saved and manager is not None:
            note = "  [saved" + (", best" if manager.best_step() == manager.latest_step() and
                                 manager.policy.monitor else "") + "]"
        self._print(f"epoch {row['epoch']}/{epochs}  {metrics}{note}", routine=True)


# -- placement: jit (mesh) or pmap -------------------------------------------------------


class _Placement:
    """Where state and batches live, and the compiled steps, for one mode."""

    def __init__(self, mode: str, fsdp: int):
        self.mode = mode
        if mode == "jit":
            self.mesh = parallel.make_mesh(fsdp=fsdp)
            self.local_devices = len(self.mesh.local_devices)
        else:
            self.mesh = None
            self.local_devices = jax.local_device_count()
        self._shardings = None

    def place(self, state):
        """Place an unreplicated state (host, one device or another mesh) for this mode."""
        if self.mode == "pmap":
            return parallel.replicate(state)
        self._shardings = parallel.state_sharding(state, self.mesh)
        return jax.device_put(state, self._shardings)

    def restore_target(self, state):
        """Abstract arrays placed where this mode wants the (unreplicated) state."""
        if self.mode == "pmap":
            local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=local),
                                state)
        return parallel.abstract_state(state, parallel.state_sharding(state, self.mesh))

    def checkpointable(self, state):
        return parallel.unreplicate(state) if self.mode == "pmap" else state

    def batch(self, batch):
        if self.mode == "pmap":
            return batch
        return parallel.shard_batch(batch, self.mesh)

    def train_step(self, loss_fn):
        if self.mode == "pmap":
            return parallel.make_pmap_train_step(loss_fn)
        return parallel.make_train_step(loss_fn, self.mesh, self._shardings)

    def eval_step(self, loss_fn):
        if self.mode == "pmap":
            return parallel.make_pmap_eval_step(loss_fn)
        return parallel.make_eval_step(loss_fn, self.mesh, self._shardings)


# -- the loop's own checkpointed state ---------------------------------------------------


@dataclasses.dataclass
class _LoopState:
    """Everything besides the arrays that an exact resume needs (saved as JSON)."""

    history: History
    position: int = 0          # batches consumed since the start (the checkpoint step)
    skipped: set[int] = dataclasses.field(default_factory=set)
    rollbacks: int = 0
    es_best: float | None = None
    es_best_epoch: int | None = None
    es_wait: int = 0
    stopped: bool = False
    sums: dict[str, float] = dataclasses.field(default_factory=dict)  # of a partial epoch

    def to_json(self, iterator, sums: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """JSON of the loop; ``sums`` are the running metric sums of an unfinished epoch
        (floats hold float32 values exactly, so a resumed epoch averages identically)."""
        return {"format": _LOOP_FORMAT, "iterator": iterator.get_state(),
                "position": self.position, "skipped": sorted(self.skipped),
                "sums": {k: float(v) for k, v in jax.device_get(dict(sums or {})).items()},
                "rollbacks": self.rollbacks, "history": self.history.to_json(),
                "early_stopping": {"best": self.es_best, "best_epoch": self.es_best_epoch,
                                   "wait": self.es_wait, "stopped": self.stopped}}

    def from_json(self, data: Any, iterator) -> bool:
        """Load a checkpoint's loop state; False (and position from the step) if absent."""
        if not isinstance(data, dict) or data.get("format") != _LOOP_FORMAT:
            return False
        iterator.set_state(data["iterator"])
        self.position = int(data["position"])
        self.skipped = set(int(s) for s in data.get("skipped", []))
        self.rollbacks = int(data.get("rollbacks", 0))
        self.sums = {k: np.float32(v) for k, v in data.get("sums", {}).items()}
        self.history = History.from_json(data["history"])
        es = data.get("early_stopping", {})
        self.es_best, self.es_best_epoch = es.get("best"), es.get("best_epoch")
        self.es_wait, self.stopped = int(es.get("wait", 0)), bool(es.get("stopped", False))
        return True


def _update_early_stopping(loop: _LoopState, es: EarlyStopping | None, row: dict) -> bool:
    """Advance the early-stopping tracker with an epoch's row; True when it improved."""
    if es is None:
        return False
    if es.monitor not in row:
        raise ValueError(f"EarlyStopping monitors {es.monitor!r} but the epoch metrics are "
                         f"{sorted(k for k in row if k not in ('epoch', 'time'))}.")
    value = row[es.monitor]
    sign = 1.0 if resolve_mode(es.monitor, es.mode) == "min" else -1.0
    if math.isfinite(value) and (loop.es_best is None or
                                 sign * value < sign * loop.es_best - es.min_delta):
        loop.es_best, loop.es_best_epoch, loop.es_wait = value, int(row["epoch"]), 0
        return True
    loop.es_wait += 1
    loop.stopped = loop.es_wait > es.patience
    return False


# -- small helpers -------------------------------------------------------------------------


def _metric_fns(metrics) -> dict[str, PerExample]:
    if isinstance(metrics, Mapping):
        return dict(metrics)
    out = {}
    for name in metrics:
        if name not in _BUILTIN_METRICS:
            raise ValueError(f"unknown metric {name!r}; built in: {sorted(_BUILTIN_METRICS)}. "
                             "Pass {name: fn(logits, labels) -> per-example values} instead.")
        out[name] = _BUILTIN_METRICS[name]
    return out


class _ArraySource:
    """Random access over a dict of equal-length arrays (a grain data source)."""

    def __init__(self, arrays: Mapping[str, Any]):
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        lengths = {len(v) for v in self.arrays.values()}
        if len(lengths) != 1:
            raise ValueError(f"arrays must have equal lengths, got {lengths}.")
        self.n = lengths.pop()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.arrays.items()}


def _as_dataset(data: Any):
    if data is None or isinstance(data, grain.MapDataset):
        return data
    if isinstance(data, Mapping):
        return grain.MapDataset.source(_ArraySource(data))
    raise TypeError("data must be a grain.MapDataset or a dict of equal-length arrays, got "
                    f"{type(data).__name__}.")


def _open_manager(checkpoint, policy, monitor):
    if checkpoint is None:
        if policy is not None:
            raise ValueError("policy= was given without checkpoint=; pass a directory too.")
        return None, False
    if isinstance(checkpoint, CheckpointManager):
        if policy is not None:
            raise ValueError("pass policy= only with a directory; a CheckpointManager "
                             "already has its policy.")
        return checkpoint, False
    policy = policy or CheckpointPolicy(monitor=monitor, keep_best=1, keep_latest=1,
                                        every_n_epochs=1)
    return CheckpointManager(checkpoint, policy), True


def _manager_tracks(manager, monitor: str) -> bool:
    return manager is not None and manager.policy.monitor == monitor and \
        manager.policy.keep_best > 0


def _checkpoint_metrics(row: dict) -> dict[str, float]:
    return {k: v for k, v in row.items() if k not in ("epoch", "time")}


def _accumulate(sums: dict, metrics: Mapping[str, Any]) -> None:
    for k, v in metrics.items():
        sums[k] = sums[k] + v if k in sums else v


def _finish(sums: dict) -> dict[str, float]:
    """Weighted means: every metric was summed per batch as ``sum(value*mask)/rows``."""
    if not sums:
        return {}
    host = jax.device_get(sums)
    weight = float(host.pop("_weight"))
    return {k: float(v) / weight for k, v in host.items()}


def _pad(batch: dict, rows: int) -> dict:
    n = len(next(iter(batch.values())))
    mask = np.zeros(rows, np.float32)
    mask[:n] = 1.0
    if n < rows:
        batch = {k: np.concatenate([v, np.repeat(v[-1:], rows - n, axis=0)]) for k, v in
                 batch.items()}
    batch["_mask"] = mask
    return batch


def _host_copy(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True) if hasattr(x, "shape") else x,
                        tree)


def _merge_static(template: TrainState, restored: Any) -> TrainState:
    """Put restored arrays back into a TrainState with the template's static fields."""
    if isinstance(restored, TrainState):
        return restored.replace(tx=template.tx, apply_fn=template.apply_fn)
    return template.replace(**{k: restored[k] for k in ("step", "params", "opt_state", "rng",
                                                          "extras")})


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


class _progress:
    """A rich progress bar for one epoch (or nothing when quiet)."""

    def __init__(self, quiet: bool, epoch: int, epochs: int, total: int, done: int):
        self.quiet, self.epoch, self.epochs, self.total, self.done = quiet, epoch, epochs, \
            total, done
        self._bar = None

    def __enter__(self):
        if self.quiet or not sys.stderr.isatty():
            return lambda metrics: None
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeRemainingColumn)
        self._bar = Progress(TextColumn(f"epoch {self.epoch + 1}/{self.epochs}"), BarColumn(),
                             MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                             TimeRemainingColumn(), transient=True)
        self._bar.start()
        task = self._bar.add_task("train", total=self.total, completed=self.done, rate="")
        start, count = time.perf_counter(), [0]

        def advance(metrics):
            count[0] += 1
            rate = count[0] / max(time.perf_counter() - start, 1e-9)
            self._bar.update(task, advance=1, rate=f"{rate:.1f} step/s")

        return advance

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.stop()
