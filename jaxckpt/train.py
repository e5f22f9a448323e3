"""``Trainer.fit``: epochs, evaluation, callbacks, checkpoints, early stopping, resume.

Synopsis::

    trainer = jaxckpt.Trainer(model, optax.adam(1e-3), metrics=("accuracy",))
    history = trainer.fit((x_train, y_train), (x_val, y_val), epochs=50, batch_size=64,
                          checkpoint="/tmp/run/ckpt",
                          callbacks=[jaxckpt.CSVLogger("/tmp/run/history.csv")])
    history.plot("/tmp/run/history.png")
    trainer.evaluate((x_test, y_test)), trainer.predict(x_test)

Run the same command again after a crash and ``fit`` continues from the newest checkpoint
(``resume="auto"``; ``"never"``, ``"latest"``, ``"best"``, a step or another run's path
choose otherwise): parameters, optimizer state, step, RNG, data position, history and the
early-stopping and best-metric trackers all come back, so the run ends bitwise equal to one
never interrupted. What makes that possible: randomness is ``fold_in(rng, step)``; batch
``k`` is a pure function of ``(dataset, seed, k)``; and the loop's own state (history,
trackers, data position, skipped batches, the running sums of a half-done epoch) is saved
*inside* each checkpoint, atomically with the arrays.

The host never waits for the step it has just dispatched: a step's metrics (and its
finite-loss flag) are read after the next step is queued, and the processes of a
multi-process run agree on stopping only every ``sync_every`` steps and at epoch ends, so
JAX's asynchronous dispatch keeps the device busy.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import signal
import sys
import time
from typing import Any, Callable, Literal, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx

from jaxckpt import data as data_lib
from jaxckpt import parallel
from jaxckpt.callbacks import Callback, CallbackList
from jaxckpt.errors import CheckpointNotFoundError, RestoreStructureError
from jaxckpt.history import History, json_number, number_from_json
from jaxckpt.early_stopping import EarlyStopping
from jaxckpt.manager import CheckpointManager
from jaxckpt.policy import CheckpointPolicy, MetricError
from jaxckpt.state import TrainState

__all__ = ["Trainer", "EarlyStopping", "NonFiniteLossError"]

log = logging.getLogger("jaxckpt")

PerExample = Callable[[jax.Array, jax.Array], jax.Array]
_LOOP_FORMAT = "jaxckpt-loop/1"


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite (``on_nonfinite="raise"``)."""


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example 0/1 accuracy of integer labels, or of one-hot (or soft) labels shaped
    like the logits, whose largest entry is the class."""
    if labels.ndim == logits.ndim:
        labels = jnp.argmax(labels, axis=-1)
    return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)


_BUILTIN_METRICS: dict[str, PerExample] = {"accuracy": accuracy, "acc": accuracy}


class Trainer:
    """Trains a Flax model (Linen or NNX) with a jit-compiled, data-parallel step.

    Args:
      model: a ``flax.linen.Module`` (initialised on the first batch) or an ``nnx.Module``.
      optimizer: an optax transformation.
      loss_fn: per-example loss ``(outputs, labels) -> [B]``; values of shape ``[B, ...]``
        are averaged over their trailing axes, so ``lambda p, y: (p - y) ** 2`` is a mean
        squared error. Default: softmax cross-entropy with integer labels.
      metrics: names (``"accuracy"``) or ``{name: fn(outputs, labels) -> [B]}``; ``()`` for
        none (a regression, say).
      mode: ``"jit"`` (sharded over a mesh: one device, data parallel or FSDP) or
        ``"pmap"`` (replicated state, for pmap-era code). Checkpoints are the same in both.
      fsdp: size of the mesh's FSDP axis (parameters sharded over it) in jit mode.
      on_nonfinite: ``"raise"`` (stop and name the step), ``"rollback"`` (restore the last
        checkpoint, skip the offending batch, record the event) or ``"ignore"``.
      input_key, label_key: the batch entries holding inputs and labels; ``(x, y)`` arrays
        are stored under these names.
      step_fn: replaces the whole training step: ``step_fn(state, batch) -> (new_state,
        metrics)`` with a scalar ``metrics["loss"]``; the Trainer jits and shards it (jit
        mode). ``evaluate`` and ``predict`` still run the model with ``loss_fn``.
      quiet: no progress bars or per-epoch lines (for logs).
      handle_signals: on SIGTERM or Ctrl-C, finish the step, save a checkpoint and exit
        (status 0 for SIGTERM, 130 for Ctrl-C); a second Ctrl-C aborts at once.
      sync_every: in multi-process runs the processes agree on stopping (signals,
        ``stop_training``) every this many steps and at every epoch end; a single process
        checks after every step, which costs nothing.

    During ``fit``, callbacks may read ``trainer.state`` and ``trainer.history`` and set
    ``trainer.stop_training = True``.
    """

    def __init__(self, model: Any, optimizer: optax.GradientTransformation,
                 loss_fn: PerExample | None = None,
                 metrics: Sequence[str] | Mapping[str, PerExample] = ("accuracy",), *,
                 mode: Literal["jit", "pmap"] = "jit", fsdp: int = 1,
                 on_nonfinite: Literal["raise", "rollback", "ignore"] = "raise",
                 input_key: str = "image", label_key: str = "label",
                 step_fn: Callable[[TrainState, Any], tuple[TrainState, Mapping]] | None = None,
                 quiet: bool = False, handle_signals: bool = True, sync_every: int = 50):
        if mode not in ("jit", "pmap"):
            raise ValueError(f"mode must be 'jit' or 'pmap', got {mode!r}.")
        if on_nonfinite not in ("raise", "rollback", "ignore"):
            raise ValueError("on_nonfinite must be 'raise', 'rollback' or 'ignore', got "
                             f"{on_nonfinite!r}.")
        if step_fn is not None and (not callable(step_fn) or mode != "jit"):
            raise ValueError("step_fn must be a function (state, batch) -> (state, metrics), "
                             "and runs in mode='jit' (it is jitted over the mesh).")
        if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
            raise ValueError(f"sync_every must be an int >= 1, got {sync_every!r}.")
        self.model = model
        self.optimizer = optimizer
        self.per_example_loss = loss_fn or optax.softmax_cross_entropy_with_integer_labels
        self.metric_fns = _metric_fns(metrics)
        self.mode = mode
        self.fsdp = fsdp
        self.on_nonfinite = on_nonfinite
        self.input_key, self.label_key = input_key, label_key
        self.step_fn = step_fn
        self.quiet = quiet
        self.handle_signals = handle_signals
        self.sync_every = sync_every
        self.state: TrainState | None = None
        self.history: History | None = None
        self.stop_training = False
        self._nnx_graphdef = None
        self._loop: _LoopState | None = None  # the running (or last) fit's loop state
        self._signals = _Signals()
        self._placements: dict[tuple, _Placement] = {}
        self._compiled: dict[tuple, Callable] = {}  # evaluate()/predict() reuse compilations
        self._checked: set[tuple] = set()  # shapes _check_outputs has passed

    # -- model plumbing ------------------------------------------------------------------

    def init_state(self, sample_batch: Mapping[str, Any], seed: int = 0) -> TrainState:
        """The initial state (parameters from ``seed``, optimizer state, RNG), on one device.

        ``fit`` does not use it: it builds the state under ``jit`` straight into its
        shardings, from the abstract shapes of the same function.
        """
        fn, args = self._init_fn(sample_batch, seed)
        return fn(*args)

    def _init_fn(self, sample_batch: Mapping[str, Any], seed: int):
        """``fn, args``: ``fn(*args)`` builds the initial state; jit it to place it anywhere,
        or ``jax.eval_shape`` it for the shapes alone."""
        tx = self.optimizer

        def keys():
            return jax.random.split(jax.random.key(seed))  # (init key, the state's rng)

        if isinstance(self.model, nnx.Module):
            graphdef, params, rest = nnx.split(self.model, nnx.Param, ...)
            self._nnx_graphdef = graphdef

            def nnx_fn(params, rest):
                return TrainState.create(params=params, tx=tx, rng=keys()[1], extras=rest)

            return nnx_fn, (params, rest)
        if isinstance(self.model, nn.Module):
            x = np.asarray(sample_batch[self.input_key])[:1]
            kwargs = self._linen_kwargs(train=False)

            def linen_fn(x):
                init_key, rng = keys()
                variables = dict(self.model.init({"params": init_key, "dropout": init_key}, x,
                                                 **kwargs))
                params = variables.pop("params")
                return TrainState.create(params=params, tx=tx, rng=rng,
                                         extras=variables or None, apply_fn=self.model.apply)

            return linen_fn, (x,)
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
        """Outputs and the new non-trainable state (BatchNorm statistics, RNG counters)."""
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
            outputs, extras = self._apply(params, state, batch[self.input_key], rng, train)
            labels = batch[self.label_key]
            # Padded eval rows carry mask 0. Dividing sums by the row count (not the mask
            # sum) keeps per-device means averageable; fit divides by "_weight" at the end.
            mask = batch.get("_mask", jnp.ones(labels.shape[0], jnp.float32))
            n = labels.shape[0]
            loss = jnp.sum(_per_example(self.per_example_loss(outputs, labels)) * mask) / n
            metrics = {name: jnp.sum(_per_example(fn(outputs, labels)) * mask) / n
                       for name, fn in self.metric_fns.items()}
            metrics["_weight"] = jnp.sum(mask) / n
            # Read by the host one step late; pmap averages it, so 1.0 means every device.
            metrics["_finite"] = jnp.isfinite(loss).astype(jnp.float32)
            return (loss, metrics, extras) if train else (loss, metrics)

        return loss_fn

    def _user_step(self):
        """``step_fn`` with the bookkeeping entries the loop reads (weight, finite flag)."""
        step_fn = self.step_fn

        def step(state, batch):
            new_state, metrics = step_fn(state, batch)
            if not isinstance(metrics, Mapping) or "loss" not in metrics:
                raise TypeError("step_fn must return (new_state, metrics) with a scalar "
                                f"metrics['loss']; got metrics {type(metrics).__name__} "
                                f"{sorted(metrics) if isinstance(metrics, Mapping) else ''}.")
            return new_state, {**metrics, "_weight": jnp.float32(1.0),
                               "_finite": jnp.isfinite(metrics["loss"]).astype(jnp.float32)}

        return step

    @property
    def global_step(self) -> int:
        """Training steps taken by this run (what the next checkpoint is numbered), counting
        those before a resume; 0 before ``fit``."""
        return self._loop.position if self._loop is not None else 0

    def _placement(self, mode: str | None = None) -> "_Placement":
        mode = mode or self.mode
        key = (mode, self.fsdp if mode == "jit" else 1)
        if key not in self._placements:
            self._placements[key] = _Placement(*key)
        return self._placements[key]

    def _compiled_step(self, kind: str, placement: "_Placement", template: Any) -> Callable:
        """The jitted ``kind`` step ("train", "eval", "predict") for states shaped like
        ``template``, built once per Trainer: a second ``evaluate()`` compiles nothing."""
        key = (kind, placement.mode, placement.fsdp, _shape_key(template))
        if key not in self._compiled:
            if kind == "train" and self.step_fn is not None:
                step = placement.user_step(self._user_step(), template)
            elif kind == "train":
                step = placement.train_step(self._loss_fn(train=True), template)
            elif kind == "eval":
                step = placement.eval_step(self._loss_fn(train=False), template)
            else:
                step = placement.predict_step(self._forward, template)
            self._compiled[key] = step
        return self._compiled[key]

    def _forward(self, state, x):
        return self._apply(state.params, state, x, state.step_rng(), train=False)[0]

    def _produced_names(self, template: Any, first: Mapping[str, Any], has_val: bool
                        ) -> list[str]:
        """The metrics each epoch row will hold, known before step 1 (``step_fn``'s from
        its abstract output: a trace, no compilation)."""
        val = ["loss", *self.metric_fns]
        if self.step_fn is None:
            train = list(val)
        else:
            batch = jax.tree.map(lambda v: jax.ShapeDtypeStruct(
                np.shape(v), jax.dtypes.canonicalize_dtype(np.asarray(v).dtype)), dict(first))
            metrics = jax.eval_shape(self._user_step(), template, batch)[1]
            train = [k for k in metrics if not k.startswith("_")]
        return train + ([f"val_{n}" for n in val] if has_val else [])

    # -- fit -----------------------------------------------------------------------------

    def fit(self, train_data: Any, val_data: Any = None, *, epochs: int = 10,
            batch_size: int = 32, checkpoint: CheckpointManager | str | os.PathLike | None = None,
            policy: CheckpointPolicy | None = None, early_stopping: EarlyStopping | None = None,
            resume: str | int | os.PathLike = "auto", callbacks: Sequence[Callback] = (),
            seed: int = 0, eval_batch_size: int | None = None, max_steps: int | None = None
            ) -> History:
        """Train for ``epochs``; checkpoint, evaluate, log and resume as configured.

        Args:
          train_data, val_data: ``(x, y)`` arrays (numpy or JAX, one example per row), a
            dict of equal-length arrays (keys ``input_key``/``label_key``), or a
            ``grain.MapDataset`` / random-access source of example dicts (see
            :func:`jaxckpt.data.as_dataset`).
          epochs: total epochs (a resumed run trains only what is left).
          batch_size: global batch size (split over processes and devices), at most the
            number of training examples. An epoch is its full batches: the last partial
            batch is dropped (``N % batch_size`` examples, different ones each epoch as the
            data are reshuffled), so every step has the compiled shape; the start-up line
            says how many.
          checkpoint: a directory, or a :class:`CheckpointManager` you own (``fit`` waits
            for its writes but never closes it; a directory's manager is closed).
          policy: the checkpoint policy when ``checkpoint`` is a directory; default keeps
            the best by ``val_loss`` (``loss`` without validation data) and the latest,
            saving every epoch; with ``early_stopping`` that restores best weights, the
            best as early stopping judges it (so a rerun restores that epoch too).
          early_stopping: an :class:`EarlyStopping`, or None.
          resume: ``"auto"`` (continue from the latest checkpoint in ``checkpoint`` if
            there is one, else start), ``"never"`` (start; refuse a directory that already
            holds checkpoints), ``"latest"``, ``"best"`` or a step (that checkpoint must
            exist, and be the newest), or the path of another run's checkpoint directory
            (or of one step in it, ``.../45``): start a new run from its parameters (its
            best checkpoint, else its latest), with a fresh optimizer state, step and
            history. One line says what was restored and what is left to do.
          callbacks: :class:`jaxckpt.Callback` instances (loggers included).
          seed: seeds parameters, dropout and shuffling.
          eval_batch_size: batch size for evaluation (default ``batch_size``).
          max_steps: stop after this many steps in total (for tests and smoke runs).

        Returns:
          The :class:`History` of every epoch, including those before a resume.

        Raises:
          MetricError: a checkpoint policy or early stopping monitors a metric this Trainer
            does not produce (before any training; the message lists what it produces).
          ValueError: the data lack ``input_key``/``label_key`` (names the keys they have);
            ``batch_size`` exceeds the training examples; ``metrics`` hold accuracy for
            outputs that are not class logits (a regression: pass ``metrics=()``); the loss
            or a metric is not per example (labels ``[B]`` broadcast against outputs
            ``[B, 1]``); the checkpoint directory's run has another model or optimizer
            (``RestoreStructureError``).
          SystemExit: after SIGTERM (status 0) or Ctrl-C (130), once the checkpoint is saved.
        """
        _check_counts(epochs=epochs, batch_size=batch_size, eval_batch_size=eval_batch_size,
                      max_steps=max_steps)
        self.stop_training = False
        self._signals.install(self.handle_signals)  # first: a Ctrl-C in start-up is kept
        manager, own_manager = None, False
        try:
            train_ds = data_lib.as_dataset(train_data, self.input_key, self.label_key)
            val_ds = data_lib.as_dataset(val_data, self.input_key, self.label_key)
            keys = (self.input_key, self.label_key)
            example = train_ds[0]
            if self.step_fn is None:
                data_lib.check_keys(example, *keys)
                self._check_labels(example)
            if val_ds is not None:
                data_lib.check_keys(val_ds[0], *keys)
                self._check_labels(val_ds[0])
            nproc, pid = jax.process_count(), jax.process_index()
            if batch_size % nproc:
                raise ValueError(f"batch_size {batch_size} must split evenly over {nproc} "
                                 "processes.")
            local_bs = batch_size // nproc
            _check_batch_fits(len(train_ds), batch_size, nproc)
            steps_per_epoch = data_lib.num_batches(train_ds, local_bs, shard_count=nproc)
            total_steps = epochs * steps_per_epoch
            if max_steps is not None:
                total_steps = min(total_steps, max_steps)
            # One example as a batch of one: for Linen's init and the abstract shapes.
            first = jax.tree.map(lambda v: np.asarray(v)[None], self._select(example))
            init_fn, init_args = self._init_fn(first, seed)
            template = jax.eval_shape(init_fn, *init_args)  # shapes only: nothing allocated
            self._check_outputs(template, example, batch_size)
            names = self._produced_names(template, first, val_ds is not None)
            monitor = "val_loss" if val_ds is not None else "loss"
            policy_monitor = (checkpoint.policy.monitor if isinstance(checkpoint, CheckpointManager)
                              else (policy.monitor if policy is not None else None))
            _check_monitors(names, val_ds is not None, policy_monitor, early_stopping)
            manager, own_manager = _open_manager(checkpoint, policy, monitor, early_stopping)
            plan = _resume_plan(resume, manager)
            placement = self._placement()
            make_iter = lambda: data_lib.batches(  # noqa: E731 - the one pipeline, rebuilt on rollback
                train_ds, local_bs, seed=seed, num_epochs=None, transform=None,
                shard_index=pid, shard_count=nproc)
            run = _Run(placement=placement, template=template, manager=manager,
                       loop=_LoopState(history=History(monitor=monitor), shape={
                           "steps_per_epoch": steps_per_epoch, "batch_size": batch_size,
                           "examples": len(train_ds)}), make_iter=make_iter,
                       iterator=make_iter(), steps_per_epoch=steps_per_epoch, epochs=epochs,
                       total_steps=total_steps, val_ds=val_ds,
                       eval_batch_size=eval_batch_size or batch_size,
                       early_stopping=early_stopping, callbacks=CallbackList(callbacks),
                       dropped=len(train_ds) - steps_per_epoch * batch_size)
            history = run.loop.history
            if early_stopping is not None:
                _judge_like(history, early_stopping.objective)
                run.loop.early_stopping = early_stopping
            elif manager is not None and manager.policy.monitor:
                _judge_like(history, manager.policy.objective)
            state = self._start(run, plan, init_fn, init_args, seed)
            if manager is not None:
                run.loop.history.directory = str(manager.directory)
            run.train_step = self._compiled_step("train", placement, template)
            run.eval_step = self._compiled_step("eval", placement, template)
            state = self._train(run, state, names)
        finally:
            self._signals.restore()
            if manager is not None:
                manager.close() if own_manager else manager.wait()
        self.state = placement.checkpointable(state)  # unreplicated in pmap mode
        return run.loop.history

    def _select(self, example: Mapping[str, Any]) -> dict[str, Any]:
        """The entries the default step reads (of an example or a batch); ``step_fn`` gets
        them all."""
        if self.step_fn is not None:
            return dict(example)
        return {k: example[k] for k in (self.input_key, self.label_key) if k in example}

    # -- start: resume, fine-tune or begin -----------------------------------------------

    def _start(self, run: "_Run", plan: tuple[str, Any], init_fn, init_args, seed: int):
        """The state to train from, placed; the resume line printed."""
        kind, which = plan
        manager, loop = run.manager, run.loop
        if kind == "continue":
            try:
                ckpt = manager.restore_checkpoint(
                    which, target=run.placement.restore_target(run.template))
            except RestoreStructureError as e:
                raise _another_run_error(manager.directory, run.template, e) from e
            _check_same_epochs(ckpt.data_state, loop.shape, manager.directory)
            restored = loop.from_json(ckpt.data_state, run.iterator)
            what = ["params", "optimizer state", "step", "RNG", "extras"]
            if restored:
                what += ["data position", f"history ({len(loop.history.rows)} epochs)"]
                what += ["early-stopping state"] if run.early_stopping is not None else []
            loop.history.events.append({"event": "resume", "step": ckpt.step,
                                        "position": loop.position})
            if not restored:  # a checkpoint without the loop's state: its step is the position
                loop.position = ckpt.step
            run.saved_at = run.start_position = loop.position
            self._print(f"resumed from checkpoint step {ckpt.step} in {manager.directory}: "
                        f"restored {', '.join(what)}; {self._left(run)}")
            return run.placement.place(_merge_static(run.template, ckpt.state))
        if kind == "finetune":
            src_dir, step, params, extras = _finetune_source(which, run.template)
            loop.history.events.append({"event": "finetune", "from": str(src_dir),
                                        "step": step})
            self._print(f"fine-tuning from checkpoint step {step} of {src_dir}: restored its "
                        f"params{' and extras' if extras is not None else ''}; optimizer state, "
                        f"step, RNG and history start fresh; {self._left(run)}")
            return run.placement.init(_fresh_fn(run.template, seed), (params, extras),
                                      run.template)
        if run.dropped:
            n = run.loop.shape["examples"]
            self._print(f"each epoch trains on {n - run.dropped} of the {n} training examples: "
                        f"its last partial batch ({run.dropped}, others each epoch as the data "
                        "are reshuffled) is dropped", routine=True)
        if manager is not None:
            self._print(f"new run in {manager.directory}: {self._left(run)}", routine=True)
        elif self.state is not None:  # Keras's fit() would go on from the trained model
            self._print("new run from fresh weights: without checkpoint=, fit() does not "
                        "continue the previous fit() (pass checkpoint= to continue a run)")
        return run.placement.init(init_fn, init_args, run.template)

    def _left(self, run: "_Run") -> str:
        loop = run.loop
        done = len(loop.history.rows)
        if loop.stopped:
            return f"nothing left to do: early stopping ended the run at epoch {done}"
        if loop.position >= run.total_steps:
            return (f"nothing left to do: the run finished at epoch {done} (step "
                    f"{loop.position}); pass a larger epochs= to train on")
        left = -(-(run.total_steps - loop.position) // run.steps_per_epoch)
        at = "" if loop.position == done * run.steps_per_epoch else \
            f", epoch {done + 1} continues at step {loop.position}"
        return (f"{left} of {run.epochs} epochs to train{at} ({run.steps_per_epoch} steps "
                "per epoch)")

    # -- the loop ------------------------------------------------------------------------

    def _train(self, run: "_Run", state, names: list[str]):
        """Epochs until done, stopped or preempted; callbacks around it all."""
        loop, spe = run.loop, run.steps_per_epoch
        self.history, self.state, self._loop = loop.history, state, loop
        run.callbacks.on_train_begin(self, {
            "epochs": run.epochs, "steps_per_epoch": spe,
            "initial_epoch": len(loop.history.rows), "initial_step": loop.position,
            "metric_names": list(names), "history": loop.history,
            "checkpoint_dir": str(run.manager.directory) if run.manager is not None else None})
        try:
            state, stop = self._stop_point(run, state, candidate=True)  # Ctrl-C in start-up
            while not stop and loop.position < run.total_steps and not loop.stopped:
                epoch = loop.position // spe + 1
                run.callbacks.on_epoch_begin(self, epoch, {})
                state, outcome = self._train_epoch(run, state, min(epoch * spe, run.total_steps))
                if outcome == "rollback":
                    continue
                if outcome == "stop":
                    break
                if loop.position < epoch * spe:
                    break  # max_steps ended the run inside an epoch
                state = self._end_epoch(run, state, epoch)
                state, stop = self._stop_point(run, state, candidate=True)
            es = run.early_stopping
            if es and es.restore_best_weights and loop.es_best_epoch:
                state = self._restore_best(run, state)
            run.status = "stopped" if (loop.stopped or self.stop_training) else "finished"
            return state
        finally:
            run.callbacks.on_train_end(self, {"history": loop.history, "status": run.status})

    def _train_epoch(self, run: "_Run", state, end: int):
        """Steps from ``loop.position`` to ``end``; returns the state and None, "stop" or
        "rollback" (the loop state then is a checkpoint's: the caller starts over)."""
        loop, cbs, spe = run.loop, run.callbacks, run.steps_per_epoch
        epoch0 = loop.position // spe
        epoch_end = (epoch0 + 1) * spe
        manager = run.manager if _saves_mid_epoch(run.manager) else None
        single = jax.process_count() == 1
        # A clock-reading policy's answer is one broadcast in a multi-process job: asked only
        # where the processes meet anyway, so a save comes at most sync_every steps late.
        ask_every = 1 if single or not manager or not manager.policy.reads_clock else \
            self.sync_every
        with _progress(self.quiet or jax.process_index() != 0, epoch0, run.epochs,
                       end - epoch0 * spe, loop.position - epoch0 * spe) as advance:
            while loop.position < end:
                batch = self._select(next(run.iterator))
                position = loop.position
                loop.position += 1
                if position in loop.skipped:
                    advance()
                    continue
                if cbs.wants_steps:
                    cbs.on_step_begin(self, loop.position, {})
                state, metrics = run.train_step(state, run.placement.batch(batch))
                self.state = state
                bad = self._settle(run)  # the step before: done by now, or nearly
                run.pending = (position, metrics)
                if bad is not None:
                    return self._nonfinite(run, bad), "rollback"
                if cbs.wants_steps:
                    cbs.on_step_end(self, loop.position, _public(metrics))
                advance()
                if loop.position >= epoch_end:
                    break  # the epoch's end is the caller's: evaluation, row, checkpoint
                due = manager is not None and loop.position % ask_every == 0 and \
                    manager.should_save(loop.position)
                candidate = single or due or loop.position % self.sync_every == 0
                state, stop = self._stop_point(run, state, candidate)
                if stop:
                    return state, "stop"
                if due:
                    bad = self._settle(run)
                    if bad is not None:
                        return self._nonfinite(run, bad), "rollback"
                    self._save(run, state, reason="interval")
        bad = self._settle(run)
        if bad is not None:
            return self._nonfinite(run, bad), "rollback"
        return state, None

    def _settle(self, run: "_Run") -> int | None:
        """Bring the pending step's metrics to the host and add them to the epoch's sums.

        Called after the next step is dispatched, so the host waits at most for a step that
        is already running. Returns the step's position if its loss was not finite.
        """
        if run.pending is None:
            return None
        position, metrics = run.pending
        run.pending = None
        host = jax.device_get(metrics)
        if float(host.get("_finite", 1.0)) != 1.0 and self.on_nonfinite != "ignore":
            return position
        _fold(run.loop.sums, host)
        return None

    def _end_epoch(self, run: "_Run", state, epoch: int):
        loop, es, manager = run.loop, run.early_stopping, run.manager
        row = {"epoch": epoch, **_finish(loop.sums)}
        loop.sums = {}
        if run.val_ds is not None:
            val = self._evaluate(run.val_ds, run.eval_batch_size, state, run.placement,
                                 run.eval_step)
            row.update({f"val_{k}": v for k, v in val.items()})
        row["time"] = time.time()
        loop.history.rows.append(row)
        improved = _update_early_stopping(loop, es, row)
        if loop.stopped:  # before the save: the checkpoint's history holds the event
            loop.history.events.append({"event": "early_stop", "epoch": epoch})
        if improved and es and es.restore_best_weights and not \
                _manager_tracks(manager, es):
            run.best_copy = _host_copy(run.placement.checkpointable(state))
        saved = False
        if manager is not None:
            metrics = _checkpoint_metrics(row)
            run.epoch_end = (loop.position, metrics, epoch)
            # The run's last epoch is always written, whatever the schedule: the end of a
            # run is what a user restores or resumes from.
            last = epoch == run.epochs or loop.stopped
            saved = self._save(run, state, metrics=metrics, epoch=epoch, force=last,
                               reason="end" if last else "epoch")
        run.callbacks.on_epoch_end(self, epoch, dict(row))
        self._epoch_line(row, run.epochs, saved, manager)
        if loop.stopped:
            self._print(f"early stopping at epoch {epoch}: {es.monitor} did not improve for "
                        f"{es.patience} epochs")
        return state

    def _save(self, run: "_Run", state, *, metrics=None, epoch=None, force=False,
              reason: str) -> bool:
        loop = run.loop
        saved = run.manager.save(loop.position, run.placement.checkpointable(state),
                                 metrics=metrics, data_state=loop.to_json(run.iterator, loop.sums),
                                 epoch=epoch, force=force)
        if saved:
            run.saved_at = loop.position
            run.callbacks.on_checkpoint_saved(self, loop.position, {
                "step": loop.position, "epoch": epoch, "metrics": metrics,
                "directory": str(run.manager.directory), "reason": reason})
        return saved

    # -- stopping: signals, callbacks, preemption ------------------------------------------

    def _agreed_stop(self, candidate: bool) -> int:
        """Why to stop now (0: don't). Multi-process runs agree, with one small allgather,
        only at candidate points, so no process stops a step before the others."""
        local = max(self._signals.reason, _CALLBACK if self.stop_training else 0)
        if jax.process_count() == 1:
            return local
        if not candidate:
            return 0
        from jax.experimental import multihost_utils
        return int(np.max(multihost_utils.process_allgather(np.int32(local))))

    def _stop_point(self, run: "_Run", state, candidate: bool):
        """Stop here if asked: save (unless this step is saved already), then exit
        (signals) or return ``(state, True)`` (a callback's request)."""
        reason = self._agreed_stop(candidate)
        if not reason:
            return state, False
        bad = self._settle(run)
        if bad is not None:
            state = self._nonfinite(run, bad)
        loop, manager = run.loop, run.manager
        if reason == _CALLBACK:
            loop.history.events.append({"event": "stop", "step": loop.position})
        if manager is not None and loop.position not in (run.saved_at, run.start_position):
            metrics, epoch = None, None
            if run.epoch_end and run.epoch_end[0] == loop.position:
                _, metrics, epoch = run.epoch_end  # the same entry as the epoch's own save
            self._save(run, state, metrics=metrics, epoch=epoch, force=True, reason="stop")
        if manager is not None:
            manager.wait()
        if manager is None:
            where = "no checkpoint directory given; nothing saved"
        elif loop.position == run.start_position:
            where = f"nothing trained yet; the checkpoints in {manager.directory} are unchanged"
        else:
            where = f"saved checkpoint at step {loop.position} in {manager.directory}"
        if reason == _CALLBACK:
            then = "fit() again to continue" if manager is not None else (
                "trainer.state holds the weights, but a new fit() starts over: pass "
                "checkpoint= to make a stopped run continue")
            self._print(f"stop requested by a callback: {where}; {then}.")
            return state, True
        run.status = "preempted"
        self.state = state
        then = "Rerun the same command to resume" if manager is not None else (
            "nothing can resume this run: pass checkpoint= to fit() to make it resumable")
        self._print(f"{'SIGTERM' if reason == _SIGTERM else 'Ctrl-C'}: {where}; exiting. "
                    f"{then}.")
        raise SystemExit(0 if reason == _SIGTERM else 130)

    # -- evaluate and predict --------------------------------------------------------------

    def evaluate(self, data: Any, batch_size: int = 256, *, state: TrainState | None = None
                 ) -> dict[str, float]:
        """Loss and metrics over all of ``data`` (the last partial batch is padded, masked).

        ``data`` takes the forms ``fit`` takes. The compiled step is kept: evaluating again
        (other data of the same shapes, another state) compiles nothing.
        """
        ds = data_lib.as_dataset(data, self.input_key, self.label_key)
        data_lib.check_keys(ds[0], self.input_key, self.label_key)
        self._check_labels(ds[0])
        state = self._given_state(state)
        self._check_outputs(state, ds[0], batch_size)
        placement = self._placement()
        step = self._compiled_step("eval", placement, _abstract(state))
        return self._evaluate(ds, batch_size, placement.place(state), placement, step)

    def _evaluate(self, ds, batch_size: int, state, placement: "_Placement", step
                  ) -> dict[str, float]:
        nproc, pid = jax.process_count(), jax.process_index()
        local_bs = max(1, batch_size // nproc)
        local_bs += (-local_bs) % placement.local_devices
        it = data_lib.batches(ds, local_bs, shuffle=False, drop_remainder=False,
                              transform=None, shard_index=pid, shard_count=nproc)
        outs = [step(state, placement.batch(_pad(self._select(batch), local_bs))) for batch in it]
        sums: dict[str, Any] = {}
        for metrics in jax.device_get(outs):  # one transfer, then sums in batch order
            _fold(sums, metrics)
        return _finish(sums)

    def predict(self, data: Any, batch_size: int = 256, *, state: TrainState | None = None
                ) -> Any:
        """The model's outputs for every example of ``data``, in order, as numpy arrays.

        ``data``: an array of inputs, ``(x, y)`` (labels ignored), or anything ``fit``
        takes that holds ``input_key``. Runs jitted over all devices; in a multi-process
        run every process passes the same data and gets all outputs.
        """
        ds = data_lib.as_dataset(data, self.input_key, self.label_key)
        data_lib.check_keys(ds[0], self.input_key)
        state = self._given_state(state)
        placement = self._placement("jit")
        step = self._compiled_step("predict", placement, _abstract(state))
        state = placement.place(state)
        devices = placement.mesh.size
        rows = max(batch_size, devices) + (-max(batch_size, devices)) % devices
        it = data_lib.batches(ds, rows, shuffle=False, drop_remainder=False, transform=None)
        outs = []
        for batch in it:
            x = np.asarray(batch[self.input_key])
            n = len(x)
            if n < rows:
                x = np.concatenate([x, np.repeat(x[-1:], rows - n, axis=0)])
            outs.append((step(state, placement.replicated_batch(x)), n))
        host = [jax.tree.map(lambda a, n=n: _gather(a)[:n], out) for out, n in outs]
        return jax.tree.map(lambda *parts: np.concatenate(parts), *host)

    def _given_state(self, state):
        state = state if state is not None else self.state
        if state is None:
            raise ValueError("no trained state: call fit() first, or pass state= (e.g. "
                             "CheckpointManager(...).restore('best', target=...)).")
        if isinstance(self.model, nnx.Module) and self._nnx_graphdef is None:
            self._nnx_graphdef = nnx.split(self.model, nnx.Param, ...)[0]
        return state

    # -- rollback, best weights --------------------------------------------------------------

    def _check_labels(self, example: Mapping[str, Any]) -> None:
        """The default loss takes one integer class id per example: say so before anything
        is compiled, rather than let optax fail on a float or one-hot label inside it."""
        if self.per_example_loss is not optax.softmax_cross_entropy_with_integer_labels:
            return
        label = np.asarray(example[self.label_key])
        if label.dtype.kind in "iu" and label.ndim == 0:
            return
        fix = ("" if label.ndim == 0 else
               "; for one-hot or soft labels pass Trainer(loss_fn=optax.softmax_cross_entropy)"
               if label.dtype.kind == "f" and label.ndim == 1 else
               "; for one class id per example pass y.reshape(-1)" if label.size == 1 else
               "; or pass a loss_fn that takes these labels")
        raise TypeError(
            f"labels ({self.label_key!r}) are {label.dtype} of shape {label.shape} per "
            "example, but the default loss (optax.softmax_cross_entropy_with_integer_labels) "
            f"takes one integer class id per example: cast class ids to int32{fix}.")

    def _check_outputs(self, state: Any, example: Mapping[str, Any], rows: int) -> None:
        """Trace (never compile) the model, the loss and the metrics on an abstract batch of
        ``rows`` examples, and refuse what would train or report nonsense without failing:
        accuracy of a one-output model or of regression targets (always 1.0, or noise), and
        a loss whose labels broadcast against the outputs into ``[B, B]``. Once per shapes."""
        if self.step_fn is not None:
            return
        label = np.asarray(example[self.label_key])
        key = (_shape_key(state), _shape_key(dict(self._select(example))), rows)
        if key in self._checked:
            return
        batch = {k: jax.ShapeDtypeStruct((rows, *np.shape(v)), jax.dtypes.canonicalize_dtype(
            np.asarray(v).dtype)) for k, v in self._select(example).items()}
        outputs = jax.eval_shape(self._forward, state, batch[self.input_key])
        labels = batch[self.label_key]
        fns = {"loss_fn": self.per_example_loss}
        for name, fn in self.metric_fns.items():
            if fn is accuracy and hasattr(outputs, "shape"):
                problem = _accuracy_problem(tuple(outputs.shape[1:]), label)
                if problem:
                    raise ValueError(
                        f"metric {name!r} needs class logits and class labels, but {problem}. "
                        "For a regression pass Trainer(metrics=()) (or metrics={name: fn} of "
                        "your own); for a classification give the model one output per class "
                        "and a classification loss (the default, for integer class ids, or "
                        "optax.softmax_cross_entropy for one-hot labels).")
            elif fn is not accuracy:
                fns[f"metric {name!r}"] = fn
        for who, fn in fns.items():
            values = jax.eval_shape(fn, outputs, labels)
            problem = _per_example_problem(tuple(np.shape(values)), rows, labels.shape,
                                           getattr(outputs, "shape", None))
            if problem:
                raise ValueError(f"{who} returns shape {tuple(np.shape(values))} for a batch "
                                 f"of {rows} examples with outputs "
                                 f"{tuple(getattr(outputs, 'shape', ()))} and labels "
                                 f"{tuple(labels.shape)}: {problem}")
        self._checked.add(key)

    def _nonfinite(self, run: "_Run", position: int):
        loop, manager = run.loop, run.manager
        if self.on_nonfinite == "raise" and position == 0:
            raise NonFiniteLossError(
                "training loss is not finite at step 0, the first, before any update: the "
                "data or the loss is at fault, not the learning rate. Look for NaN or inf "
                "in the inputs, and check that every label is a class id in [0, number of "
                "classes): the default loss is NaN for a label out of range.")
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
        ckpt = manager.restore_checkpoint(
            "latest", target=run.placement.restore_target(run.template))
        events = list(loop.history.events)
        run.iterator = run.make_iter()
        loop.from_json(ckpt.data_state, run.iterator)
        loop.skipped = set(skipped)
        loop.rollbacks += 1
        loop.history.events = events + [{"event": "nonfinite_rollback", "step": position,
                                         "restored_step": ckpt.step}]
        run.pending, run.saved_at = None, ckpt.step
        self._print(f"non-finite loss at step {position}: rolled back to checkpoint "
                    f"{ckpt.step}, skipping batch {position}")
        return run.placement.place(_merge_static(run.template, ckpt.state))

    def _restore_best(self, run: "_Run", state):
        """The early-stopping best epoch's state: the manager's best checkpoint when it is
        that epoch, else this process's copy, else that epoch's own checkpoint if kept (a
        rerun or resume has no copy)."""
        manager, placement, template = run.manager, run.placement, run.template
        es, epoch = run.early_stopping, run.loop.es_best_epoch
        which = None
        if _manager_tracks(manager, es) and manager.best_step() is not None:
            which = "best"
        elif run.best_copy is not None:
            self._print(f"restored best weights of epoch {epoch}")
            return placement.place(_merge_static(template, run.best_copy))
        elif manager is not None and epoch * run.steps_per_epoch in manager.steps():
            which = epoch * run.steps_per_epoch
        if which is not None:
            ckpt = manager.restore_checkpoint(which, target=placement.restore_target(template))
            self._print(f"restored best weights of epoch {epoch}: checkpoint step {ckpt.step}")
            return placement.place(_merge_static(template, ckpt.state))
        log.warning("restore_best_weights: the weights of epoch %s are neither in memory (the "
                    "run restarted) nor kept in the checkpoint directory (its policy does not "
                    "rank by %s as EarlyStopping does); the state is the last epoch's",
                    epoch, es.monitor)
        return state

    # -- output ----------------------------------------------------------------------------

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


# -- signals -------------------------------------------------------------------------------

_CALLBACK, _SIGTERM, _SIGINT = 1, 2, 3  # stop reasons; the larger wins when several arrive


class _Signals:
    """SIGTERM and Ctrl-C while ``fit`` runs. The first asks for a graceful stop (finish the
    step, save, exit); a second Ctrl-C raises KeyboardInterrupt at once."""

    def __init__(self):
        self.reason = 0
        self._previous: dict | None = None

    def install(self, enabled: bool) -> None:
        self.reason = 0
        if enabled and _main_thread():
            self._previous = {s: signal.signal(s, self._handle)
                              for s in (signal.SIGTERM, signal.SIGINT)}

    def restore(self) -> None:
        previous, self._previous = self._previous, None
        if previous and _main_thread():
            for signum, handler in previous.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def _handle(self, signum, frame) -> None:
        if signum != signal.SIGINT:
            self.reason = max(self.reason, _SIGTERM)
            return
        if self.reason == _SIGINT:
            self.restore()  # a third press meets Python's own handler
            raise KeyboardInterrupt("a second Ctrl-C: aborted without saving")
        self.reason = _SIGINT
        if jax.process_index() == 0:  # os.write: print() is not safe inside a handler
            os.write(2, b"\nCtrl-C: finishing the step, then saving a checkpoint; press "
                        b"Ctrl-C again to abort at once.\n")


# -- placement: jit (mesh) or pmap -------------------------------------------------------


class _Placement:
    """Where state and batches live, and the compiled steps, for one mode."""

    def __init__(self, mode: str, fsdp: int):
        self.mode, self.fsdp = mode, fsdp
        if mode == "jit":
            devices = jax.device_count()
            if devices % fsdp:
                raise ValueError(
                    f"Trainer(fsdp={fsdp}) needs a device count it divides; this job has "
                    f"{devices} device(s): use an fsdp that divides {devices} (fsdp=1 for "
                    "plain data parallelism).")
            self.mesh = parallel.make_mesh(fsdp=fsdp)
            self.local_devices = len(self.mesh.local_devices)
        else:
            self.mesh = None
            self.local_devices = jax.local_device_count()

    def shardings(self, abstract):
        return parallel.state_sharding(abstract, self.mesh)

    def init(self, fn, args, abstract):
        """``fn(*args)`` placed for this mode. A state split over devices (FSDP) is computed
        under jit straight into its shardings, so no device ever holds all of it. One that
        every device holds whole anyway is computed eagerly and copied out: the same
        memory, without compiling the init (seconds on a CPU, even for a small model)."""
        if self.mode == "pmap":
            return parallel.replicate(fn(*args))
        shardings = self.shardings(abstract)
        if all(s.is_fully_replicated for s in jax.tree.leaves(shardings)):
            return jax.device_put(fn(*args), shardings)
        return jax.jit(fn, out_shardings=shardings)(*args)

    def place(self, state):
        """Place an unreplicated state (host, one device or another mesh) for this mode."""
        if self.mode == "pmap":
            return parallel.replicate(state)
        return jax.device_put(state, self.shardings(state))

    def restore_target(self, state):
        """Abstract arrays placed where this mode wants the (unreplicated) state."""
        if self.mode == "pmap":
            local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=local),
                                state)
        return parallel.abstract_state(state, self.shardings(state))

    def checkpointable(self, state):
        return parallel.unreplicate(state) if self.mode == "pmap" else state

    def batch(self, batch):
        if self.mode == "pmap":
            return batch
        return parallel.shard_batch(batch, self.mesh)

    def replicated_batch(self, x):
        """A global batch from rows every process holds in full (for predict)."""
        return jax.make_array_from_process_local_data(parallel.batch_sharding(self.mesh), x,
                                                      x.shape)

    def train_step(self, loss_fn, abstract):
        if self.mode == "pmap":
            return parallel.make_pmap_train_step(loss_fn)
        return parallel.make_train_step(loss_fn, self.mesh, self.shardings(abstract))

    def user_step(self, step, abstract):
        shardings = self.shardings(abstract)
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        return jax.jit(step, in_shardings=(shardings, parallel.batch_sharding(self.mesh)),
                       out_shardings=(shardings, replicated), donate_argnums=0)

    def eval_step(self, loss_fn, abstract):
        if self.mode == "pmap":
            return parallel.make_pmap_eval_step(loss_fn)
        return parallel.make_eval_step(loss_fn, self.mesh, self.shardings(abstract))

    def predict_step(self, forward, abstract):
        rows = parallel.batch_sharding(self.mesh)
        return jax.jit(forward, in_shardings=(self.shardings(abstract), rows),
                       out_shardings=rows)


@dataclasses.dataclass
class _Run:
    """What one ``fit`` call works with; the part that is checkpointed is ``loop``."""

    placement: _Placement
    template: Any               # the abstract state: shapes, dtypes, static fields
    manager: CheckpointManager | None
    loop: "_LoopState"
    make_iter: Callable[[], Any]
    iterator: Any
    steps_per_epoch: int
    epochs: int
    total_steps: int
    val_ds: Any
    eval_batch_size: int
    early_stopping: Any
    callbacks: CallbackList
    train_step: Callable | None = None
    eval_step: Callable | None = None
    pending: tuple[int, Any] | None = None   # the newest step's (position, device metrics)
    saved_at: int | None = None              # position of this run's newest checkpoint
    start_position: int = 0
    epoch_end: tuple[int, dict, int] | None = None  # (position, metrics, epoch) of the last
    best_copy: Any = None
    status: str = "failed"
    dropped: int = 0  # training examples past each epoch's last full batch


# -- the loop's own checkpointed state ---------------------------------------------------


@dataclasses.dataclass
class _LoopState:
    """Everything besides the arrays that an exact resume needs (saved as JSON)."""

    history: History
    position: int = 0          # batches consumed since the start (the checkpoint step)
    skipped: set[int] = dataclasses.field(default_factory=set)
    rollbacks: int = 0
    early_stopping: EarlyStopping | None = None  # settings and tracker, one value
    sums: dict[str, float] = dataclasses.field(default_factory=dict)  # of a partial epoch
    shape: dict[str, int] = dataclasses.field(default_factory=dict)  # steps_per_epoch, ...

    @property
    def stopped(self) -> bool:
        return self.early_stopping is not None and self.early_stopping.should_stop

    @property
    def es_best_epoch(self) -> int | None:
        return self.early_stopping.best_epoch if self.early_stopping is not None else None

    def to_json(self, iterator, sums: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """JSON of the loop; ``sums`` are the running metric sums of an unfinished epoch
        (floats hold float32 values exactly, so a resumed epoch averages identically)."""
        return {"format": _LOOP_FORMAT, "iterator": iterator.get_state(),
                "position": self.position, "skipped": sorted(self.skipped),
                "sums": {k: json_number(float(v))
                         for k, v in jax.device_get(dict(sums or {})).items()},
                "rollbacks": self.rollbacks, "history": self.history.to_json(),
                "shape": dict(self.shape),
                "early_stopping": (self.early_stopping.to_json()
                                   if self.early_stopping is not None else None)}

    def from_json(self, data: Any, iterator) -> bool:
        """Load a checkpoint's loop state; False (and position from the step) if absent."""
        if not isinstance(data, dict) or data.get("format") != _LOOP_FORMAT:
            return False
        iterator.set_state(data["iterator"])
        self.position = int(data["position"])
        self.skipped = set(int(s) for s in data.get("skipped", []))
        self.rollbacks = int(data.get("rollbacks", 0))
        self.sums = {k: np.float32(number_from_json(v))
                     for k, v in data.get("sums", {}).items()}
        self.history = History.from_json(data["history"])
        stored = data.get("early_stopping")
        if self.early_stopping is not None and stored:  # this run's settings, stored tracker
            self.early_stopping = self.early_stopping.resume(EarlyStopping.from_json(stored))
        return True


def _check_same_epochs(data: Any, shape: Mapping[str, int], directory) -> None:
    """Refuse to continue a run whose epochs were cut differently (another batch_size or
    training set): its position and history count steps of the old epochs, so epochs would
    be skipped or repeated. Checkpoints older than the stored shape are checked by their
    position alone (it must lie in the epoch after the last history row)."""
    if not isinstance(data, dict) or data.get("format") != _LOOP_FORMAT:
        return
    spe, stored = shape["steps_per_epoch"], data.get("shape") or {}
    rows, position = len(data["history"].get("rows", [])), int(data["position"])
    if stored.get("steps_per_epoch", spe) == spe and position // spe == rows:
        return
    was = (f"{stored['steps_per_epoch']} steps per epoch (batch_size {stored['batch_size']}, "
           f"{stored['examples']} training examples)" if stored else
           f"other epochs ({rows} epochs done at step {position})")
    raise ValueError(
        f"the run in {directory} was trained with {was}; this fit has {spe} (batch_size "
        f"{shape['batch_size']}, {shape['examples']} training examples), so its epochs would "
        "not line up with the saved history. Resume with the same batch_size and training "
        f"data, or start a new run from its weights: fit(checkpoint=<a new directory>, "
        f"resume={str(directory)!r}).")


def _update_early_stopping(loop: _LoopState, es: EarlyStopping | None, row: dict) -> bool:
    """Advance the early-stopping tracker with an epoch's row; True when it improved."""
    if es is None:
        return False
    if es.monitor not in row:
        raise ValueError(f"EarlyStopping monitors {es.monitor!r} but the epoch metrics are "
                         f"{sorted(k for k in row if k not in ('epoch', 'time'))}.")
    loop.early_stopping, improved = (loop.early_stopping or es).update(
        row[es.monitor], epoch=int(row["epoch"]))
    return improved


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


def _check_monitors(names: list[str], has_val: bool, policy_monitor: str | None,
                    early_stopping) -> None:
    """Refuse, before step 1, a monitored metric that no epoch will produce."""
    for who, monitor in (("the checkpoint policy", policy_monitor),
                         ("EarlyStopping", getattr(early_stopping, "monitor", None))):
        if monitor and monitor not in names:
            hint = " (val_* metrics need val_data)" if monitor.startswith("val_") and \
                not has_val else ""
            raise MetricError(
                f"{who} monitors {monitor!r}, but each epoch of this fit produces {names}"
                f"{hint}. Monitor one of those, or change Trainer(metrics=...) or "
                "fit(val_data=...).")


_RESUME_WORDS = ("auto", "never", "latest", "best")


def _check_counts(**counts: Any) -> None:
    """``fit``'s counts are whole numbers >= 1 (None: not given); a float ``epochs`` would
    train part of an epoch that no history row shows."""
    for name, value in counts.items():
        if value is None and name in ("eval_batch_size", "max_steps"):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            hint = " (for part of an epoch, pass max_steps=)" if name == "epochs" and \
                isinstance(value, float) else ""
            raise ValueError(f"{name} must be an int >= 1, got {value!r}{hint}.")


def _check_batch_fits(examples: int, batch_size: int, processes: int) -> None:
    """An epoch is its full batches (the last partial one is dropped, so every step has the
    compiled shape): a batch larger than the data would make an epoch of no steps."""
    if examples // processes < batch_size // processes:
        where = f" ({examples // processes} per process)" if processes > 1 else ""
        raise ValueError(
            f"batch_size={batch_size} is larger than the {examples} training examples"
            f"{where}: fit drops each epoch's last partial batch, so an epoch would have no "
            f"steps. Use a batch_size <= {examples // processes * processes} (the number of "
            "examples), or more training data.")


def _check_resume_word(resume: Any) -> None:
    """A bare word that is neither a resume keyword nor an existing path is a typo
    (``"lastest"``), not a run to fine-tune from: say what ``resume`` accepts."""
    if not isinstance(resume, str) or resume in _RESUME_WORDS or "/" in resume or \
            os.sep in resume or os.path.exists(resume):
        return
    import difflib
    near = difflib.get_close_matches(resume, _RESUME_WORDS, n=1)
    raise ValueError(
        f"resume={resume!r} is neither 'auto', 'never', 'latest', 'best', a step (int), nor "
        "the path of an existing checkpoint directory"
        + (f"; did you mean {near[0]!r}?" if near else "."))


def _is_step(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _resume_plan(resume: Any, manager: CheckpointManager | None) -> tuple[str, Any]:
    """What ``fit(resume=...)`` starts from: ``("fresh", None)``, ``("continue", which)``
    or ``("finetune", path)``; raises with the fix when the request cannot be met."""
    _check_resume_word(resume)
    if isinstance(resume, os.PathLike) or (isinstance(resume, str) and
                                           resume not in _RESUME_WORDS):
        if manager is not None and manager.latest_step() is not None:
            return "continue", "latest"  # rerunning a fine-tune resumes it, as any run
        return "finetune", os.fspath(resume)
    if not (isinstance(resume, str) or _is_step(resume)):
        raise TypeError("resume must be 'auto', 'never', 'latest', 'best', a step (int) or "
                        f"the path of another run's checkpoints; got {resume!r}.")
    steps = manager.steps() if manager is not None else []
    if resume == "auto":
        return ("continue", "latest") if steps else ("fresh", None)
    if resume == "never":
        if steps:
            raise ValueError(
                f"resume='never', but {manager.directory} already holds checkpoints (steps "
                f"{steps}): training there would mix two runs. Pass a new or empty checkpoint "
                "directory, or resume='auto' to continue that run.")
        return "fresh", None
    if manager is None:
        raise ValueError(f"resume={resume!r} needs checkpoint= (the directory to resume from).")
    if not steps:
        raise CheckpointNotFoundError(
            f"resume={resume!r}, but {manager.directory} holds no checkpoint. Use "
            "resume='auto' to start fresh when there is none.")
    if resume == "latest":
        return "continue", "latest"
    step = manager.best_step() if resume == "best" else int(resume)
    if step is None:
        raise CheckpointNotFoundError(
            f"resume='best', but {manager.directory} has no best checkpoint (its policy "
            f"monitors {manager.policy.monitor!r}); use resume='latest'.")
    if step not in steps:
        raise CheckpointNotFoundError(f"resume={resume!r}: no checkpoint {step} in "
                                      f"{manager.directory}; its checkpoints are {steps}.")
    if step != steps[-1]:
        branch = os.path.join(str(manager.directory), str(step))
        raise ValueError(
            f"resume={resume!r} is step {step}, but {manager.directory} holds newer "
            f"checkpoints {[s for s in steps if s > step]}, and a run's steps only increase. "
            f"To train on from step {step}, start a new run from it: "
            f"fit(checkpoint=<a new directory>, resume={branch!r}).")
    return "continue", step


def _finetune_source(path: str, template: TrainState):
    """``(directory, step, params, extras)`` of another run's checkpoint, shaped like the
    template's: its best (else latest) checkpoint, or the step a ``.../45`` path names."""
    path = path.rstrip("/")
    directory, step = path, None
    if os.path.basename(path).isdigit():
        directory, step = os.path.dirname(path), int(os.path.basename(path))
    with CheckpointManager(directory, read_only=True) as source:
        if step is None:
            step = source.best_step() if source.best_step() is not None else \
                source.latest_step()
        if step is None:
            raise CheckpointNotFoundError(f"resume={path!r}: {directory} holds no checkpoint "
                                          "to start from.")
        saved = source.restore(step)
    params = _shaped_like(template.params, saved.get("params"), "params", path)
    extras = None if template.extras is None else \
        _shaped_like(template.extras, saved.get("extras"), "extras", path)
    return directory, step, params, extras


def _another_run_error(directory, template: TrainState, e: RestoreStructureError
                       ) -> RestoreStructureError:
    """The directory holds a run this Trainer's state does not fit (another model or
    optimizer): say so in ``fit``'s terms, with the fixes ``fit`` offers, the manager's
    list of differing arrays below. Fine-tuning is offered only if the params fit."""
    directory = str(directory)
    try:
        _finetune_source(directory, template)
        what, fix = "another optimizer (its params fit this model)", (
            f"; or start a new run from its parameters (fine-tuning, with a fresh optimizer "
            f"state): fit(checkpoint=<a new directory>, resume={directory!r})")
    except RestoreStructureError:
        what, fix = "another model", ""
    return RestoreStructureError(
        f"{directory} holds a run of {what}: its checkpoints do not fit this Trainer's "
        f"model and optimizer, so it cannot be resumed. Use a new checkpoint directory (or "
        f"delete this one) to start this run over{fix}. The arrays that differ:\n"
        # the manager's own advice (build another restore target) is not fit()'s to give
        + "\n".join(line for line in str(e).splitlines() if line.startswith("  ")))


def _shaped_like(template: Any, saved: Any, what: str, path: str) -> Any:
    """``saved``'s arrays in ``template``'s tree, after checking every shape and dtype."""
    expected, treedef = jax.tree_util.tree_flatten_with_path(template)
    got = jax.tree.leaves(saved) if saved is not None else []
    problems = []
    if len(got) != len(expected):
        problems.append(f"it holds {len(got)} arrays, this model {len(expected)}")
    else:
        for (key, t), s in zip(expected, got):
            s = np.asarray(s)
            if s.shape != tuple(t.shape) or s.dtype != t.dtype:
                problems.append(f"{jax.tree_util.keystr(key)}: saved {s.shape} {s.dtype}, "
                                f"model {tuple(t.shape)} {t.dtype}")
    if problems:
        raise RestoreStructureError(f"resume={path!r}: its {what} do not fit this model: "
                                    + "; ".join(problems[:6]))
    return jax.tree.unflatten(treedef, [np.asarray(s) for s in got])


def _fresh_fn(template: TrainState, seed: int):
    """Build a step-0 state around given params (fine-tuning): new optimizer state, RNG."""
    def fn(params, extras):
        _, rng = jax.random.split(jax.random.key(seed))
        return TrainState.create(params=params, tx=template.tx, rng=rng, extras=extras,
                                 apply_fn=template.apply_fn)
    return fn


def _default_policy(monitor: str, early_stopping: EarlyStopping | None) -> CheckpointPolicy:
    """Best by ``monitor``, and the latest, every epoch. With early stopping that restores
    best weights, the best is judged as early stopping judges it: that epoch's checkpoint
    is then kept, so a rerun of the finished run restores the same weights the run ended
    with (a copy in memory does not outlive the process)."""
    es = early_stopping
    if es is not None and es.restore_best_weights and es.start_from_epoch == 0:
        o = es.objective
        return CheckpointPolicy(monitor=o.monitor, mode=o.mode, min_delta=o.min_delta,
                                initial_value_threshold=o.threshold, keep_best=1,
                                keep_latest=1, every_n_epochs=1)
    return CheckpointPolicy(monitor=monitor, keep_best=1, keep_latest=1, every_n_epochs=1)


def _open_manager(checkpoint, policy, monitor, early_stopping=None):
    if checkpoint is None:
        if policy is not None:
            raise ValueError("policy= was given without checkpoint=; pass a directory too.")
        return None, False
    if isinstance(checkpoint, CheckpointManager):
        if policy is not None:
            raise ValueError("pass policy= only with a directory; a CheckpointManager "
                             "already has its policy.")
        return checkpoint, False
    return CheckpointManager(checkpoint, policy or _default_policy(monitor, early_stopping)), True


def _judge_like(history: History, objective) -> None:
    """The history's best epoch judged as ``objective`` judges (early stopping's, or the
    checkpoint policy's best)."""
    history.monitor, history.mode = objective.monitor, objective.mode
    history.min_delta, history.threshold = objective.min_delta, objective.threshold


def _saves_mid_epoch(manager: CheckpointManager | None) -> bool:
    """Whether ``manager``'s schedule can ask for a save inside an epoch (a rule of steps or
    of time, or ``every="auto"``). A policy with no rule at all, whose every call is due,
    is asked at epoch ends only: a save per step is never what it meant in ``fit``."""
    if manager is None:
        return False
    p = manager.policy
    return p.every == "auto" or any(rule is not None for rule in (
        p.every_n_steps, p.every_seconds, p.save_on_steps, p.save_predicate))


def _manager_tracks(manager, es: EarlyStopping) -> bool:
    """Whether the manager's best checkpoint is the early-stopping best epoch (same metric,
    mode, min_delta and threshold), so restoring it restores that epoch."""
    return manager is not None and es.agrees_with(manager.policy)


def _checkpoint_metrics(row: dict) -> dict[str, float]:
    return {k: v for k, v in row.items() if k not in ("epoch", "time")}


def _fold(sums: dict, metrics: Mapping[str, Any]) -> None:
    """Add one step's host metrics to running sums in the metric's own dtype, so a resumed
    epoch, restarting from saved float32 sums, adds up bit for bit as an unbroken one."""
    for k, v in metrics.items():
        if k.startswith("_") and k != "_weight":
            continue
        v = np.asarray(v)[()]
        sums[k] = sums[k] + v if k in sums else v


def _finish(sums: dict) -> dict[str, float]:
    """Weighted means: every metric was summed per batch as ``sum(value*mask)/rows``."""
    if not sums:
        return {}
    host = dict(sums)
    weight = float(host.pop("_weight"))
    return {k: float(v) / weight for k, v in host.items()}


def _accuracy_problem(output_shape: tuple, label: np.ndarray) -> str | None:
    """Why accuracy (argmax of the outputs vs. a class) means nothing here, or None.
    ``output_shape`` and ``label`` are one example's."""
    if not output_shape or output_shape[-1] == 1:
        return (f"the model's output per example has shape {output_shape}, and the argmax "
                "of one output is always class 0")
    if label.dtype.kind != "f":
        return None
    if label.shape != output_shape:
        return (f"the labels are {label.dtype} of shape {label.shape} per example (regression "
                "targets; cast class ids to int32)")
    if (label < 0).any() or not np.allclose(label.sum(axis=-1), 1.0, atol=1e-3):
        return ("the labels are float vectors that are not one-hot or class probabilities "
                "(the first example's are negative or do not sum to 1): regression targets")
    return None


def _per_example_problem(shape: tuple, rows: int, label_shape: tuple,
                         output_shape: tuple | None) -> str | None:
    """Why a per-example loss (or metric) of ``shape`` is not ``[B]`` or ``[B, ...]`` along
    the labels' or the outputs' axes, or None. A ``[B, B]`` is labels ``[B]`` broadcast
    against outputs ``[B, 1]``: it trains on every pair of examples, without an error."""
    ok = [s[1:len(shape)] for s in (label_shape, output_shape) if s is not None]
    if shape == (rows,) or (len(shape) > 1 and shape[0] == rows and shape[1:] in ok):
        return None
    if not shape:
        return ("one value for the whole batch. Return one value per example (leave out the "
                "mean over the batch): padded evaluation rows are masked per example.")
    if output_shape is not None and len(label_shape) != len(output_shape):
        return ("the labels and the outputs have different ranks and broadcast against each "
                "other. Give the labels the outputs' shape (for 1-D targets pass y of shape "
                f"(N, 1), y.reshape(-1, 1)), or squeeze the prediction in the loss "
                "(lambda p, y: (p[:, 0] - y) ** 2).")
    return ("it should be one value per example, [B] or [B, ...] along the labels' or the "
            "outputs' axes. Make the labels and the outputs line up.")


def _per_example(values: jax.Array) -> jax.Array:
    """``[B, ...]`` -> ``[B]``: a per-example loss of any shape averages its trailing axes."""
    values = jnp.asarray(values)
    return values if values.ndim <= 1 else values.reshape(values.shape[0], -1).mean(axis=1)


def _public(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if not k.startswith("_")}


def _abstract(state: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), getattr(
        x, "dtype", None) or np.asarray(x).dtype), state)


def _shape_key(tree: Any) -> tuple:
    return jax.tree.structure(tree), tuple(
        (tuple(np.shape(x)), str(getattr(x, "dtype", ""))) for x in jax.tree.leaves(tree))


def _gather(array: jax.Array) -> np.ndarray:
    """All rows of a batch-sharded output on this host (every process's, when several)."""
    if array.is_fully_addressable:
        return np.asarray(array)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


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
    """A rich progress bar for one epoch (or nothing when quiet or not on a terminal)."""

    def __init__(self, quiet: bool, epoch: int, epochs: int, total: int, done: int):
        self.quiet, self.epoch, self.epochs, self.total, self.done = quiet, epoch, epochs, \
            total, done
        self._bar = None

    def __enter__(self):
        if self.quiet or not sys.stderr.isatty():
            return lambda: None
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeRemainingColumn)
        self._bar = Progress(TextColumn(f"epoch {self.epoch + 1}/{self.epochs}"), BarColumn(),
                             MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                             TimeRemainingColumn(), transient=True)
        self._bar.start()
        task = self._bar.add_task("train", total=self.total, completed=self.done, rate="")
        start, count = time.perf_counter(), [0]

        def advance():
            count[0] += 1
            rate = count[0] / max(time.perf_counter() - start, 1e-9)
            self._bar.update(task, advance=1, rate=f"{rate:.1f} step/s")

        return advance

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.stop()
