"""Callbacks: code of yours that ``Trainer.fit`` runs at fixed points of training.

Synopsis::

    class StopAtLoss(jaxckpt.Callback):
        def on_epoch_end(self, trainer, epoch, logs):
            if logs["loss"] < 0.05:
                trainer.stop_training = True      # fit saves and returns after this epoch

    trainer.fit((x, y), epochs=50, callbacks=[StopAtLoss(), jaxckpt.CSVLogger("log.csv")])

Hooks and what ``logs`` holds (every hook may read it; none needs to return anything):

==========================  ==================================================================
``on_train_begin``          ``epochs``, ``steps_per_epoch``, ``initial_epoch`` and
                            ``initial_step`` (what a resumed run had done), ``metric_names``
                            (what each epoch row will hold), ``history`` (the rows so far),
                            ``checkpoint_dir`` (or None)
``on_epoch_begin``          nothing yet; ``epoch`` counts from 1, as in the history rows
``on_step_begin``           nothing; ``step`` is the number a checkpoint taken right after
                            this step carries (1 for the first step)
``on_step_end``             the step's metrics as device scalars (``loss``, ...). Reading one
                            (``float(logs["loss"])``) waits for the step: do it every N steps,
                            not every step, or the host stops running ahead of the device
``on_epoch_end``            the epoch row: ``epoch``, ``loss``, each metric, ``val_*``, ``time``
``on_checkpoint_saved``     ``step``, ``epoch`` (None mid-epoch), ``metrics`` (None mid-epoch),
                            ``directory``, ``reason`` (``"epoch"``, ``"interval"``, ``"stop"``);
                            the write goes on in the background
``on_train_end``            ``history`` and ``status``: ``"finished"``, ``"stopped"`` (by a
                            callback or early stopping), ``"preempted"`` (SIGTERM, Ctrl-C) or
                            ``"failed"`` (an exception is on its way out of ``fit``)
==========================  ==================================================================

Setting ``trainer.stop_training = True`` in any hook asks ``fit`` to stop after the current
step: it saves a checkpoint there (when it has a checkpoint directory) and returns the
history. A later ``fit`` with the same directory continues from that step. Multi-process
runs honour the request where the processes agree on stopping (see ``Trainer(sync_every=)``).

Callbacks run on every process; write files from process 0 only (the loggers do).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

__all__ = ["Callback", "CallbackList"]

Logs = Mapping[str, Any]


class Callback:
    """Base class: override the hooks you need; each default does nothing."""

    def on_train_begin(self, trainer, logs: Logs) -> None:
        """Before the first step (after a resume has restored the state)."""

    def on_train_end(self, trainer, logs: Logs) -> None:
        """After the last step, also when ``fit`` ends by preemption or an exception."""

    def on_epoch_begin(self, trainer, epoch: int, logs: Logs) -> None:
        """Before the first step of ``epoch`` (a resumed epoch begins where it stopped)."""

    def on_epoch_end(self, trainer, epoch: int, logs: Logs) -> None:
        """After evaluation and the epoch's checkpoint; ``logs`` is the history row."""

    def on_step_begin(self, trainer, step: int, logs: Logs) -> None:
        """Before the training step numbered ``step``."""

    def on_step_end(self, trainer, step: int, logs: Logs) -> None:
        """After the step is dispatched; ``logs`` values are device scalars."""

    def on_checkpoint_saved(self, trainer, step: int, logs: Logs) -> None:
        """After ``fit`` handed a checkpoint to the manager (written in the background)."""


class CallbackList(Callback):
    """Several callbacks called in order, as one."""

    def __init__(self, callbacks: Iterable[Callback] = ()):
        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be jaxckpt.Callback instances, got "
                                f"{type(cb).__name__}; subclass jaxckpt.Callback and override "
                                "the hooks you need.")
        self._any_step_hooks = any(
            (_overrides(cb, "on_step_begin") or _overrides(cb, "on_step_end"))
            and getattr(cb, "wants_steps", True) for cb in self.callbacks)

    @property
    def wants_steps(self) -> bool:
        """Whether any callback has a per-step hook (else the loop skips building logs)."""
        return self._any_step_hooks

    def on_train_begin(self, trainer, logs):
        for cb in self.callbacks:
            cb.on_train_begin(trainer, logs)

    def on_train_end(self, trainer, logs):
        for cb in self.callbacks:
            cb.on_train_end(trainer, logs)

    def on_epoch_begin(self, trainer, epoch, logs):
        for cb in self.callbacks:
            cb.on_epoch_begin(trainer, epoch, logs)

    def on_epoch_end(self, trainer, epoch, logs):
        for cb in self.callbacks:
            cb.on_epoch_end(trainer, epoch, logs)

    def on_step_begin(self, trainer, step, logs):
        for cb in self.callbacks:
            cb.on_step_begin(trainer, step, logs)

    def on_step_end(self, trainer, step, logs):
        for cb in self.callbacks:
            cb.on_step_end(trainer, step, logs)

    def on_checkpoint_saved(self, trainer, step, logs):
        for cb in self.callbacks:
            cb.on_checkpoint_saved(trainer, step, logs)


def _overrides(callback: Callback, hook: str) -> bool:
    return getattr(type(callback), hook) is not getattr(Callback, hook)
