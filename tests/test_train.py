"""Trainer.fit for real: digits, exact resume after SIGKILL and SIGTERM, early stopping,
non-finite rollback, NNX, and jit/pmap agreement."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import jaxckpt
from jaxckpt import data
from _util import MLP, leaves_equal

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "fit_digits.py"
EPOCHS = 3  # of the example's runs (39 steps an epoch): a kill at step 40 is mid-run


@pytest.fixture(scope="session")
def data_dir(digits_dir):
    return digits_dir


@pytest.fixture(scope="session")
def splits(data_dir):
    ds = data.load_tfds("sklearn_digits", "train", data_dir=data_dir).map(data.normalize)
    return data.split_dataset(ds, (0.7, 0.15, 0.15), seed=0)


def example(workdir, data_dir, *extra, epochs=EPOCHS):
    return [sys.executable, str(EXAMPLE), "--workdir", str(workdir), "--epochs", str(epochs),
            "--data-dir", str(data_dir), "--quiet", *extra]


def run_ok(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout


def _env():
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": str(REPO)}


def final_state(workdir):
    with jaxckpt.CheckpointManager(Path(workdir) / "checkpoints", read_only=True) as m:
        return m.restore("latest"), m.latest_step(), m.best_step()


def history_rows(workdir):
    with open(Path(workdir) / "history.csv") as f:
        return list(csv.DictReader(f))


def wait_for_checkpoint(workdir, proc, min_step):
    deadline = time.time() + 120
    ckpt = Path(workdir) / "checkpoints"
    while time.time() < deadline:
        steps = [int(p.name) for p in ckpt.glob("*") if p.name.isdigit()] if ckpt.exists() else []
        if steps and max(steps) >= min_step:
            return max(steps)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
    d = tmp_path_factory.mktemp("uninterrupted")
    run_ok(example(d, data_dir, "--every-n-steps", "10"))
    return d


def test_example_reaches_sensible_accuracy(uninterrupted):
    result = json.loads((uninterrupted / "result.json").read_text())
    assert result["test_accuracy"] >= 0.9 and result["best_val_accuracy"] >= 0.9
    assert (uninterrupted / "history.png").stat().st_size > 10_000
    assert len(history_rows(uninterrupted)) == EPOCHS


def test_sigkill_then_restart_is_bitwise_identical(tmp_path, data_dir, uninterrupted):
    cmd = example(tmp_path, data_dir, "--every-n-steps", "10")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=_env())
    wait_for_checkpoint(tmp_path, proc, 40)  # mid-run, past the first epoch's checkpoint
    time.sleep(np.random.default_rng().uniform(0, 0.3))  # at any moment, writes in flight
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = run_ok(cmd)
    assert "resumed from checkpoint step" in out
    resumed, ref = final_state(tmp_path), final_state(uninterrupted)
    assert resumed[1:] == ref[1:]
    assert leaves_equal(resumed[0], ref[0])
    assert history_rows(tmp_path) == history_rows(uninterrupted)


def test_sigterm_saves_exits_zero_and_resumes_bitwise(tmp_path, data_dir, uninterrupted):
    cmd = example(tmp_path, data_dir, "--every-n-steps", "10")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_env())
    wait_for_checkpoint(tmp_path, proc, 20)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM: saved checkpoint at step" in out
    stopped_at = int(out.split("SIGTERM: saved checkpoint at step ")[1].split()[0])
    with jaxckpt.CheckpointManager(tmp_path / "checkpoints", read_only=True) as m:
        assert m.latest_step() == stopped_at
    run_ok(cmd)
    resumed, ref = final_state(tmp_path), final_state(uninterrupted)
    assert leaves_equal(resumed[0], ref[0])
    assert history_rows(tmp_path) == history_rows(uninterrupted)


def test_finished_run_resumes_to_nothing_and_more_epochs_continue(splits, tmp_path):
    trainer = jaxckpt.Trainer(MLP(), optax.adam(1e-3), quiet=True)
    h1 = trainer.fit(splits["train"], splits["validation"], epochs=2, batch_size=64,
                     checkpoint=tmp_path, seed=1)
    h2 = jaxckpt.Trainer(MLP(), optax.adam(1e-3), quiet=True).fit(
        splits["train"], splits["validation"], epochs=2, batch_size=64, checkpoint=tmp_path,
        seed=1)
    assert h2.rows == h1.rows and h2.events[-1]["event"] == "resume"
    t3 = jaxckpt.Trainer(MLP(), optax.adam(1e-3), quiet=True)
    h3 = t3.fit(splits["train"], splits["validation"], epochs=3, batch_size=64,
                checkpoint=tmp_path, seed=1)
    assert [r["epoch"] for r in h3.rows] == [1, 2, 3] and h3.rows[:2] == h1.rows
    t4 = jaxckpt.Trainer(MLP(), optax.adam(1e-3), quiet=True)
    h4 = t4.fit(splits["train"], splits["validation"], epochs=3, batch_size=64, seed=1)
    assert [r["loss"] for r in h4.rows] == [r["loss"] for r in h3.rows]
    assert leaves_equal(t4.state.params, t3.state.params)


def test_the_last_epoch_is_saved_whatever_the_schedule(splits, tmp_path):
    policy = jaxckpt.CheckpointPolicy(monitor="val_loss", mode="min", keep_latest=1,
                                      every_n_epochs=5)
    trainer = jaxckpt.Trainer(MLP(), optax.adam(1e-3), quiet=True)
    trainer.fit(splits["train"], splits["validation"], epochs=3, batch_size=64,
                checkpoint=tmp_path, policy=policy, seed=1)
    with jaxckpt.CheckpointManager(tmp_path, read_only=True) as m:
        last = m.restore_checkpoint("latest")
    assert last.epoch == 3  # not due by every_n_epochs=5, saved as the end of the run
    assert leaves_equal(last.state["params"], jax.device_get(trainer.state.params))


def test_history_table_csv_plot(splits, tmp_path):
    trainer = jaxckpt.Trainer(MLP(), optax.adam(1e-2), quiet=True)
    h = trainer.fit(splits["train"], splits["validation"], epochs=3, batch_size=64,
                    checkpoint=tmp_path / "ck")
    table = str(h)
    assert "val_loss" in table and "accuracy" in table and f"best val_loss: epoch {h.best_epoch}" in table
    h.to_csv(tmp_path / "h.csv")
    assert len(list(csv.DictReader(open(tmp_path / "h.csv")))) == 3
    h.plot(tmp_path / "h.png")
    import matplotlib.image
    img = matplotlib.image.imread(tmp_path / "h.png")
    assert img.shape[0] > 300 and img.shape[1] > 600
    d = h.to_dict()
    assert d["epoch"] == [1, 2, 3] and len(d["val_accuracy"]) == 3


def test_early_stopping_stops_and_restores_best(splits, tmp_path):
    # A learning rate this high makes val_loss bounce; patience 1 stops early.
    trainer = jaxckpt.Trainer(MLP(), optax.sgd(3.0), quiet=True)
    es = jaxckpt.EarlyStopping(monitor="val_loss", patience=1)
    h = trainer.fit(splits["train"], splits["validation"], epochs=30, batch_size=64,
                    checkpoint=tmp_path, early_stopping=es)
    assert len(h.rows) < 30 and h.events[-1]["event"] == "early_stop"
    best = h.best_epoch
    assert len(h.rows) == best + 1  # patience 1: one epoch without improvement (as Keras)
    val = trainer.evaluate(splits["validation"])
    assert val["loss"] == pytest.approx(h.rows[best - 1]["val_loss"], rel=1e-5)


def poisoned(splits, index):
    """The train split with one example's pixels set to NaN (a corrupt record)."""
    train = splits["train"]

    def poison(i, ex):
        if i == index:
            ex = {**ex, "image": np.full_like(ex["image"], np.nan)}
        return ex
    return train.map_with_index(poison)


def test_nonfinite_raise_names_the_step(splits):
    trainer = jaxckpt.Trainer(MLP(), optax.adam(1e-3), quiet=True)
    with pytest.raises(jaxckpt.NonFiniteLossError, match=r"not finite at step \d+"):
        trainer.fit(poisoned(splits, 5), epochs=1, batch_size=64)


def test_nonfinite_rollback_skips_batch_and_records_event(splits, tmp_path):
    policy = jaxckpt.CheckpointPolicy(monitor="val_loss", every_n_steps=3)
    trainer = jaxckpt.Trainer(MLP(), optax.adam(1e-3), quiet=True, on_nonfinite="rollback")
    h = trainer.fit(poisoned(splits, 100), splits["validation"], epochs=2, batch_size=64,
                    checkpoint=tmp_path, policy=policy)
    events = [e for e in h.events if e["event"] == "nonfinite_rollback"]
    assert len(events) >= 1 and events[0]["restored_step"] < events[0]["step"]
    assert all(np.isfinite(r["loss"]) for r in h.rows)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(trainer.state.params))


def test_nonfinite_ignore_goes_on(splits):
    trainer = jaxckpt.Trainer(MLP(), optax.adam(1e-3), quiet=True, on_nonfinite="ignore")
    h = trainer.fit(poisoned(splits, 5), epochs=1, batch_size=64)
    assert np.isnan(h.rows[0]["loss"])


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(64, 32, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.l2 = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(nnx.relu(self.l1(x.reshape((x.shape[0], -1))))))


def test_nnx_model_fits_and_resumes(splits, tmp_path):
    def fresh():
        return jaxckpt.Trainer(NNXMLP(nnx.Rngs(0)), optax.adam(1e-2), quiet=True)
    full = fresh()
    h_full = full.fit(splits["train"], splits["validation"], epochs=3, batch_size=64, seed=2)
    part = fresh()
    part.fit(splits["train"], splits["validation"], epochs=2, batch_size=64, seed=2,
             checkpoint=tmp_path)
    rest = fresh()
    h = rest.fit(splits["train"], splits["validation"], epochs=3, batch_size=64, seed=2,
                 checkpoint=tmp_path)
    assert [r["loss"] for r in h.rows] == [r["loss"] for r in h_full.rows]
    assert leaves_equal(rest.state.params, full.state.params)
    assert h.rows[-1]["val_accuracy"] > 0.8


@pytest.mark.parametrize("mode,fsdp", [("jit", 1), ("jit", 2), ("pmap", 1)])
def test_modes_agree_with_single_device(splits, mode, fsdp):
    assert jax.device_count() == 4
    t = jaxckpt.Trainer(MLP(), optax.adam(1e-3), quiet=True, mode=mode, fsdp=fsdp)
    h = t.fit(splits["train"], splits["validation"], epochs=2, batch_size=64, seed=3)
    ref = single_device_losses(splits)
    np.testing.assert_allclose([r["loss"] for r in h.rows], ref["loss"], rtol=1e-5)
    np.testing.assert_allclose([r["val_loss"] for r in h.rows], ref["val_loss"], rtol=1e-5)


_single = {}


def single_device_losses(splits):
    """The same fit on one device (a 1-device run in a subprocess, computed once)."""
    if not _single:
        code = (
            "import json, optax, jaxckpt, jax\n"
            "from jaxckpt import data\n"
            "import test_train as t\n"
            f"ds = data.load_tfds('sklearn_digits', 'train', data_dir={str(_DATA[0])!r})"
            ".map(data.normalize)\n"
            "s = data.split_dataset(ds, (0.7, 0.15, 0.15), seed=0)\n"
            "assert jax.device_count() == 1\n"
            "h = jaxckpt.Trainer(t.MLP(), optax.adam(1e-3), quiet=True).fit("
            "s['train'], s['validation'], epochs=2, batch_size=64, seed=3)\n"
            "print(json.dumps({k: [r[k] for r in h.rows] for k in ('loss', 'val_loss')}))\n")
        env = {**_env(), "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, check=True)
        _single.update(json.loads(out.stdout.strip().splitlines()[-1]))
    return _single


_DATA = []


@pytest.fixture(autouse=True, scope="module")
def _remember_session_paths(data_dir):
    _DATA[:] = [data_dir]


def test_pmap_checkpoint_resumes_in_sharded_mode_on_two_devices(splits, data_dir, tmp_path):
    jaxckpt.Trainer(MLP(), optax.adam(1e-3), quiet=True, mode="pmap").fit(
        splits["train"], splits["validation"], epochs=1, batch_size=64, seed=4,
        checkpoint=tmp_path)
    code = (
        "import optax, jaxckpt, jax\n"
        "from jaxckpt import data\n"
        "import test_train as t\n"
        f"ds = data.load_tfds('sklearn_digits', 'train', data_dir={str(data_dir)!r})"
        ".map(data.normalize)\n"
        "s = data.split_dataset(ds, (0.7, 0.15, 0.15), seed=0)\n"
        "assert jax.device_count() == 2\n"
        "tr = jaxckpt.Trainer(t.MLP(), optax.adam(1e-3), mode='jit')\n"
        f"h = tr.fit(s['train'], s['validation'], epochs=2, batch_size=64, seed=4, "
        f"checkpoint={str(tmp_path)!r})\n"
        "print('EPOCHS', len(h.rows), 'SHARDS', len(tr.state.params['Dense_0']['kernel']"
        ".sharding.device_set))\n")
    env = {**_env(), "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from checkpoint step" in out.stdout
    assert "EPOCHS 2 SHARDS 2" in out.stdout


# -- the user's side of fit: data forms, monitors, resume, signals, callbacks ------------


def xy(n=512, seed=0):
    """A learnable 10-class problem as plain (x, y) numpy arrays (8x8 "images")."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8, 8, 1)).astype(np.float32)
    y = np.argmax(x.reshape(n, -1)[:, :10], axis=1).astype(np.int32)
    return x, y


def quiet_trainer(**kw):
    return jaxckpt.Trainer(MLP(), optax.adam(1e-2), quiet=True, **kw)


class Recorder(jaxckpt.Callback):
    """Every hook call, in order, with the arguments a test wants to see."""

    def __init__(self, stop_at_epoch=None):
        self.calls, self.stop_at_epoch = [], stop_at_epoch

    def on_train_begin(self, trainer, logs):
        self.calls.append(("train_begin", logs["initial_step"], tuple(logs["metric_names"])))

    def on_epoch_begin(self, trainer, epoch, logs):
        self.calls.append(("epoch_begin", epoch))

    def on_step_begin(self, trainer, step, logs):
        self.calls.append(("step_begin", step))

    def on_step_end(self, trainer, step, logs):
        self.calls.append(("step_end", step, float(logs["loss"])))

    def on_epoch_end(self, trainer, epoch, logs):
        self.calls.append(("epoch_end", epoch, logs["val_loss"]))
        if epoch == self.stop_at_epoch:
            trainer.stop_training = True

    def on_checkpoint_saved(self, trainer, step, logs):
        self.calls.append(("saved", step, logs["reason"]))

    def on_train_end(self, trainer, logs):
        self.calls.append(("train_end", logs["status"]))


def test_fit_takes_xy_arrays_jax_arrays_and_dicts_with_any_keys():
    x, y = xy()
    h = quiet_trainer().fit((x[:448], y[:448]), (x[448:], y[448:]), epochs=3, batch_size=64)
    assert h.rows[-1]["val_accuracy"] > h.rows[0]["val_accuracy"]
    h_jax = quiet_trainer().fit((jax.numpy.asarray(x[:448]), jax.numpy.asarray(y[:448])),
                                (x[448:], y[448:]), epochs=3, batch_size=64)
    assert [r["loss"] for r in h_jax.rows] == [r["loss"] for r in h.rows]
    keyed = quiet_trainer(input_key="pixels", label_key="digit")
    h_dict = keyed.fit({"pixels": x[:448], "digit": y[:448]}, {"pixels": x[448:], "digit": y[448:]},
                       epochs=3, batch_size=64)
    assert [r["loss"] for r in h_dict.rows] == [r["loss"] for r in h.rows]
    assert keyed.evaluate({"pixels": x[448:], "digit": y[448:]})["loss"] == \
        pytest.approx(h_dict.rows[-1]["val_loss"], rel=1e-6)


def test_missing_keys_name_the_keys_and_the_fix():
    x, y = xy(128)
    with pytest.raises(ValueError, match=r"batch has keys \['x', 'y'\].*Trainer\(input_key=\.\.\., "
                                         r"label_key=\.\.\.\)"):
        quiet_trainer().fit({"x": x, "y": y}, epochs=1, batch_size=64)
    with pytest.raises(ValueError, match="share their first"):
        quiet_trainer().fit((x, y[:10]), epochs=1, batch_size=64)
    with pytest.raises(ValueError, match=r"inputs only \('image'\), no labels \('label'\): "
                                         r"pass \(x, y\)"):
        quiet_trainer().fit(x, epochs=1, batch_size=64)
    with pytest.raises(TypeError, match=r"a tuple of 3 arrays; pass \(x, y\)"):
        quiet_trainer().fit((x, y, np.ones(len(y))), epochs=1, batch_size=64)


def test_labels_the_default_loss_cannot_take_fail_before_training_naming_the_fix():
    x, y = xy(128)
    train, reads = counted(x, np.eye(10, dtype=np.float32)[y])  # one-hot
    with pytest.raises(TypeError, match=r"float32 of shape \(10,\).*"
                                        r"loss_fn=optax\.softmax_cross_entropy\)"):
        quiet_trainer().fit(train, epochs=1, batch_size=64)
    assert reads == [0]  # the first example only: nothing was trained
    with pytest.raises(TypeError, match=r"int32 of shape \(1,\).*y\.reshape\(-1\)"):
        quiet_trainer().fit((x, y[:, None]), epochs=1, batch_size=64)
    with pytest.raises(TypeError, match=r"float32 of shape \(\) per example.*cast class ids "
                                        r"to int32\.$"):
        quiet_trainer().evaluate((x, y.astype(np.float32)))
    # a loss of the user's own takes whatever labels it takes
    one_hot = quiet_trainer(loss_fn=optax.softmax_cross_entropy)
    h = one_hot.fit((x, np.eye(10, dtype=np.float32)[y]), epochs=1, batch_size=64)
    h_ids = quiet_trainer().fit((x, y), epochs=1, batch_size=64)  # the same problem
    assert h.rows[0]["loss"] == pytest.approx(h_ids.rows[0]["loss"], rel=1e-4)
    assert h.rows[0]["accuracy"] == pytest.approx(h_ids.rows[0]["accuracy"])


def test_a_loss_not_finite_before_any_update_blames_the_data_not_the_learning_rate():
    x, y = xy(128)
    with pytest.raises(jaxckpt.NonFiniteLossError,
                       match=r"step 0, the first, before any update.*class id in \[0, "):
        quiet_trainer().fit((x, np.full_like(y, 10)), epochs=1, batch_size=64)  # 10 classes


def counted(x, y):
    """(x, y) as a dataset that counts the examples read (none may be read for training)."""
    reads = []

    def read(i, ex):
        reads.append(i)
        return ex
    ds = jaxckpt.data.as_dataset((x, y), "image", "label").map_with_index(read)
    return ds, reads


@pytest.mark.parametrize("policy_monitor,es_monitor,val,listed", [
    ("val_acc", None, True, "['loss', 'accuracy', 'val_loss', 'val_accuracy']"),
    ("val_loss", None, False, "(val_* metrics need val_data)"),
    (None, "val_los", True, "EarlyStopping monitors 'val_los'"),
])
def test_wrong_monitor_fails_before_training_naming_what_fit_produces(
        tmp_path, policy_monitor, es_monitor, val, listed):
    x, y = xy(256)
    train, reads = counted(x, y)
    policy = jaxckpt.CheckpointPolicy(monitor=policy_monitor) if policy_monitor else None
    es = jaxckpt.EarlyStopping(monitor=es_monitor, mode="min") if es_monitor else None
    with pytest.raises(jaxckpt.MetricError) as e:
        quiet_trainer().fit(train, (x[:64], y[:64]) if val else None, epochs=5, batch_size=64,
                            checkpoint=tmp_path / "ck", policy=policy, early_stopping=es)
    assert listed in str(e.value)
    assert set(reads) <= {0}  # the first example (for keys and shapes), no batch
    assert not (tmp_path / "ck").exists()  # nothing opened, nothing written


def test_resume_auto_says_what_is_left_and_never_refuses_a_used_directory(tmp_path, capsys):
    x, y = xy()
    data = dict(val_data=(x[448:], y[448:]), batch_size=64, checkpoint=tmp_path)
    quiet_trainer().fit((x[:448], y[:448]), epochs=2, **data)
    capsys.readouterr()
    h = quiet_trainer().fit((x[:448], y[:448]), epochs=2, **data)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "resumed from checkpoint step 14" in out
    assert "nothing left to do: the run finished at epoch 2" in out
    assert len(h.rows) == 2
    with pytest.raises(ValueError, match=r"resume='never'.*already holds checkpoints \(steps "):
        quiet_trainer().fit((x[:448], y[:448]), epochs=3, resume="never", **data)
    fresh = quiet_trainer().fit((x[:448], y[:448]), epochs=1, resume="never",
                                **{**data, "checkpoint": tmp_path / "new"})
    assert len(fresh.rows) == 1
    quiet_trainer().fit((x[:448], y[:448]), epochs=3, resume="latest", **data)
    assert "1 of 3 epochs to train" in capsys.readouterr().out


def test_resume_latest_best_and_step_need_that_checkpoint(tmp_path):
    x, y = xy(256)
    t = quiet_trainer()
    with pytest.raises(jaxckpt.CheckpointNotFoundError, match="holds no checkpoint"):
        t.fit((x, y), epochs=1, batch_size=64, checkpoint=tmp_path, resume="latest")
    with pytest.raises(ValueError, match="needs checkpoint="):
        t.fit((x, y), epochs=1, batch_size=64, resume="best")
    policy = jaxckpt.CheckpointPolicy(monitor="loss", keep_best=1, keep_latest=2)
    # lr 10: the loss jumps about, so the best checkpoint is not the latest
    jaxckpt.Trainer(MLP(), optax.sgd(10.0), quiet=True).fit(
        (x, y), epochs=4, batch_size=64, checkpoint=tmp_path, policy=policy)
    with jaxckpt.CheckpointManager(tmp_path, read_only=True) as m:
        steps, best = m.steps(), m.best_step()
    with pytest.raises(jaxckpt.CheckpointNotFoundError, match=r"no checkpoint 3 .* \["):
        t.fit((x, y), epochs=5, batch_size=64, checkpoint=tmp_path, resume=3)
    older = [s for s in steps if s != max(steps)][0]
    with pytest.raises(ValueError, match=rf"start a new run from it.*resume='.*/{older}'"):
        t.fit((x, y), epochs=5, batch_size=64, checkpoint=tmp_path, resume=older)
    assert best is not None


def test_resume_from_another_runs_path_fine_tunes_from_its_params(tmp_path, capsys):
    x, y = xy()
    source = quiet_trainer()
    source.fit((x[:448], y[:448]), (x[448:], y[448:]), epochs=2, batch_size=64,
               checkpoint=tmp_path / "pretrain")
    with jaxckpt.CheckpointManager(tmp_path / "pretrain", read_only=True) as m:
        best = m.best_step()
        best_params = m.restore("best")["params"]
    capsys.readouterr()
    tuned = jaxckpt.Trainer(MLP(), optax.sgd(0.0), quiet=True)  # lr 0: params stay put
    h = tuned.fit((x[:448], y[:448]), epochs=1, batch_size=64, checkpoint=tmp_path / "tune",
                  resume=str(tmp_path / "pretrain"))
    out = capsys.readouterr().out
    assert f"fine-tuning from checkpoint step {best} of {tmp_path / 'pretrain'}" in out
    assert leaves_equal(tuned.state.params, best_params)
    assert int(tuned.state.step) == 7 and len(h.rows) == 1  # its own count, from 0
    with pytest.raises(jaxckpt.RestoreStructureError, match="do not fit this model"):
        jaxckpt.Trainer(NNXMLP(nnx.Rngs(0)), optax.adam(1e-3), quiet=True).fit(
            (x, y), epochs=1, batch_size=64, resume=str(tmp_path / "pretrain" / str(best)))


class SendSignal(jaxckpt.Callback):
    """Delivers real signals to this process after step ``at`` (like a user or a scheduler)."""

    def __init__(self, at, *signums):
        self.at, self.signums = at, signums

    def on_step_end(self, trainer, step, logs):
        if step == self.at:
            for signum in self.signums:
                os.kill(os.getpid(), signum)


def test_ctrl_c_finishes_the_step_saves_and_a_rerun_ends_bitwise_equal(tmp_path, capsys):
    x, y = xy()
    args = dict(val_data=(x[448:], y[448:]), epochs=3, batch_size=64, seed=5)
    reference = quiet_trainer()
    ref = reference.fit((x[:448], y[:448]), **args)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN in a background job, not the default
    with pytest.raises(SystemExit) as e:
        quiet_trainer().fit((x[:448], y[:448]), checkpoint=tmp_path,
                            callbacks=[SendSignal(10, signal.SIGINT)], **args)
    assert e.value.code == 130
    out = capsys.readouterr()
    assert "Ctrl-C: saved checkpoint at step 10" in out.out and "Rerun the same command" in out.out
    assert "Traceback" not in out.out + out.err
    assert signal.getsignal(signal.SIGINT) is before  # put back
    with jaxckpt.CheckpointManager(tmp_path, read_only=True) as m:
        assert m.latest_step() == 10
    again = quiet_trainer()
    h = again.fit((x[:448], y[:448]), checkpoint=tmp_path, **args)
    assert [r["loss"] for r in h.rows] == [r["loss"] for r in ref.rows]
    assert leaves_equal(again.state.params, reference.state.params)


def test_a_second_ctrl_c_aborts_at_once(tmp_path):
    x, y = xy(256)
    with pytest.raises(KeyboardInterrupt):
        quiet_trainer().fit((x, y), epochs=3, batch_size=64, checkpoint=tmp_path,
                            callbacks=[SendSignal(2, signal.SIGINT, signal.SIGINT)])
    with jaxckpt.CheckpointManager(tmp_path, read_only=True) as m:
        assert m.steps() == []  # aborted: nothing saved on the way out


def test_ctrl_c_during_start_up_is_not_swallowed(tmp_path, capsys):
    x, y = xy(256)

    pressed = []

    def interrupt_on_first_read(i, ex):
        if not pressed:
            pressed.append(i)
            os.kill(os.getpid(), signal.SIGINT)
        return ex
    train = jaxckpt.data.as_dataset((x, y)).map_with_index(interrupt_on_first_read)
    with pytest.raises(SystemExit) as e:
        quiet_trainer().fit(train, epochs=3, batch_size=64, checkpoint=tmp_path)
    assert e.value.code == 130
    assert "Ctrl-C: nothing trained yet" in capsys.readouterr().out
    with jaxckpt.CheckpointManager(tmp_path, read_only=True) as m:
        assert m.steps() == []


def test_a_manager_fit_opened_is_closed_and_the_callers_stays_open(tmp_path):
    x, y = xy(256)
    quiet_trainer().fit((x, y), epochs=1, batch_size=64, checkpoint=tmp_path / "own")
    with jaxckpt.CheckpointManager(tmp_path / "own") as again:  # the lock was released
        assert again.latest_step() == 4
    with jaxckpt.CheckpointManager(tmp_path / "mine",
                                   jaxckpt.CheckpointPolicy(monitor="loss")) as mine:
        t = quiet_trainer()
        t.fit((x, y), epochs=1, batch_size=64, checkpoint=mine)
        assert mine.save(100, t.state, metrics={"loss": 0.0})  # still open, still ours
        assert mine.latest_step() == 100


CALLER_OWNED_SIGTERM = """
import os, signal, sys, numpy as np, optax, jaxckpt
sys.path.insert(0, {tests!r})
from _util import MLP
from test_train import SendSignal, xy
x, y = xy(256)
with jaxckpt.CheckpointManager(sys.argv[1], jaxckpt.CheckpointPolicy(monitor="loss")) as m:
    jaxckpt.Trainer(MLP(), optax.adam(1e-2), quiet=True).fit(
        (x, y), epochs=3, batch_size=64, checkpoint=m, callbacks=[SendSignal(6, signal.SIGTERM)])
    print("NOT REACHED")
"""


def test_sigterm_with_a_caller_owned_manager_exits_zero(tmp_path):
    code = CALLER_OWNED_SIGTERM.format(tests=str(REPO / "tests"))
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, env=_env())
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SIGTERM: saved checkpoint at step 6" in out.stdout
    assert "NOT REACHED" not in out.stdout and "closed" not in out.stderr
    with jaxckpt.CheckpointManager(tmp_path, read_only=True) as m:
        assert m.latest_step() == 6


def test_callbacks_see_every_hook_in_order_and_can_stop(tmp_path):
    x, y = xy(256)
    rec = Recorder(stop_at_epoch=2)
    h = quiet_trainer().fit((x, y), (x[:64], y[:64]), epochs=5, batch_size=64,
                            checkpoint=tmp_path, callbacks=[rec])
    kinds = [c[0] for c in rec.calls]
    assert rec.calls[0] == ("train_begin", 0, ("loss", "accuracy", "val_loss", "val_accuracy"))
    assert kinds[1:11] == ["epoch_begin"] + ["step_begin", "step_end"] * 4 + ["saved"]
    assert [c[1] for c in rec.calls if c[0] == "step_end"] == list(range(1, 9))
    assert [c for c in rec.calls if c[0] == "epoch_end"] == [
        ("epoch_end", r["epoch"], r["val_loss"]) for r in h.rows]
    assert rec.calls[-1] == ("train_end", "stopped") and len(h.rows) == 2
    assert h.events[-1]["event"] == "stop"
    again = Recorder()
    h = quiet_trainer().fit((x, y), (x[:64], y[:64]), epochs=3, batch_size=64,
                            checkpoint=tmp_path, callbacks=[again])
    assert again.calls[0][1] == 8 and len(h.rows) == 3  # continued where the stop saved


def test_evaluate_compiles_once_and_has_no_private_arguments(tmp_path):
    import inspect
    assert not [p for p in inspect.signature(jaxckpt.Trainer.evaluate).parameters
                if p.startswith("_")]
    x, y = xy(256)
    t = quiet_trainer()
    t.fit((x, y), epochs=1, batch_size=64)
    t.evaluate((x, y))
    compiles = []

    def compiled(event, duration_secs, **kw):
        if "backend_compile" in event:
            compiles.append(event)

    def loaded(event, **kw):  # a compilation a persistent compilation cache answered
        if event == "/jax/compilation_cache/cache_hits":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(compiled)
    jax.monitoring.register_event_listener(loaded)
    try:
        first = t.evaluate((x[:100], y[:100]), batch_size=256)
        second = t.evaluate((x[100:200], y[100:200]), batch_size=256)
    finally:
        jax.monitoring.unregister_event_duration_listener(compiled)
        jax.monitoring.unregister_event_listener(loaded)
    assert compiles == [] and first != second


def test_predict_returns_every_output_in_order():
    x, y = xy(300)
    t = quiet_trainer()
    t.fit((x, y), epochs=1, batch_size=64)
    out = t.predict(x[:203], batch_size=64)  # 203: the last batch is padded, then cut
    want = MLP().apply({"params": t.state.params}, x[:203])
    assert out.shape == (203, 10)
    np.testing.assert_allclose(out, np.asarray(want), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(t.predict((x[:203], y[:203]), batch_size=64), out)


def test_a_regression_trains_with_a_user_loss():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(512, 4)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5], [3.0]], np.float32)).astype(np.float32)

    class Linear(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(1)(x)
    t = jaxckpt.Trainer(Linear(), optax.adam(0.1), loss_fn=lambda p, t: (p - t) ** 2,
                        metrics={"mae": lambda p, t: abs(p - t)}, quiet=True)
    h = t.fit((x, y), (x[:64], y[:64]), epochs=8, batch_size=64)
    assert set(h.metric_names) == {"loss", "mae", "val_loss", "val_mae"}
    assert h.rows[-1]["val_loss"] < 0.01 * h.rows[0]["val_loss"]


class Linear(nn.Module):
    out: int = 1

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.out)(x)


def regression(n=256, width=1):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    return x, (x[:, :width] * 2.0 + x[:, 1:width + 1]).astype(np.float32)


def mse(p, y):
    return (p - y) ** 2


@pytest.mark.parametrize("width, why", [(1, r"shape \(1,\), and the argmax of one output"),
                                        (3, r"not one-hot or class probabilities")])
def test_accuracy_of_a_regression_is_refused_before_training_naming_metrics_empty(width, why):
    x, y = regression(width=width)
    train, reads = counted(x, y)
    t = jaxckpt.Trainer(Linear(width), optax.adam(0.1), loss_fn=mse, quiet=True)  # accuracy
    with pytest.raises(ValueError, match=rf"metric 'accuracy' needs class logits.*{why}.*"
                                         r"Trainer\(metrics=\(\)\)"):
        t.fit(train, epochs=1, batch_size=64)
    assert reads == [0]
    with pytest.raises(ValueError, match=r"regression targets; cast class ids to int32"):
        jaxckpt.Trainer(Linear(3), optax.adam(0.1), loss_fn=lambda p, y: (p[:, 0] - y) ** 2,
                        quiet=True).fit((x, y[:, 0]), epochs=1, batch_size=64)  # float ids
    h = jaxckpt.Trainer(Linear(width), optax.adam(0.1), loss_fn=mse, metrics=(),
                        quiet=True).fit((x, y), epochs=1, batch_size=64)
    assert h.metric_names == ["loss"]


def test_a_loss_whose_labels_broadcast_against_the_outputs_is_refused_naming_the_fix():
    x, y = regression()
    train, reads = counted(x, y[:, 0])  # labels (N,), outputs (N, 1): (p - y) ** 2 is (B, B)
    t = jaxckpt.Trainer(Linear(), optax.adam(0.1), loss_fn=mse, metrics=(), quiet=True)
    with pytest.raises(ValueError, match=r"loss_fn returns shape \(64, 64\) for a batch of 64 "
                                         r"examples with outputs \(64, 1\) and labels \(64,\).*"
                                         r"y\.reshape\(-1, 1\).*squeeze the prediction"):
        t.fit(train, epochs=1, batch_size=64)
    assert reads == [0]
    with pytest.raises(ValueError, match=r"metric 'mae' returns shape \(64, 64\)"):
        jaxckpt.Trainer(Linear(), optax.adam(0.1), loss_fn=lambda p, y: (p[:, 0] - y) ** 2,
                        metrics={"mae": lambda p, y: abs(p - y)},
                        quiet=True).fit((x, y[:, 0]), epochs=1, batch_size=64)
    mean = jaxckpt.Trainer(Linear(), optax.adam(0.1), loss_fn=lambda p, y: mse(p, y).mean(),
                           metrics=(), quiet=True)
    with pytest.raises(ValueError, match=r"one value for the whole batch"):
        mean.evaluate((x, y), state=mean.init_state({"image": x[:1], "label": y[:1]}))
    # the two fixes the message names: labels (N, 1), or the prediction squeezed
    squeezed = jaxckpt.Trainer(Linear(), optax.adam(0.1), loss_fn=lambda p, y: (p[:, 0] - y) ** 2,
                               metrics=(), quiet=True).fit((x, y[:, 0]), epochs=4, batch_size=64)
    column = t.fit((x, y), epochs=4, batch_size=64)
    assert squeezed.rows[-1]["loss"] == pytest.approx(column.rows[-1]["loss"], rel=1e-5)


def test_a_directory_of_another_model_or_optimizer_is_refused_in_fits_terms(tmp_path):
    x, y = xy(128)
    quiet_trainer().fit((x, y), epochs=1, batch_size=64, checkpoint=tmp_path / "ck")
    class Wider(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(10)(nn.relu(nn.Dense(64)(x.reshape((x.shape[0], -1)))))
    wider = jaxckpt.Trainer(Wider(), optax.adam(1e-2), quiet=True)
    with pytest.raises(jaxckpt.RestoreStructureError) as e:
        wider.fit((x, y), epochs=2, batch_size=64, checkpoint=tmp_path / "ck")
    assert f"{tmp_path / 'ck'} holds a run of another model" in str(e.value)
    assert "Use a new checkpoint directory" in str(e.value)
    assert "params/" in str(e.value) and "target=None" not in str(e.value)
    assert "resume=" not in str(e.value)  # its params do not fit: no fine-tuning offered
    sgd = jaxckpt.Trainer(MLP(), optax.sgd(1e-2), quiet=True)
    with pytest.raises(jaxckpt.RestoreStructureError,
                       match=r"holds a run of another optimizer \(its params fit this model\)"
                             r".*fit\(checkpoint=<a new directory>, resume="):
        sgd.fit((x, y), epochs=2, batch_size=64, checkpoint=tmp_path / "ck")
    h = sgd.fit((x, y), epochs=1, batch_size=64, checkpoint=tmp_path / "tuned",
                resume=str(tmp_path / "ck"))  # the fix it names works
    assert h.events[0]["event"] == "finetune"


def test_a_user_step_function_trains_and_its_metrics_can_be_monitored(tmp_path):
    x, y = xy(256)

    def step(state, batch):
        def loss(params):
            logits = state.apply_fn({"params": params}, batch["image"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        value, grads = jax.value_and_grad(loss)(state.params)
        grads = jax.tree.map(lambda g: jax.numpy.clip(g, -1, 1), grads)
        return state.apply_gradients(grads), {"loss": value,
                                              "grad_norm": optax.global_norm(grads)}
    policy = jaxckpt.CheckpointPolicy(monitor="grad_norm", mode="min")
    t = quiet_trainer(step_fn=step)
    h = t.fit((x, y), epochs=2, batch_size=64, checkpoint=tmp_path, policy=policy)
    assert {"loss", "grad_norm"} <= set(h.rows[0]) and h.rows[1]["loss"] < h.rows[0]["loss"]
    with pytest.raises(jaxckpt.MetricError, match=r"produces \['grad_norm', 'loss'\]"):
        quiet_trainer(step_fn=step).fit((x, y), epochs=1, batch_size=64,
                                        checkpoint=tmp_path / "b",
                                        policy=jaxckpt.CheckpointPolicy(monitor="accuracy"))


class Dense37(nn.Module):
    """An MLP whose first kernel has a shape no other test's arrays have: (64, 37)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(10)(nn.Dense(37)(x))


class LiveArrays(jaxckpt.Callback):
    def on_train_begin(self, trainer, logs):
        self.kernels = [a for a in jax.live_arrays() if a.shape == (64, 37)]


def test_fit_builds_the_state_sharded_with_no_full_copy_on_one_device():
    x, y = xy(256)
    seen = LiveArrays()
    t = jaxckpt.Trainer(Dense37(), optax.adam(1e-3), quiet=True, fsdp=2)
    t.fit((x, y), epochs=1, batch_size=64, callbacks=[seen])
    # params and the two Adam moments: each born sharded over the FSDP axis
    assert len(seen.kernels) == 3
    assert all(len(a.sharding.device_set) == 4 and not a.sharding.is_fully_replicated
               for a in seen.kernels)


def test_a_nan_validation_metric_is_saved_never_best_and_resumes_as_nan(tmp_path):
    x, y = xy(320)
    xv = x[256:].copy()
    xv[0, 0, 0, 0] = np.nan  # one bad validation example: every val metric is NaN
    args = dict(val_data=(xv, y[256:]), batch_size=64, checkpoint=tmp_path)
    with pytest.warns(UserWarning, match="never as best"):
        quiet_trainer().fit((x[:256], y[:256]), epochs=1, **args)
    with pytest.warns(UserWarning, match="never as best"):
        h = quiet_trainer().fit((x[:256], y[:256]), epochs=2, **args)
    assert h.epochs == [1, 2] and [e["event"] for e in h.events] == ["resume"]
    assert all(np.isnan(r["val_loss"]) for r in h.rows)  # NaN came back as NaN
    assert h.best_epoch is None
    with jaxckpt.CheckpointManager(tmp_path, read_only=True) as m:
        assert m.steps() == [8] and m.best_step() is None


def test_ignored_nonfinite_losses_are_saved_mid_epoch_and_resume(tmp_path):
    x, y = xy(256)
    x[::7] = np.nan  # some rows of every batch: every step's loss is NaN
    policy = jaxckpt.CheckpointPolicy(monitor="loss", every_n_steps=2)
    quiet_trainer(on_nonfinite="ignore").fit((x, y), epochs=1, batch_size=64,
                                             checkpoint=tmp_path, policy=policy, max_steps=2)
    with jaxckpt.CheckpointManager(tmp_path, read_only=True) as m:
        assert m.steps() == [2]  # the epoch's NaN running sums were saved with it
    h = quiet_trainer(on_nonfinite="ignore").fit((x, y), epochs=1, batch_size=64,
                                                 checkpoint=tmp_path, policy=policy)
    assert h.epochs == [1] and np.isnan(h.rows[0]["loss"])


class Clock(jaxckpt.Callback):
    """A manager's clock that moves one second per training step: time rules, no sleeping."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def on_step_end(self, trainer, step, logs):
        self.now += 1.0


class Saves(jaxckpt.Callback):
    def __init__(self):
        self.saves = []

    def on_checkpoint_saved(self, trainer, step, logs):
        self.saves.append((step, logs["reason"]))


@pytest.mark.parametrize("rule,mid_epoch", [
    (dict(every_seconds=3), [3, 6]),
    (dict(save_on_steps=[2, 5]), [2, 5]),
    (dict(save_predicate=lambda step: step % 4 == 3), [3, 7]),
    (dict(every_n_steps=3), [3, 6])])
def test_every_schedule_of_the_policy_saves_inside_an_epoch(tmp_path, rule, mid_epoch):
    x, y = xy()  # 8 steps of 64: one epoch
    clock, saves = Clock(), Saves()
    policy = jaxckpt.CheckpointPolicy(monitor="loss", keep_latest=5, **rule)
    with jaxckpt.CheckpointManager(tmp_path, policy, clock=clock) as m:
        quiet_trainer().fit((x, y), epochs=1, batch_size=64, checkpoint=m,
                            callbacks=[clock, saves])
        assert m.steps() == mid_epoch + [8]
    assert saves.saves == [(s, "interval") for s in mid_epoch] + [(8, "end")]


def test_every_auto_saves_inside_an_epoch(tmp_path):
    # fit asks should_save() each step and saves only when due: the asking must time the
    # steps and close the first save's window, or every="auto" saved only at epoch ends.
    x, y = xy(n=8000)  # 1000 steps of 8: one epoch
    saves = Saves()
    # A save of this state costs tens of steps here; a loaded host may make it hundreds.
    policy = jaxckpt.CheckpointPolicy(monitor="loss", keep_latest=100, every="auto",
                                      overhead_budget=0.9)
    quiet_trainer().fit((x, y), epochs=1, batch_size=8, checkpoint=tmp_path, policy=policy,
                        callbacks=[saves])
    inside = [s for s, reason in saves.saves if reason == "interval" and 1 < s < 1000]
    assert inside, saves.saves


def test_an_fsdp_that_does_not_divide_the_devices_names_trainers_own_fix():
    x, y = xy()
    with pytest.raises(ValueError, match=rf"Trainer\(fsdp=3\) needs a device count it "
                       rf"divides; this job has {jax.device_count()} device"):
        quiet_trainer(fsdp=3).fit((x, y), epochs=1, batch_size=64)


def test_resuming_with_another_batch_size_is_refused_naming_the_fix(tmp_path):
    x, y = xy()
    quiet_trainer().fit((x, y), epochs=1, batch_size=64, checkpoint=tmp_path)
    for batch_size, steps in ((32, 16), (128, 4)):
        with pytest.raises(ValueError, match=rf"8 steps per epoch \(batch_size 64, 512 "
                           rf"training examples\); this fit has {steps} \(batch_size "
                           rf"{batch_size}.*same batch_size.*checkpoint=<a new directory>"):
            quiet_trainer().fit((x, y), epochs=3, batch_size=batch_size, checkpoint=tmp_path)
    h = quiet_trainer().fit((x, y), epochs=2, batch_size=64, checkpoint=tmp_path)
    assert h.epochs == [1, 2]


@pytest.mark.parametrize("position,rows,ok", [(16, 2, True), (20, 2, True), (16, 3, False),
                                              (16, 1, False)])
def test_a_checkpoint_without_its_epoch_shape_is_checked_by_its_position(position, rows, ok):
    from jaxckpt.train import _LOOP_FORMAT, _check_same_epochs
    data = {"format": _LOOP_FORMAT, "position": position,
            "history": {"rows": [{"epoch": e + 1} for e in range(rows)]}}
    shape = {"steps_per_epoch": 8, "batch_size": 64, "examples": 512}
    if ok:
        _check_same_epochs(data, shape, "/ckpt")
    else:
        with pytest.raises(ValueError, match=r"other epochs .*this fit has 8"):
            _check_same_epochs(data, shape, "/ckpt")


@pytest.mark.parametrize("kw,message", [
    (dict(batch_size=0), r"batch_size must be an int >= 1, got 0\.$"),
    (dict(batch_size=-8), r"batch_size must be an int >= 1, got -8"),
    (dict(batch_size=64.0), r"batch_size must be an int >= 1, got 64.0"),
    (dict(epochs=-1), r"epochs must be an int >= 1, got -1\.$"),
    (dict(epochs=1.5), r"epochs must be an int >= 1, got 1.5 \(for part of an epoch, pass "
                       r"max_steps=\)"),
    (dict(max_steps=0), r"max_steps must be an int >= 1, got 0"),
    (dict(eval_batch_size=0), r"eval_batch_size must be an int >= 1, got 0")])
def test_counts_that_are_not_whole_positive_numbers_are_refused(kw, message):
    x, y = xy(256)
    t = quiet_trainer()
    with pytest.raises(ValueError, match=message):
        t.fit((x, y), **{"epochs": 1, "batch_size": 64, **kw})
    assert t.state is None


def test_a_mistyped_resume_word_says_what_resume_accepts(tmp_path, monkeypatch):
    x, y = xy(256)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"resume='lastest' is neither 'auto', 'never', "
                       r"'latest', 'best', a step \(int\), nor the path .*did you mean 'latest'"):
        quiet_trainer().fit((x, y), epochs=1, batch_size=64, checkpoint=tmp_path / "ck",
                            resume="lastest")
    with jaxckpt.CheckpointManager(tmp_path / "ck", read_only=True) as m:
        assert m.steps() == []
    quiet_trainer().fit((x, y), epochs=1, batch_size=64, checkpoint=tmp_path / "pre")
    h = quiet_trainer().fit((x, y), epochs=1, batch_size=64, checkpoint=tmp_path / "ck",
                            resume="pre")  # an existing relative path is still a path
    assert h.events[0]["event"] == "finetune"


def test_data_is_reachable_after_a_plain_import_and_loads_on_first_use():
    code = ("import sys, jaxckpt; assert 'jaxckpt.data' not in sys.modules; "
            "print(jaxckpt.data.load_tfds.__name__, 'data' in dir(jaxckpt))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=_env())
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["load_tfds", "True"]


def test_plot_takes_one_metric_name_as_well_as_several(tmp_path):
    h = jaxckpt.History(rows=[{"epoch": 1, "loss": 1.0, "accuracy": 0.5},
                              {"epoch": 2, "loss": 0.5, "accuracy": 0.7}], monitor="loss")
    h.plot(tmp_path / "loss.png", metrics="loss")
    h.plot(tmp_path / "both.png", metrics=["loss", "accuracy"])
    assert (tmp_path / "loss.png").stat().st_size > 0 and (tmp_path / "both.png").exists()
    with pytest.raises(ValueError, match=r"no metric \['los'\]"):
        h.plot(tmp_path / "x.png", metrics="los")


def test_the_early_stop_event_survives_a_rerun_of_the_finished_run(tmp_path):
    x, y = xy()
    args = dict(val_data=(x[448:], y[448:]), epochs=30, batch_size=64, checkpoint=tmp_path,
                early_stopping=jaxckpt.EarlyStopping(patience=1))
    first = jaxckpt.Trainer(MLP(), optax.sgd(3.0), quiet=True).fit((x[:448], y[:448]), **args)
    assert len(first.rows) < 30 and first.events == [
        {"event": "early_stop", "epoch": len(first.rows)}]
    again = jaxckpt.Trainer(MLP(), optax.sgd(3.0), quiet=True).fit((x[:448], y[:448]), **args)
    assert again.rows == first.rows
    assert [e["event"] for e in again.events] == ["early_stop", "resume"]


@pytest.mark.parametrize("policy", [None, jaxckpt.CheckpointPolicy(monitor="val_loss",
                                                                    keep_all=True)],
                         ids=["default policy", "a val_loss policy that keeps all"])
def test_a_rerun_of_a_finished_early_stopped_run_ends_with_the_same_best_weights(tmp_path,
                                                                                 policy):
    x, y = xy(320)
    args = dict(val_data=(x[256:], y[256:]), epochs=30, batch_size=32, checkpoint=tmp_path,
                policy=policy, early_stopping=jaxckpt.EarlyStopping("val_accuracy", patience=2))
    runs = [jaxckpt.Trainer(MLP(), optax.sgd(3.0), quiet=True) for _ in range(2)]
    first = runs[0].fit((x[:256], y[:256]), **args)
    assert first.best_epoch < len(first.rows)  # the best is not the last epoch
    runs[1].fit((x[:256], y[:256]), **args)  # nothing left to train: only the restore
    with jaxckpt.CheckpointManager(tmp_path, read_only=True) as m:
        last = m.restore("latest")["params"]
    assert not leaves_equal(runs[0].state.params, last)
    assert leaves_equal(runs[1].state.params, runs[0].state.params)


def test_a_batch_larger_than_the_data_names_the_fix_and_a_dropped_remainder_is_said(capsys):
    x, y = xy(210)
    t = jaxckpt.Trainer(MLP(), optax.adam(1e-2))
    with pytest.raises(ValueError, match=r"batch_size=64 is larger than the 10 training "
                                         r"examples.*Use a batch_size <= 10"):
        t.fit((x[:10], y[:10]), epochs=1, batch_size=64)
    t.fit((x, y), epochs=1, batch_size=64)
    assert t.global_step == 3  # 3 full batches: 18 examples left out
    assert "each epoch trains on 192 of the 210 training examples: its last partial batch " \
           "(18," in capsys.readouterr().out
    t.fit((x[:192], y[:192]), epochs=1, batch_size=64)
    assert "partial batch" not in capsys.readouterr().out


def test_without_a_checkpoint_a_stop_and_a_second_fit_say_it_starts_over(capsys):
    x, y = xy(256)
    t = quiet_trainer()
    h = t.fit((x, y), (x[:64], y[:64]), epochs=3, batch_size=64,
              callbacks=[Recorder(stop_at_epoch=1)])
    out = capsys.readouterr().out
    assert len(h.rows) == 1 and "fit() again to continue" not in out
    assert "nothing saved; trainer.state holds the weights, but a new fit() starts over: " \
           "pass checkpoint= to make a stopped run continue." in out
    again = t.fit((x, y), (x[:64], y[:64]), epochs=1, batch_size=64)
    assert "new run from fresh weights: without checkpoint=, fit() does not continue" in \
        capsys.readouterr().out
    assert again.rows[0]["loss"] == h.rows[0]["loss"]  # started over, as it said


@pytest.mark.parametrize("values,judge,best", [
    ([1.0, 0.7, 0.6], dict(min_delta=0.15), 2),    # 0.6 beats 0.7 by less than min_delta
    ([1.0, 0.7, 0.6], dict(), 3),
    ([1.0, 0.7, 0.7], dict(), 2),                  # ties: the first
    ([1.0, float("nan"), 0.9], dict(threshold=0.95), 3),
    ([1.0, 0.99], dict(threshold=0.5), None)])
def test_history_best_epoch_judges_as_the_policy_does(values, judge, best):
    rows = [{"epoch": e, "val_loss": v} for e, v in enumerate(values, 1)]
    h = jaxckpt.History(rows=rows, monitor="val_loss", mode="min", **judge)
    assert h.best_epoch == best
    assert jaxckpt.History.from_json(json.loads(json.dumps(h.to_json()))).best_epoch == best


def test_the_tables_best_epoch_is_the_best_checkpoints_with_min_delta(tmp_path):
    x, y = xy()
    policy = jaxckpt.CheckpointPolicy(monitor="val_loss", min_delta=0.2)
    t = jaxckpt.Trainer(MLP(), optax.adam(3e-3), quiet=True)
    h = t.fit((x[:384], y[:384]), (x[384:], y[384:]), epochs=6, batch_size=64,
              checkpoint=tmp_path, policy=policy)
    with jaxckpt.CheckpointManager(tmp_path, read_only=True) as m:
        best_epoch = m.restore_checkpoint("best").epoch
    losses = h.metric("val_loss")
    assert best_epoch != losses.index(min(losses)) + 1  # min_delta decided, not the minimum
    assert h.best_epoch == best_epoch and f"best val_loss: epoch {best_epoch}" in str(h)
