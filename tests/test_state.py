"""TrainState with Flax Linen and Flax NNX, through a real checkpoint round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx

import jaxckpt
from jaxckpt import CheckpointManager, TrainState
from _util import leaves_equal


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Dense(16)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(3)(nn.relu(x))


def linen_step(state: TrainState, x, y):
    def loss(params):
        logits, updates = state.apply_fn({"params": params, **state.extras}, x,
                                         mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates
    grads, updates = jax.grad(loss, has_aux=True)(state.params)
    return state.apply_gradients(grads, extras=updates)


def test_linen_state_round_trip(tmp_path):
    model = LinenMLP()
    x = jax.random.normal(jax.random.key(0), (8, 5))
    y = jnp.arange(8) % 3
    variables = model.init(jax.random.key(1), x)
    state = TrainState.create(params=variables["params"], tx=optax.adamw(1e-2), rng=3,
                              extras={"batch_stats": variables["batch_stats"]},
                              apply_fn=model.apply)
    step = jax.jit(linen_step)
    for _ in range(3):
        state = step(state, x, y)
    with CheckpointManager(tmp_path) as m:
        m.save(int(state.step), state)
        fresh = TrainState.create(params=variables["params"], tx=optax.adamw(1e-2), rng=0,
                                  extras={"batch_stats": variables["batch_stats"]},
                                  apply_fn=model.apply)
        restored = m.restore(target=fresh)
    assert leaves_equal(restored, state)
    # Training continues identically from the restored state.
    assert leaves_equal(step(restored, x, y), step(state, x, y))


class NNXMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.dense = nnx.Linear(5, 16, rngs=rngs)
        self.bn = nnx.BatchNorm(16, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.out = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(self.drop(nnx.relu(self.bn(self.dense(x)))))


def nnx_loss(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def test_nnx_split_merge_round_trip(tmp_path):
    x = jax.random.normal(jax.random.key(0), (8, 5))
    y = jnp.arange(8) % 3
    graphdef, state = jaxckpt.nnx_split(NNXMLP(nnx.Rngs(0)), optax.adam(1e-2), rng=1)

    @jax.jit
    def step(state):
        model = jaxckpt.nnx_merge(graphdef, state)
        grads = nnx.grad(nnx_loss)(model, x, y)
        _, _, rest = nnx.split(model, nnx.Param, ...)
        return state.apply_gradients(grads, extras=rest)

    for _ in range(3):
        state = step(state)
    with CheckpointManager(tmp_path) as m:
        m.save(3, state)
        _, fresh = jaxckpt.nnx_split(NNXMLP(nnx.Rngs(42)), optax.adam(1e-2))
        restored = m.restore(target=fresh)
    assert leaves_equal(restored, state)
    model = jaxckpt.nnx_merge(graphdef, restored)
    model.eval()
    reference = jaxckpt.nnx_merge(graphdef, state)
    reference.eval()
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(reference(x)))


def test_nnx_optimizer_round_trip(tmp_path):
    x = jax.random.normal(jax.random.key(0), (8, 5))
    y = jnp.arange(8) % 3
    model = NNXMLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(nnx_loss)(model, x, y)
        optimizer.update(model, grads)

    for _ in range(3):
        step(model, optimizer)
    saved = jax.device_get(jaxckpt.nnx_checkpoint_state(model, optimizer))
    with CheckpointManager(tmp_path) as m:
        m.save(3, jaxckpt.nnx_checkpoint_state(model, optimizer))
        other = NNXMLP(nnx.Rngs(9))
        other_opt = nnx.Optimizer(other, optax.adam(1e-2), wrt=nnx.Param)
        target = jaxckpt.nnx_checkpoint_state(other, other_opt)
        jaxckpt.nnx_restore_into(other, other_opt, m.restore(target=target))
    assert leaves_equal(jaxckpt.nnx_checkpoint_state(other, other_opt), saved)
    step(model, optimizer)
    step(other, other_opt)
    assert leaves_equal(nnx.state(other, nnx.Param), nnx.state(model, nnx.Param))


def test_step_rng_folds_in_step():
    s = TrainState.create(params={"w": jnp.zeros(1)}, tx=optax.sgd(0.1), rng=5)
    k0 = s.step_rng()
    k1 = s.replace(step=s.step + 1).step_rng()
    assert not np.array_equal(jax.random.key_data(k0), jax.random.key_data(k1))
    assert np.array_equal(jax.random.key_data(k0), jax.random.key_data(
        jax.random.fold_in(jax.random.key(5), 0)))
