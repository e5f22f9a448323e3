"""Live logs while training: CSV, TensorBoard, and any ``log(dict, step)`` service (W&B).

Synopsis::

    trainer.fit((x, y), (xv, yv), epochs=20, checkpoint="/tmp/run/checkpoints", callbacks=[
        jaxckpt.CSVLogger("/tmp/run/history.csv"),          # one row per epoch
        jaxckpt.TensorBoardLogger("/tmp/run/tensorboard", every_n_steps=50),
    ])
    # tensorboard --logdir /tmp/run/tensorboard

Every logger writes each epoch's row when the epoch ends (and, with ``every_n_steps``, the
training metrics of every N-th step) and flushes it, so a crashed run's logs are complete
up to the crash. A resumed run continues the same logs without repeating a row: the CSV
is rewritten with the rows the checkpoint remembers, then appended to; TensorBoard gets a
``SessionLog.START`` at the resumed step, which makes its readers drop the events a
crashed run logged after its last checkpoint. Only process 0 writes.

TensorBoard files are written with the ``tensorboard`` package's own event writer (the one
PyTorch's ``SummaryWriter`` uses) and read back by its ``EventAccumulator``: no TensorFlow.
"""

from __future__ import annotations

import csv
import os
import time
from typing import Any, Callable, Mapping, Sequence

from jaxckpt.callbacks import Callback

__all__ = ["Logger", "CSVLogger", "TensorBoardLogger", "FunctionLogger", "WandbLogger"]

_NOT_METRICS = ("epoch", "time")


class Logger(Callback):
    """A callback that writes epoch rows (and every N-th step's metrics) somewhere.

    Subclasses implement :meth:`begin`, :meth:`log_epoch`, :meth:`log_step` and
    :meth:`end`; this class decides when, and only on process 0.

    Args:
      every_n_steps: also log the training metrics of every N-th step. Reading a step's
        metrics waits for that step, so N of 1 costs the run its asynchronous dispatch.
    """

    def __init__(self, every_n_steps: int | None = None):
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or
                                          not isinstance(every_n_steps, int) or
                                          every_n_steps < 1):
            raise ValueError(f"every_n_steps must be an int >= 1 or None, got {every_n_steps!r}.")
        self.every_n_steps = every_n_steps
        self._active = False

    # what subclasses write

    def begin(self, logs: Mapping[str, Any]) -> None:
        """Open the log; ``logs`` are ``on_train_begin``'s (history, initial step, ...)."""

    def log_epoch(self, epoch: int, step: int, row: Mapping[str, float]) -> None:
        raise NotImplementedError

    def log_step(self, step: int, metrics: Mapping[str, float]) -> None:
        """Training metrics of one step (only with ``every_n_steps``)."""

    def end(self) -> None:
        """Flush and close."""

    # the callback side

    @property
    def wants_steps(self) -> bool:
        return bool(self.every_n_steps)

    def on_train_begin(self, trainer, logs):
        import jax

        self._active = jax.process_index() == 0
        if self._active:
            self.begin(logs)

    def on_step_end(self, trainer, step, logs):
        if self._active and self.every_n_steps and step % self.every_n_steps == 0:
            import jax

            host = jax.device_get(dict(logs))
            self.log_step(step, {k: float(v) for k, v in host.items()})

    def on_epoch_end(self, trainer, epoch, logs):
        if self._active:
            self.log_epoch(epoch, trainer.global_step, logs)

    def on_train_end(self, trainer, logs):
        if self._active:
            self._active = False
            self.end()


class CSVLogger(Logger):
    """One CSV row per epoch (``epoch``, then each metric), written and flushed as it ends.

    With ``every_n_steps``, the training metrics of every N-th step go to a second file
    beside it, ``<name>.steps.csv`` (``step``, then each metric).

    Args:
      path: the CSV file; its directory is created.
      every_n_steps: see :class:`Logger`.
    """

    def __init__(self, path: str | os.PathLike, every_n_steps: int | None = None):
        super().__init__(every_n_steps)
        self.path = os.fspath(path)
        root, ext = os.path.splitext(self.path)
        self.steps_path = f"{root}.steps{ext or '.csv'}"
        self._files: dict[str, Any] = {}
        self._writers: dict[str, csv.DictWriter] = {}

    def begin(self, logs):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        names = list(logs.get("metric_names") or [])
        history = logs.get("history")
        rows = list(history.rows) if history is not None else []
        for row in rows:  # a resumed run may know metrics this one does not produce
            names += [k for k in row if k not in _NOT_METRICS and k not in names]
        self._open("epochs", self.path, ["epoch", *names], rows)
        if self.every_n_steps:
            kept = [r for r in _read_rows(self.steps_path)
                    if _int(r.get("step")) is not None and
                    _int(r["step"]) <= int(logs.get("initial_step", 0))]
            self._open("steps", self.steps_path, ["step", *[n for n in names
                                                          if not n.startswith("val_")]], kept)

    def _open(self, kind: str, path: str, fields: Sequence[str], rows: Sequence[Mapping]) -> None:
        # Rewrite what a resumed run remembers (dropping rows logged after its checkpoint),
        # atomically, then append from there.
        tmp = f"{path}.tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
        self._files[kind] = open(path, "a", newline="")
        self._writers[kind] = csv.DictWriter(self._files[kind], fieldnames=list(fields),
                                             extrasaction="ignore")

    def log_epoch(self, epoch, step, row):
        self._writers["epochs"].writerow(dict(row))
        self._files["epochs"].flush()

    def log_step(self, step, metrics):
        self._writers["steps"].writerow({"step": step, **metrics})
        self._files["steps"].flush()

    def end(self):
        for f in self._files.values():
            f.close()
        self._files.clear()


class TensorBoardLogger(Logger):
    """TensorBoard scalars: ``epoch/<metric>`` per epoch in ``logdir`` (x axis: epochs),
    and with ``every_n_steps`` ``step/<metric>`` in ``logdir/steps`` (x axis: steps).

    Args:
      logdir: the directory to point ``tensorboard --logdir`` at; created if missing.
      every_n_steps: see :class:`Logger`.
    """

    def __init__(self, logdir: str | os.PathLike, every_n_steps: int | None = None):
        super().__init__(every_n_steps)
        self.logdir = os.fspath(logdir)
        self._writers: dict[str, Any] = {}

    def begin(self, logs):
        try:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
        except ImportError as e:  # a dependency of jaxckpt; only a broken install lacks it
            raise ImportError("TensorBoardLogger needs the tensorboard package: "
                              "pip install tensorboard") from e
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        starts = {"epochs": int(logs.get("initial_epoch", 0)),
                  "steps": int(logs.get("initial_step", 0))}
        dirs = {"epochs": self.logdir}
        if self.every_n_steps:
            dirs["steps"] = os.path.join(self.logdir, "steps")
        for kind, directory in dirs.items():
            os.makedirs(directory, exist_ok=True)
            writer = EventFileWriter(directory, flush_secs=30)
            if starts[kind]:
                # Readers drop every event at or after this step logged before it: what a
                # crashed run wrote past its last checkpoint is not shown twice.
                writer.add_event(Event(wall_time=time.time(), step=starts[kind] + 1,
                                       session_log=SessionLog(status=SessionLog.START)))
            self._writers[kind] = writer

    def _scalars(self, kind: str, prefix: str, step: int, values: Mapping[str, float]) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=f"{prefix}/{k}", simple_value=float(v))
                                 for k, v in values.items() if k not in _NOT_METRICS])
        writer = self._writers[kind]
        writer.add_event(Event(wall_time=time.time(), step=int(step), summary=summary))
        writer.flush()

    def log_epoch(self, epoch, step, row):
        self._scalars("epochs", "epoch", epoch, row)

    def log_step(self, step, metrics):
        self._scalars("steps", "step", step, metrics)

    def end(self):
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


class FunctionLogger(Logger):
    """Hands each epoch row (and every N-th step's metrics) to ``log(values, step=...)``:
    the form of ``wandb.log``, ``mlflow.log_metrics`` and most tracking services.

    Epoch rows are logged as ``{"epoch": e, "epoch/loss": ..., ...}`` at ``step=e``; step
    metrics as ``{"step/loss": ...}`` at ``step=s`` when ``step_key`` is None, else with
    ``step_key`` and the step among the values (services with one step counter per run).
    """

    def __init__(self, log: Callable[..., Any], every_n_steps: int | None = None):
        super().__init__(every_n_steps)
        self.log = log

    def log_epoch(self, epoch, step, row):
        self.log({"epoch": epoch, **{f"epoch/{k}": v for k, v in row.items()
                                     if k not in _NOT_METRICS}}, step=epoch)

    def log_step(self, step, metrics):
        self.log({f"step/{k}": v for k, v in metrics.items()}, step=step)


class WandbLogger(FunctionLogger):
    """Weights & Biases: ``pip install 'jaxckpt[wandb]'``. ``init`` arguments go to
    ``wandb.init`` (``project=``, ``name=``, ``mode="offline"``, ...).

    W&B has one step counter per run, so everything is logged at the global training step
    (the epoch is among the values); after a resume, W&B ignores steps it already has.
    """

    def __init__(self, every_n_steps: int | None = None, **init: Any):
        super().__init__(self._log, every_n_steps)
        self.init = init
        self._run = None

    def begin(self, logs):
        try:
            import wandb
        except ImportError as e:
            raise ImportError("WandbLogger needs wandb: pip install 'jaxckpt[wandb]'") from e
        self._run = wandb.init(**{"resume": "allow", **self.init})

    def log_epoch(self, epoch, step, row):
        self._log({"epoch": epoch, **{f"epoch/{k}": v for k, v in row.items()
                                      if k not in _NOT_METRICS}}, step=step)

    def _log(self, values, step):
        self._run.log(values, step=step)

    def end(self):
        if self._run is not None:
            self._run.finish()
            self._run = None


def _read_rows(path: str) -> list[dict[str, str]]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _int(text: Any) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None
