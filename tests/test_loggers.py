"""Loggers write while training, flush every epoch, and a resumed run continues them without
repeating a row. TensorBoard files are read back with tensorboard's own reader."""

import csv

import numpy as np
import optax
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import jaxckpt
from _util import MLP


def xy(n=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8, 8, 1)).astype(np.float32)
    return x, np.argmax(x.reshape(n, -1)[:, :10], axis=1).astype(np.int32)


def fit(directory, epochs, callbacks, **kw):
    x, y = xy()
    # Saves every 2nd epoch, and the last epoch of a run.
    policy = jaxckpt.CheckpointPolicy(keep_latest=2, every_n_epochs=2)
    return jaxckpt.Trainer(MLP(), optax.adam(1e-2), quiet=True).fit(
        (x, y), (x[:64], y[:64]), epochs=epochs, batch_size=64, checkpoint=directory,
        policy=policy, callbacks=callbacks, **kw)


def csv_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def scalars(logdir, tag):
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


class ReadsTheCSV(jaxckpt.Callback):
    """After the logger's on_epoch_end: what a crash at this moment would leave on disk."""

    def __init__(self, path):
        self.path, self.seen = path, []

    def on_epoch_end(self, trainer, epoch, logs):
        self.seen.append([r["epoch"] for r in csv_rows(self.path)])


def test_csv_and_tensorboard_are_written_per_epoch_and_resume_without_duplicates(tmp_path):
    log, tb = tmp_path / "log.csv", tmp_path / "tb"
    reader = ReadsTheCSV(log)
    fit(tmp_path / "ck", 3, [jaxckpt.CSVLogger(log), jaxckpt.TensorBoardLogger(tb), reader])
    assert reader.seen == [["1"], ["1", "2"], ["1", "2", "3"]]  # flushed as each epoch ends
    with jaxckpt.CheckpointManager(tmp_path / "ck") as m:
        # A crash after epoch 3 was logged, before its checkpoint (fit always saves its
        # last epoch): epoch 3 must be trained, and logged, again.
        m.delete(12)
        assert m.latest_step() == 8
    h = fit(tmp_path / "ck", 4, [jaxckpt.CSVLogger(log), jaxckpt.TensorBoardLogger(tb)])
    rows = csv_rows(log)
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"]
    assert list(rows[0]) == ["epoch", "loss", "accuracy", "val_loss", "val_accuracy"]
    assert [float(r["val_loss"]) for r in rows] == [r["val_loss"] for r in h.rows]
    for name in ("loss", "val_accuracy"):
        got = scalars(tb, f"epoch/{name}")
        assert [step for step, _ in got] == [1, 2, 3, 4]
        np.testing.assert_allclose([v for _, v in got], [r[name] for r in h.rows], rtol=1e-6)


def test_every_n_steps_logs_training_steps_once_across_a_resume(tmp_path):
    log, tb = tmp_path / "log.csv", tmp_path / "tb"
    loggers = lambda: [jaxckpt.CSVLogger(log, every_n_steps=2),  # noqa: E731
                       jaxckpt.TensorBoardLogger(tb, every_n_steps=2)]
    fit(tmp_path / "ck", 3, loggers())
    fit(tmp_path / "ck", 4, loggers())
    steps = [int(r["step"]) for r in csv_rows(tmp_path / "log.steps.csv")]
    assert steps == list(range(2, 17, 2))
    assert [s for s, _ in scalars(tb / "steps", "step/loss")] == steps
    assert [s for s, _ in scalars(tb, "epoch/loss")] == [1, 2, 3, 4]


def test_function_logger_hands_rows_to_a_log_function(tmp_path):
    calls = []
    h = fit(tmp_path / "ck", 2, [jaxckpt.FunctionLogger(
        lambda values, step: calls.append((step, values)))])
    assert [step for step, _ in calls] == [1, 2]
    assert calls[1][1]["epoch/val_loss"] == h.rows[1]["val_loss"]
    assert calls[1][1]["epoch"] == 2


def test_every_n_steps_must_be_positive():
    with pytest.raises(ValueError, match="every_n_steps must be an int >= 1"):
        jaxckpt.CSVLogger("x.csv", every_n_steps=0)
