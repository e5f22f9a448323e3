"""A training loop of the user's own: the README's "Your own training loop" block, run as
written, killed with SIGKILL mid-run and rerun, ends bitwise equal to an uninterrupted run;
and ``restore_or_init``, which it starts with, on its own."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import jaxckpt
from jaxckpt import CheckpointManager, CheckpointPolicy

REPO = Path(__file__).resolve().parents[1]
README_DIR = "/tmp/own-loop/checkpoints"


def own_loop_example() -> str:
    text = (REPO / "README.md").read_text()
    after = text.split("<!-- own-loop-example")[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


def start(script: Path, workdir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-u", str(script)], cwd=workdir,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return out


def final_state(directory: Path) -> tuple[int, dict]:
    with CheckpointManager(directory, read_only=True) as mngr:
        ckpt = mngr.restore_checkpoint("latest")
        return ckpt.step, ckpt.state


def test_the_readme_loop_resumes_bitwise_after_sigkill(tmp_path):
    code = own_loop_example()
    assert README_DIR in code and "restore_or_init" in code and "reached_preemption" in code
    runs = {}
    for name in ("straight", "killed"):
        script = tmp_path / f"{name}.py"
        script.write_text(code.replace(README_DIR, str(tmp_path / name)))
        runs[name] = script

    straight = finish(start(runs["straight"], tmp_path))
    assert "starting at step 0, epoch 0, batch 0" in straight and "epoch 6:" in straight

    proc = start(runs["killed"], tmp_path)
    seen = []
    for line in proc.stdout:  # kill it during the third epoch, whatever it is doing
        seen.append(line)
        if line.startswith("epoch 2:"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    resumed = finish(start(runs["killed"], tmp_path))
    first = re.search(r"starting at step (\d+), epoch (\d+), batch (\d+)", resumed)
    # Resumed from what had committed (epoch 2's own save may still have been in flight).
    assert first and int(first.group(1)) >= 24, resumed
    assert "epoch 1:" not in resumed and "epoch 6:" in resumed

    step_a, state_a = final_state(tmp_path / "straight")
    step_b, state_b = final_state(tmp_path / "killed")
    assert step_a == step_b == 6 * 24
    assert jax.tree.structure(state_a) == jax.tree.structure(state_b)
    for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()  # params, Adam, RNG, step
    assert re.search(r"best: step \d+ in .*/killed/\d+", resumed)


# -- restore_or_init -------------------------------------------------------------------------


class TrainState(train_state.TrainState):
    rng: jax.Array


def make_init(calls: list):
    """An init function that records each time it really runs (not when traced)."""
    def create_state(key, width: int = 8):
        jax.debug.callback(lambda: calls.append(1))
        params = {"w": jax.random.normal(key, (8, width)), "b": jnp.zeros((width,))}
        return TrainState.create(apply_fn=None, params=params, tx=optax.adam(1e-2),
                                 rng=jax.random.fold_in(key, 1))
    return create_state


def raw(x) -> np.ndarray:
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


def test_restore_or_init_initialises_an_empty_directory_under_jit(tmp_path):
    calls = []
    with CheckpointManager(tmp_path / "run") as mngr:
        ckpt = jaxckpt.restore_or_init(mngr, make_init(calls), jax.random.key(0))
    assert calls == [1]
    assert (ckpt.step, ckpt.epoch, ckpt.metrics, ckpt.data_state) == (0, None, None, None)
    eager = make_init([])(jax.random.key(0))
    for a, b in zip(jax.tree.leaves(ckpt.state), jax.tree.leaves(eager)):
        np.testing.assert_array_equal(raw(a), raw(b))
    assert ckpt.state.tx is not None and isinstance(ckpt.state, TrainState)


def test_restore_or_init_restores_without_running_the_init(tmp_path):
    calls = []
    create_state = make_init(calls)
    policy = CheckpointPolicy(monitor="val_loss", mode="min", keep_best=1, keep_latest=1)
    with CheckpointManager(tmp_path, policy) as mngr:
        state = jaxckpt.restore_or_init(mngr, create_state, jax.random.key(0)).state
        grads = jax.tree.map(jnp.ones_like, state.params)
        for step, value in [(1, 0.5), (2, 0.7)]:
            state = state.apply_gradients(grads=grads)
            mngr.save(step, state, metrics={"val_loss": value}, data_state={"batch": step},
                      epoch=step)
    saved_params = jax.tree.map(np.asarray, state.params)
    calls.clear()
    with CheckpointManager(tmp_path, read_only=True) as mngr:
        latest = jaxckpt.restore_or_init(mngr, create_state, jax.random.key(0))
        best = jaxckpt.restore_or_init(mngr, create_state, jax.random.key(0), which="best")
    assert calls == []  # shapes from eval_shape only: no concrete template was built
    assert (latest.step, latest.epoch, latest.data_state) == (2, 2, {"batch": 2})
    assert (best.step, best.metrics) == (1, {"val_loss": 0.5})
    assert isinstance(latest.state, TrainState) and int(latest.state.step) == 2
    assert jnp.issubdtype(latest.state.rng.dtype, jax.dtypes.prng_key)
    for a, b in zip(jax.tree.leaves(latest.state.params), jax.tree.leaves(saved_params)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_restore_or_init_places_the_state_by_shardings_both_ways(tmp_path):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def create(key):
        return {"w": jax.random.normal(key, (8, 4)), "b": jnp.zeros((4,))}
    shardings = {"w": rows, "b": replicated}
    with CheckpointManager(tmp_path) as mngr:
        fresh = jaxckpt.restore_or_init(mngr, create, jax.random.key(0), shardings=shardings)
        assert fresh.state["w"].sharding == rows and fresh.state["b"].sharding == replicated
        mngr.save(1, fresh.state)
    with CheckpointManager(tmp_path, read_only=True) as mngr:
        restored = jaxckpt.restore_or_init(mngr, create, jax.random.key(1), shardings=shardings)
        one = jaxckpt.restore_or_init(mngr, create, jax.random.key(1), shardings=replicated)
    assert restored.step == 1
    assert restored.state["w"].sharding == rows and restored.state["b"].sharding == replicated
    assert one.state["w"].sharding == replicated
    np.testing.assert_array_equal(np.asarray(restored.state["w"]), np.asarray(fresh.state["w"]))


def test_restore_or_init_never_restarts_silently(tmp_path):
    with CheckpointManager(tmp_path) as mngr:
        mngr.save(1, {"w": jnp.ones(3)})
    with CheckpointManager(tmp_path, read_only=True) as mngr, \
            pytest.raises(jaxckpt.RestoreStructureError, match="w"):  # another model
        jaxckpt.restore_or_init(mngr, lambda: {"w": jnp.ones(4)})
    with CheckpointManager(tmp_path / "empty") as mngr, \
            pytest.raises(jaxckpt.CheckpointNotFoundError, match="step 3"):
        jaxckpt.restore_or_init(mngr, lambda: {"w": jnp.ones(3)}, which=3)
    manifest = tmp_path / "1" / "state" / "manifest.ocdbt"
    manifest.write_bytes(b"\0" * manifest.stat().st_size)  # damaged, same size
    with CheckpointManager(tmp_path, read_only=True) as mngr, \
            pytest.raises(jaxckpt.CheckpointCorruptError, match="checksum mismatch"):
        jaxckpt.restore_or_init(mngr, lambda: {"w": jnp.ones(3)})
    manifest.write_bytes(b"\0")  # truncated: set aside when the directory is opened
    with pytest.warns(UserWarning, match="corrupt"):
        mngr = CheckpointManager(tmp_path, read_only=True)
    with mngr:
        assert mngr.latest_step() is None
        with pytest.raises(jaxckpt.CheckpointCorruptError, match="no checkpoint .* verifies"):
            jaxckpt.restore_or_init(mngr, lambda: {"w": jnp.ones(3)})


def nnx_own_loop_example() -> str:
    text = (REPO / "README.md").read_text()
    return text.split("<!-- nnx-own-loop-example")[1].split("```python\n")[1].split("```")[0]


def test_the_readme_nnx_loop_resumes_bitwise(tmp_path):
    code = nnx_own_loop_example()
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    runs = [(straight, code), (resumed, code.replace("range(start + 1, 201)",
                                                     "range(start + 1, 101)")), (resumed, code)]
    outs = []
    for d, script in runs:
        out = subprocess.run([sys.executable, "-c", script.replace("/tmp/nnx-loop", str(d))],
                             capture_output=True, text=True, timeout=300,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert out.returncode == 0, out.stderr[-3000:]
        outs.append(out.stdout)
    assert "trained from step 100 to 200" in outs[2]
    with jaxckpt.CheckpointManager(straight / "checkpoints", read_only=True) as a, \
            jaxckpt.CheckpointManager(resumed / "checkpoints", read_only=True) as b:
        assert a.steps() == b.steps() == [200]
        first, second = a.restore(200), b.restore(200)
    assert jax.tree.structure(first) == jax.tree.structure(second)
    for x, y in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
        assert np.array_equal(np.asarray(x), np.asarray(y))
