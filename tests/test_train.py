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
from flax import nnx

import jaxckpt
from jaxckpt import data
from _util import MLP, leaves_equal

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "fit_digits.py"


@pytest.fixture(scope="session")
def data_dir(digits_dir):
    return digits_dir


@pytest.fixture(scope="session")
def splits(data_dir):
    ds = data.load_tfds("sklearn_digits", "train", data_dir=data_dir).map(data.normalize)
    return data.split_dataset(ds, (0.7, 0.15, 0.15), seed=0)


def example(workdir, data_dir, *extra, epochs=4):
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
    assert len(history_rows(uninterrupted)) == 4


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
    assert len(h.rows) == best + 2  # patience 1: two epochs without improvement
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
def _remember_data_dir(data_dir):
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
