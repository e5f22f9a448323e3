"""Small real training pieces shared by tests (a tiny MLP trained with Adam)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from jaxckpt import CheckpointManager, CheckpointPolicy, TrainState

TUTORIAL_LOSSES = [1.2 - 0.0125 * e for e in range(1, 45)] + [0.61, 0.615, 0.62, 0.625, 0.627,
                                                               0.629]
"""50 epochs as in the tutorial: best val_loss 0.61 at epoch 45, epoch 50 ends at 0.629."""


def init_state(seed: int = 0, width: int = 8) -> TrainState:
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {"dense": {"kernel": jax.random.normal(k1, (4, width)) * 0.1,
                        "bias": jnp.zeros((width,))},
              "out": {"kernel": jax.random.normal(k2, (width, 1)) * 0.1}}
    return TrainState.create(params=params, tx=optax.adam(1e-2), rng=seed)


class MLP(nn.Module):
    """The digits classifier of the Trainer tests (8x8 images, 10 classes)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(10)(nn.relu(nn.Dense(32)(x)))


def _loss(params, x, y):
    h = jnp.tanh(x @ params["dense"]["kernel"] + params["dense"]["bias"])
    return jnp.mean((h @ params["out"]["kernel"] - y) ** 2)


@jax.jit
def train_step(state: TrainState) -> TrainState:
    kx = state.step_rng()
    x = jax.random.normal(kx, (16, 4))
    y = jnp.sum(x, axis=1, keepdims=True)
    return state.apply_gradients(jax.grad(_loss)(state.params, x, y))


def _plain(x):
    if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(x)
    return x


def leaves_equal(a, b) -> bool:
    """Same number of leaves, each with the same shape and bitwise-equal values."""
    la = [_plain(x) for x in jax.tree.leaves(a)]
    lb = [_plain(x) for x in jax.tree.leaves(b)]
    return len(la) == len(lb) and all(
        np.asarray(x).shape == np.asarray(y).shape and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(la, lb))


TUTORIAL = CheckpointPolicy(monitor="val_loss", mode="min", keep_best=1, keep_latest=1)


def run_tutorial(directory, async_save=True):
    """The tutorial's 50 epochs of real Adam updates; returns the state after each epoch."""
    state, states = init_state(), {}
    with CheckpointManager(directory, TUTORIAL, async_save=async_save) as mngr:
        for epoch, val_loss in enumerate(TUTORIAL_LOSSES, start=1):
            state = train_step(state)
            states[epoch] = jax.device_get(state)
            mngr.save(epoch, state, metrics={"val_loss": val_loss, "loss": val_loss + 0.1},
                      epoch=epoch, data_state={"epoch": epoch})
    return states


KILLED_WRITER = """
    import sys, jax, jaxckpt
    m = jaxckpt.CheckpointManager(sys.argv[1], jaxckpt.CheckpointPolicy(keep_latest=2))
    for step in range(1, 1000):
        x = jax.random.normal(jax.random.key(step), (2_000_000,))
        m.save(step, {"x": x})
        if step == 1:
            m.wait()
            print("COMMITTED", flush=True)
"""
"""A writer that commits step 1, then saves 8 MB of random data per step until killed."""
