"""Sharded (data parallel, FSDP), pmap and single-device training agree, and move between
each other through one unreplicated, checkpoint-shaped state.

Needs 4 CPU devices: tests/conftest.py sets ``--xla_force_host_platform_device_count=4``
(set here too, for a run of this file alone). The multi-process test starts two real
processes running this file as a script, joined by ``jax.distributed`` over gloo.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import json  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxckpt import parallel as par  # noqa: E402
from jaxckpt.state import TrainState  # noqa: E402

STEPS, BATCH, FEATURES, CLASSES = 10, 16, 6, 3
TOL = dict(rtol=1e-5, atol=1e-6)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32)(x))    # Dense_0: kernel (6, 32)
        return nn.Dense(CLASSES)(x)     # Dense_1: kernel (32, 3), bias (3,)


MODEL, TX = MLP(), optax.adam(1e-2)  # shared so every state has the same static fields


def loss_fn(params, batch, rng, state):
    logits = state.apply_fn({"params": params}, batch["x"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    return loss, {"accuracy": (logits.argmax(-1) == batch["y"]).mean()}


def batches(n=STEPS):
    data = np.random.default_rng(0)
    return [{"x": data.normal(size=(BATCH, FEATURES)).astype(np.float32),
             "y": data.integers(0, CLASSES, size=BATCH).astype(np.int32)} for _ in range(n)]


def fresh_state():
    params = MODEL.init(jax.random.key(1), jnp.zeros((1, FEATURES)))["params"]
    return TrainState.create(params=params, tx=TX, rng=7, apply_fn=MODEL.apply)


def train_sharded(state, mesh, data, fsdp=None):
    """Train on ``mesh``; the one code path for one device, data parallel and FSDP."""
    shardings = par.state_sharding(state, mesh, fsdp=fsdp)
    state = par.shard_state(state, mesh, fsdp=fsdp)
    step = par.make_train_step(loss_fn, mesh, shardings)
    history = []
    for batch in data:
        state, metrics = step(state, par.shard_batch(batch, mesh))
        history.append({k: float(v) for k, v in metrics.items()})
    return state, history


def train_pmap(state, data, devices=None):
    step = par.make_pmap_train_step(loss_fn, devices=devices)
    history = []
    for batch in data:
        state, metrics = step(state, batch)
        history.append({k: float(v) for k, v in metrics.items()})
    return state, history


def losses(history):
    return [h["loss"] for h in history]


def host(state):
    """A checkpoint stand-in: the state's arrays copied to host numpy."""
    return jax.tree.map(np.array, state)


@pytest.fixture(scope="module")
def four_devices():
    if jax.device_count() < 4:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=4 before jax starts")


@pytest.fixture(scope="module")
def reference(four_devices):
    """The single-device run every other mode must reproduce."""
    return train_sharded(fresh_state(), par.make_mesh(data=1), batches())


# --- pure parts -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, size, spec", [
    ((6, 32), 2, P(None, "fsdp")),
    ((32, 3), 4, P("fsdp", None)),
    ((8, 8), 2, P("fsdp", None)),        # ties: the first dimension
    ((6, 4), 4, P(None, "fsdp")),        # the largest *divisible* dimension
    ((3,), 2, P()),                      # nothing divisible: replicated
    ((), 4, P()),
    ((32,), 1, P()),                     # no fsdp axis
])
def test_fsdp_spec(shape, size, spec):
    assert par.fsdp_spec(shape, size) == spec


def test_make_mesh_shapes_and_errors(four_devices):
    assert dict(par.make_mesh().shape) == {"data": 4, "fsdp": 1}
    assert dict(par.make_mesh(fsdp=2).shape) == {"data": 2, "fsdp": 2}
    sub = par.make_mesh(data=2)
    assert sub.devices.size == 2 and set(sub.devices.flat) <= set(jax.devices())
    with pytest.raises(ValueError, match="needs 8 devices"):
        par.make_mesh(data=4, fsdp=2)
    with pytest.raises(ValueError, match="does not divide"):
        par.make_mesh(fsdp=3)


def test_shard_batch_rejects_uneven_batch(four_devices):
    with pytest.raises(ValueError, match="divisible by 4"):
        par.shard_batch({"x": np.zeros((6, 2))}, par.make_mesh())
    with pytest.raises(ValueError, match="divisible by 4"):
        par.split_batch({"x": np.zeros((6, 2))}, 4)


def test_initialize_distributed_is_a_noop_for_one_process(monkeypatch):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    assert par.initialize_distributed(num_processes=1) is False
    if not par._cluster_detected():
        assert par.initialize_distributed() is False


# --- placement ---------------------------------------------------------------------------------


def test_fsdp_shards_params_and_matching_optimizer_state(four_devices):
    mesh = par.make_mesh(fsdp=2)
    state, _ = train_sharded(fresh_state(), mesh, batches(1))  # the step keeps the placement
    kernel, bias = state.params["Dense_1"]["kernel"], state.params["Dense_1"]["bias"]
    assert kernel.sharding.spec == P("fsdp", None)
    assert kernel.addressable_shards[0].data.shape == (16, 3)
    assert state.params["Dense_0"]["kernel"].sharding.spec == P(None, "fsdp")
    assert bias.sharding.spec == P()                       # (3,): nothing divisible by 2
    adam = state.opt_state[0]
    assert adam.mu["Dense_1"]["kernel"].sharding.spec == P("fsdp", None)
    assert adam.nu["Dense_0"]["kernel"].sharding.spec == P(None, "fsdp")
    for leaf in (state.step, state.rng, adam.count):
        assert leaf.sharding.spec == P()
    replicated = par.state_sharding(fresh_state(), mesh, fsdp=False)
    assert all(s.spec == P() for s in jax.tree.leaves(replicated))


def test_abstract_state_describes_a_restore_target(four_devices):
    mesh = par.make_mesh(fsdp=4)
    shapes = jax.eval_shape(fresh_state)
    shardings = par.state_sharding(shapes, mesh)
    assert shardings == par.state_sharding(fresh_state(), mesh)
    target = par.abstract_state(shapes, shardings)
    kernel = target.params["Dense_0"]["kernel"]
    assert isinstance(kernel, jax.ShapeDtypeStruct)
    assert kernel.shape == (FEATURES, 32) and kernel.sharding.spec == P(None, "fsdp")


# --- the same training in every mode -------------------------------------------------------------


@pytest.mark.parametrize("data, fsdp", [(4, 1), (2, 2), (1, 4)], ids=["dp4", "dp2xfsdp2", "fsdp4"])
def test_sharded_modes_match_single_device(reference, data, fsdp):
    state, history = train_sharded(fresh_state(), par.make_mesh(data=data, fsdp=fsdp), batches())
    ref_state, ref_history = reference
    np.testing.assert_allclose(losses(history), losses(ref_history), **TOL)
    np.testing.assert_allclose([h["accuracy"] for h in history],
                               [h["accuracy"] for h in ref_history])
    assert losses(history)[-1] < losses(history)[0]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL),
                 host(state.params), host(ref_state.params))
    assert int(state.step) == STEPS


def test_pmap_matches_single_device_and_unreplicates_to_the_same_state(reference):
    replicated, history = train_pmap(par.replicate(fresh_state()), batches())
    ref_state, ref_history = reference
    np.testing.assert_allclose(losses(history), losses(ref_history), **TOL)
    state = par.unreplicate(replicated)
    assert isinstance(state, TrainState)
    assert jax.tree.map(jnp.shape, state) == jax.tree.map(jnp.shape, ref_state)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), host(state), host(ref_state))


def test_eval_steps_agree_and_leave_the_state_alone(reference):
    ref_state, _ = reference
    batch = batches(1)[0]
    mesh = par.make_mesh(fsdp=2)
    shardings = par.state_sharding(ref_state, mesh)
    state = par.shard_state(ref_state, mesh)
    sharded = par.make_eval_step(loss_fn, mesh, shardings)(state, par.shard_batch(batch, mesh))
    pmapped = par.make_pmap_eval_step(loss_fn)(par.replicate(ref_state), batch)
    assert set(sharded) == set(pmapped) == {"loss", "accuracy"}
    for key in sharded:
        np.testing.assert_allclose(float(sharded[key]), float(pmapped[key]), **TOL)
    assert int(state.step) == STEPS and not state.params["Dense_0"]["bias"].is_deleted()


def test_train_steps_donate_the_input_state(four_devices):
    batch = batches(1)[0]
    mesh = par.make_mesh()
    old = par.shard_state(fresh_state(), mesh)
    new, _ = par.make_train_step(loss_fn, mesh, par.state_sharding(old, mesh))(
        old, par.shard_batch(batch, mesh))
    assert all(x.is_deleted() for x in jax.tree.leaves(old))
    assert int(new.step) == 1
    old = par.replicate(fresh_state())
    new, _ = par.make_pmap_train_step(loss_fn)(old, batch)
    assert all(x.is_deleted() for x in jax.tree.leaves(old))
    assert int(par.unreplicate(new).step) == 1


def rng_and_extras_loss(params, batch, rng, state):
    """Records the step key and the batch mean, returned as new extras."""
    loss, metrics = loss_fn(params, batch, rng, state)
    metrics["noise"] = jax.random.uniform(rng)
    return loss, metrics, {"x_mean": batch["x"].mean()}


def test_step_key_and_extras_convention(four_devices):
    batch = batches(1)[0]
    start = host(fresh_state().replace(extras={"x_mean": jnp.zeros(())}))
    key = fresh_state().step_rng()
    mesh = par.make_mesh()
    step = par.make_train_step(rng_and_extras_loss, mesh, par.state_sharding(start, mesh))
    state, metrics = step(par.shard_state(start, mesh), par.shard_batch(batch, mesh))
    assert float(metrics["noise"]) == float(jax.random.uniform(key))
    np.testing.assert_allclose(float(state.extras["x_mean"]), batch["x"].mean(), **TOL)
    # pmap: device i draws from fold_in(step key, i); metrics are the device mean.
    state, metrics = par.make_pmap_train_step(rng_and_extras_loss)(par.replicate(start), batch)
    expected = np.mean([jax.random.uniform(jax.random.fold_in(key, i)) for i in range(4)])
    np.testing.assert_allclose(float(metrics["noise"]), expected, **TOL)
    np.testing.assert_allclose(float(par.unreplicate(state).extras["x_mean"]),
                               batch["x"].mean(), **TOL)


# --- moving between modes and device counts --------------------------------------------------------


def test_pmap_state_continues_sharded_on_fewer_devices(reference):
    half = STEPS // 2
    data = batches()
    replicated, _ = train_pmap(par.replicate(fresh_state()), data[:half])
    checkpoint = host(par.unreplicate(replicated))
    runs = {name: train_sharded(checkpoint, mesh, data[half:], fsdp=fsdp)[1]
            for name, mesh, fsdp in [("4 devices", par.make_mesh(), None),
                                     ("2 devices", par.make_mesh(data=2), None),
                                     ("2 devices fsdp", par.make_mesh(data=1, fsdp=2), None)]}
    for history in runs.values():
        np.testing.assert_allclose(losses(history), losses(runs["4 devices"]), **TOL)
        np.testing.assert_allclose(losses(history), losses(reference[1])[half:], **TOL)


def test_orbax_checkpoint_of_pmap_state_restores_fsdp_sharded(reference, tmp_path):
    import orbax.checkpoint as ocp

    replicated, _ = train_pmap(par.replicate(fresh_state()), batches())
    saved = par.unreplicate(replicated).checkpoint_tree()
    saved.pop("extras")  # None
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ckpt", saved)
        ckptr.wait_until_finished()
        mesh = par.make_mesh(data=1, fsdp=4)
        target = par.abstract_state(saved, par.state_sharding(saved, mesh))
        restored = ckptr.restore(tmp_path / "ckpt", target)
    assert restored["params"]["Dense_0"]["kernel"].sharding.spec == P(None, "fsdp")
    ref = host(reference[0].checkpoint_tree())
    ref.pop("extras")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), host(restored), ref)


# --- two real processes ---------------------------------------------------------------------------


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(process_id: int, port: int) -> None:
    """One of two processes with 2 devices each: 4 global devices, 8 local rows per batch."""
    assert par.initialize_distributed(f"127.0.0.1:{port}", 2, process_id)
    rows = slice(process_id * BATCH // 2, (process_id + 1) * BATCH // 2)
    data = [{k: v[rows] for k, v in b.items()} for b in batches(4)]
    out = {"devices": jax.device_count()}
    for name, mesh in [("dp", par.make_mesh()), ("fsdp", par.make_mesh(fsdp=2))]:
        out[name] = losses(train_sharded(fresh_state(), mesh, data)[1])
    out["pmap"] = losses(train_pmap(par.replicate(fresh_state()), data)[1])
    print("RESULT " + json.dumps(out), flush=True)


def test_two_processes_train_like_one(reference):
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, __file__, str(i), str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    results = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        assert proc.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.split("RESULT ", 1)[1]))
    expected = losses(reference[1])[:4]
    for out in results:
        assert out["devices"] == 4
        for mode in ("dp", "fsdp", "pmap"):
            np.testing.assert_allclose(out[mode], expected, **TOL, err_msg=mode)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]))
