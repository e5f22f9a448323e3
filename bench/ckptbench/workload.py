"""What is checkpointed: a real jitted train step over a state of random values.

Random values, never constants: constant arrays compress to nothing and make every
write look free. The step donates the state, as a real training loop does, because
donation is what a zero-copy snapshot of the state interacts with.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from ckptbench.measure import MiB


class Workload:
    """A train state and its jitted step; ``run(n)`` trains ``n`` steps and waits."""

    def __init__(self, state: Any, step: Callable[[Any], tuple[Any, Any]], model: dict):
        import jax

        self.state = state
        self.step = step
        self.model = model
        self.last_loss = None
        leaves = jax.tree.leaves(state)
        self.state_bytes = sum(x.nbytes for x in leaves)
        self.n_leaves = len(leaves)
        self.platform = next(iter(leaves[0].devices())).platform

    def run(self, n: int) -> None:
        import jax

        for _ in range(n):
            self.state, self.last_loss = self.step(self.state)
        jax.block_until_ready(self.state)

    def loss(self) -> float:
        """The last step's loss (a device sync: call it before timing a save)."""
        return float(self.last_loss) if self.last_loss is not None else 0.0

    def abstract(self) -> Any:
        """The state as ``jax.ShapeDtypeStruct`` leaves with shardings: a restore target."""
        import jax

        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state)

    def host_copy(self) -> list:
        """One real host copy of every leaf (on CPU ``np.asarray`` would be a free view)."""
        import jax
        import numpy as np

        return [np.array(x, copy=True) for x in jax.tree.leaves(self.state)]


def mlp(size_mb: float, layers: int, batch: int) -> Workload:
    """A state of about ``size_mb`` MiB (f32 params + two Adam moments) and its step.

    The model is a stack of ``layers`` square tanh layers of width d; a step draws a batch
    of ``batch`` random rows, back-propagates a mean-square loss through every layer and
    applies Adam: about 6 * batch * params flops, plus Adam's pass over 3 * params floats.
    """
    import jax
    import jax.numpy as jnp
    import optax

    import jaxckpt

    params_n = max(1, int(size_mb * MiB / 12))
    width = max(8, int(math.sqrt(params_n / layers)))
    layers = max(1, round(params_n / width ** 2))
    tx = optax.adam(1e-4)

    @jax.jit
    def init(key):
        keys = jax.random.split(key, 3 * layers)
        params = {f"layer{i:03d}": jax.random.normal(keys[i], (width, width)) / math.sqrt(width)
                  for i in range(layers)}
        return _random_moments(jaxckpt.TrainState.create(params=params, tx=tx, rng=0),
                               keys[layers:])

    def loss_fn(params, x):
        h = x
        for k in sorted(params):
            h = jnp.tanh(h @ params[k])
        return jnp.mean(h * h)

    def step(state):
        x = jax.random.normal(state.step_rng(), (batch, width))
        loss, grads = jax.value_and_grad(loss_fn)(state.params, x)
        return state.apply_gradients(grads), loss

    state = init(jax.random.key(0))
    return Workload(state, jax.jit(step, donate_argnums=0),
                    {"kind": "mlp", "width": width, "layers": layers,
                     "params": layers * width ** 2, "batch": batch,
                     "flops_per_step": 6 * batch * layers * width ** 2})


def many_leaves(min_leaves: int, width: int = 32) -> Workload:
    """A transformer-shaped state of at least ``min_leaves`` small arrays (params + Adam).

    Each block has q, k, v, o (d x d), an MLP (d x 4d, 4d x d) and two layer-norm
    vectors: 8 parameter leaves, 24 with Adam's two moments. Values come from numpy
    (a jitted init of a thousand random arrays takes minutes to compile). The step adds
    one to every leaf: fresh buffers, so no save can reuse a cached host copy.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import jaxckpt

    blocks = max(1, math.ceil(min_leaves / 24))
    shapes = {"q": (width, width), "k": (width, width), "v": (width, width),
              "o": (width, width), "mlp_in": (width, 4 * width), "mlp_out": (4 * width, width),
              "ln1": (width,), "ln2": (width,)}
    rng = np.random.default_rng(0)

    def random_like(tree, scale):
        return jax.tree.map(
            lambda p: jnp.asarray(scale * rng.standard_normal(p.shape, np.float32)), tree)

    params = {f"block{b:03d}": {n: np.zeros(s, np.float32) for n, s in shapes.items()}
              for b in range(blocks)}
    params = random_like(params, 1 / math.sqrt(width))
    state = jaxckpt.TrainState.create(params=params, tx=optax.adam(1e-4), rng=0)
    adam = state.opt_state[0]
    adam = adam._replace(mu=random_like(params, 1e-3), nu=random_like(params, 1e-6))
    state = state.replace(opt_state=(adam,) + tuple(state.opt_state[1:]))

    def step(state):
        return jax.tree.map(lambda x: x + jnp.ones((), x.dtype), state), jnp.zeros(())

    return Workload(state, jax.jit(step, donate_argnums=0),
                    {"kind": "many_leaves", "blocks": blocks, "width": width,
                     "param_leaves": blocks * len(shapes)})


def _random_moments(state, keys):
    """Adam moments of random values: zero moments compress to nothing on disk."""
    import jax

    adam = state.opt_state[0]
    leaves, treedef = jax.tree.flatten(state.params)
    n = len(leaves)
    mu = [1e-3 * jax.random.normal(keys[i], p.shape) for i, p in enumerate(leaves)]
    nu = [1e-6 * jax.random.uniform(keys[n + i], p.shape) for i, p in enumerate(leaves)]
    adam = adam._replace(mu=jax.tree.unflatten(treedef, mu),
                         nu=jax.tree.unflatten(treedef, nu))
    return state.replace(opt_state=(adam,) + tuple(state.opt_state[1:]))
