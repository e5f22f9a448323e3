"""Any pytree in, the same pytree out: real Orbax round trips through CheckpointManager."""

import dataclasses
import functools
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn
from flax import nnx, struct
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxckpt
from jaxckpt import CheckpointManager, RestoreStructureError
from jaxckpt import orbax_io
from jaxckpt.target import (SavedLeaves, _saved_leaves, check_saveable, restore_plan,
                            to_saveable)

# -- the kinds of user pytree -----------------------------------------------------------


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))


def flax_state(seed: int) -> train_state.TrainState:
    model = LinenMLP()
    params = model.init(jax.random.key(seed), jnp.ones((1, 4)))["params"]
    return train_state.TrainState.create(apply_fn=model.apply, params=params,
                                         tx=optax.sgd(0.1, momentum=0.9))


@jax.jit
def flax_update(state: train_state.TrainState) -> train_state.TrainState:
    grads = jax.tree.map(jnp.ones_like, state.params)
    return state.apply_gradients(grads=grads)


def case_flax_train_state():
    """Saved after a jitted update (step an int32 array); the target is fresh (step 0, an int)."""
    return flax_update(flax_update(flax_state(0))), flax_state(1)


def case_flax_train_state_at_create():
    """Saved before any update: the step itself is a Python int."""
    return flax_state(0), flax_state(1)


def case_jaxckpt_train_state():
    make = functools.partial(jaxckpt.TrainState.create, tx=optax.adam(1e-2))
    saved = make(params={"w": jnp.arange(6.0).reshape(2, 3)}, rng=3)
    saved = saved.apply_gradients({"w": jnp.ones((2, 3))})
    return saved, make(params={"w": jnp.zeros((2, 3))}, rng=0)


class NNXNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.dense = nnx.Linear(4, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)


def case_nnx_state():
    return nnx.state(NNXNet(nnx.Rngs(0))), nnx.state(NNXNet(nnx.Rngs(7)))


def case_optax_python_scalars():
    """Optax states whose counts and hyperparameters are Python numbers."""
    params = {"w": jnp.ones(3)}
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
    state = tx.init(params)
    saved = state._replace(count=5, hyperparams={"learning_rate": 0.25})
    target = state._replace(count=0, hyperparams={"learning_rate": 1e-3})
    adam = optax.ScaleByAdamState(count=9, mu={"w": jnp.full(3, 2.0)}, nu={"w": jnp.ones(3)})
    blank = optax.ScaleByAdamState(count=0, mu={"w": jnp.zeros(3)}, nu={"w": jnp.zeros(3)})
    return {"inject": saved, "adam": adam}, {"inject": target, "adam": blank}


@functools.partial(jax.tree_util.register_dataclass, data_fields=["weight", "bias"],
                   meta_fields=["activation", "name"])
@dataclasses.dataclass(frozen=True)
class EqxLinear:
    """Equinox-style: arrays are children, the function and the name are static."""
    weight: jax.Array
    bias: jax.Array
    activation: Callable[[jax.Array], jax.Array]
    name: str


@functools.partial(jax.tree_util.register_dataclass, data_fields=["layers"],
                   meta_fields=["depth"])
@dataclasses.dataclass(frozen=True)
class EqxMLP:
    layers: tuple
    depth: int


def eqx_mlp(seed: int) -> EqxMLP:
    k1, k2 = jax.random.split(jax.random.key(seed))
    return EqxMLP((EqxLinear(jax.random.normal(k1, (4, 8)), jnp.zeros(8), jax.nn.relu, "in"),
                   EqxLinear(jax.random.normal(k2, (8, 2)), jnp.ones(2), lambda x: x, "out")),
                  depth=2)


def case_equinox_style_module():
    return eqx_mlp(0), eqx_mlp(1)


@jax.tree_util.register_pytree_node_class
class Pair:
    """A pytree class flattened without keys (its paths are flat indices)."""

    def __init__(self, first, second, label="pair"):
        self.first, self.second, self.label = first, second, label

    def tree_flatten(self):
        return (self.first, self.second), self.label

    @classmethod
    def tree_unflatten(cls, label, children):
        return cls(*children, label=label)


@struct.dataclass
class Stats:
    mean: jax.Array
    count: jax.Array
    name: str = struct.field(pytree_node=False, default="stats")


def case_registered_dataclasses():
    saved = {"pair": Pair(jnp.arange(3.0), {"n": jnp.int32(4)}),
             "stats": Stats(jnp.full(2, 0.5), jnp.int32(10))}
    target = {"pair": Pair(jnp.zeros(3), {"n": jnp.int32(0)}),
              "stats": Stats(jnp.zeros(2), jnp.int32(0))}
    return saved, target


def case_none_leaves_and_subtrees():
    saved = {"a": None, "b": {"c": None, "d": jnp.arange(2.0)}, "l": [None, jnp.ones(3)],
             "extras": None}
    target = {"a": None, "b": {"c": None, "d": jnp.zeros(2)}, "l": [None, jnp.zeros(3)],
              "extras": None}
    return saved, target


def case_prng_keys():
    saved = {"typed": jax.random.key(3), "rbg": jax.random.key(4, impl="rbg"),
             "batch": jax.random.split(jax.random.key(5), 4), "raw": jax.random.PRNGKey(6)}
    target = {"typed": jax.random.key(0), "rbg": jax.random.key(0, impl="rbg"),
              "batch": jax.random.split(jax.random.key(0), 4), "raw": jax.random.PRNGKey(0)}
    return saved, target


def mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))


def case_shape_dtype_structs_with_shardings():
    m = mesh()
    w = jax.device_put(jnp.arange(32.0).reshape(8, 4), NamedSharding(m, P("model", None)))
    keys = jax.random.split(jax.random.key(2), 4)
    saved = {"w": w, "b": jnp.ones(4, jnp.bfloat16), "keys": keys, "key": jax.random.key(1)}
    key_dtype = jax.random.key(0).dtype
    target = {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32,
                                        sharding=NamedSharding(m, P(None, "data"))),
              "b": jax.ShapeDtypeStruct((4,), jnp.bfloat16, sharding=NamedSharding(m, P())),
              "keys": jax.ShapeDtypeStruct((4,), key_dtype,
                                           sharding=NamedSharding(m, P("data"))),
              "key": jax.eval_shape(lambda: jax.random.key(0))}
    return saved, target


def case_numpy_arrays():
    saved = {"x": np.arange(6, dtype=np.int16).reshape(2, 3), "big": np.arange(3) + 2**40,
             "s": np.float32(2.5), "flag": np.array(True)}
    target = {"x": np.zeros((2, 3), np.int16), "big": np.zeros(3, np.int64),
              "s": np.float32(0), "flag": np.array(False)}
    return saved, target


def case_numpy_scalars():
    """np.float64 subclasses float; np.bool_, bfloat16 and float8 scalars have no Orbax
    scalar handler; a complex scalar saved by it could not be read back."""
    saved = {"f64": np.float64(2.5), "f32": np.float32(0.1), "flag": np.bool_(True),
             "z": np.complex64(1 + 2j), "bf16": np.array(0.5, jnp.bfloat16)[()],
             "f8": np.array(1.0, jnp.float8_e4m3fn)[()], "i8": np.int8(-3)}
    target = jax.tree.map(lambda x: type(x)(0), saved)
    return saved, target


def case_python_scalars():
    saved = {"i": 42, "f": 0.1, "b": True, "big": 2**40, "from_array": jnp.int32(7),
             "float_from_array": jnp.float32(1.5)}
    target = {"i": 0, "f": 0.0, "b": False, "big": 0, "from_array": 0, "float_from_array": 0.0}
    return saved, target


CASES = {f.__name__[len("case_"):]: f for f in [
    case_flax_train_state, case_flax_train_state_at_create, case_jaxckpt_train_state,
    case_nnx_state, case_optax_python_scalars, case_equinox_style_module,
    case_registered_dataclasses, case_none_leaves_and_subtrees, case_prng_keys,
    case_shape_dtype_structs_with_shardings, case_numpy_arrays, case_numpy_scalars,
    case_python_scalars]}


# -- checks -----------------------------------------------------------------------------


def is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def value(x: Any) -> np.ndarray:
    return np.asarray(jax.random.key_data(x) if is_key(x) else x)


def assert_leaf_like(out: Any, target: Any, saved: Any) -> None:
    """``out`` has ``target``'s kind and placement and ``saved``'s value, bit for bit."""
    if isinstance(target, (bool, int, float)):
        assert type(out) is type(target)
        assert out == value(saved).item()
        return
    if isinstance(target, (np.ndarray, np.generic)):
        assert type(out) is type(target) and out.dtype == target.dtype
    else:
        assert isinstance(out, jax.Array) and out.dtype == target.dtype
        sharding = getattr(target, "sharding", None)
        if sharding is not None:
            assert out.sharding.is_equivalent_to(sharding, out.ndim), (out.sharding, sharding)
    if is_key(target):
        assert jax.random.key_impl(out) == jax.random.key_impl(saved)
    assert value(out).shape == value(saved).shape
    assert np.array_equal(value(out), value(saved))


def assert_same_pytree(out: Any, target: Any, saved: Any) -> None:
    assert jax.tree.structure(out) == jax.tree.structure(target)
    outs, targets, saveds = (jax.tree.leaves(t) for t in (out, target, saved))
    assert len(outs) == len(targets) == len(saveds) > 0
    for o, t, s in zip(outs, targets, saveds):
        assert_leaf_like(o, t, s)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_restore_gives_back_the_targets_pytree(tmp_path, kind):
    saved, target = CASES[kind]()
    with CheckpointManager(tmp_path) as m:
        m.save(1, saved)
    with CheckpointManager(tmp_path, read_only=True) as m:
        out = m.restore(1, target=target)
    assert_same_pytree(out, target, saved)


def test_a_key_of_another_prng_impl_is_named_as_such(tmp_path):
    with CheckpointManager(tmp_path) as m:
        m.save(1, {"k": jax.random.key(0, impl="rbg")})
        with pytest.raises(RestoreStructureError, match=r"k: checkpoint shape \(4,\), target "
                           r"shape \(2,\) \(the key data of a typed PRNG key: the target's "
                           r"impl 'threefry2x32' has 2 words per key, the saved key 4"):
            m.restore(1, target={"k": jax.random.key(0)})
        assert jax.random.key_impl(m.restore(1, target={"k": jax.random.key(
            0, impl="rbg")})["k"]) == jax.random.key_impl(jax.random.key(0, impl="rbg"))


def test_numpy_scalars_keep_their_dtype_without_a_target(tmp_path):
    saved, _ = case_numpy_scalars()
    with CheckpointManager(tmp_path) as m:
        m.save(1, saved)
        out = m.restore(1)
    for name, x in saved.items():
        assert isinstance(out[name], np.ndarray) and out[name].shape == (), name
        assert out[name].dtype == x.dtype and out[name][()] == x, name


def test_numpy_scalars_orbax_stored_as_numbers_restore_into_numpy_scalar_targets(tmp_path):
    # Orbax's scalar handler (and jaxckpt before 0-d arrays) stored them as Python numbers.
    saved = {"f64": np.float64(2.5), "f32": np.float32(1.5), "i": np.int32(7)}
    with ocp.CheckpointManager(tmp_path / "ckpt") as orbax:
        orbax.save(1, args=ocp.args.PyTreeSave(saved))
    target = jax.tree.map(lambda x: type(x)(0), saved)
    with CheckpointManager(tmp_path / "ckpt", read_only=True) as m:
        out = m.restore(1, target=target)
    for name, x in saved.items():
        assert type(out[name]) is type(x) and out[name] == x, name


def test_static_fields_come_from_the_target(tmp_path):
    saved, target = case_equinox_style_module()
    with CheckpointManager(tmp_path) as m:
        m.save(1, saved)
        out = m.restore(1, target=target)
    assert [layer.name for layer in out.layers] == ["in", "out"]
    assert out.layers[0].activation is jax.nn.relu
    x = jnp.ones((1, 4))
    assert np.array_equal(out.layers[0].activation(x @ out.layers[0].weight),
                          jax.nn.relu(x @ saved.layers[0].weight))


# -- the Flax Linen MNIST example's own loop --------------------------------------------


class CNN(nn.Module):
    """The Linen MNIST example's model, shrunk to 8x8 images."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(features=4, kernel_size=(3, 3))(x))
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(features=10)(nn.relu(nn.Dense(features=16)(x)))


@jax.jit
def apply_model(state, images, labels):
    def loss_fn(params):
        logits = state.apply_fn({"params": params}, images)
        one_hot = jax.nn.one_hot(labels, 10)
        return jnp.mean(optax.softmax_cross_entropy(logits=logits, labels=one_hot)), logits
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return grads, loss


@jax.jit
def update_model(state, grads):
    return state.apply_gradients(grads=grads)


def train_epoch(state, train_ds, batch_size, rng):
    perms = jax.random.permutation(rng, len(train_ds["image"]))
    perms = perms[: len(perms) // batch_size * batch_size].reshape((-1, batch_size))
    for perm in perms:
        grads, _ = apply_model(state, train_ds["image"][perm], train_ds["label"][perm])
        state = update_model(state, grads)
    return state


def create_train_state(rng):
    cnn = CNN()
    params = cnn.init(rng, jnp.ones([1, 8, 8, 1]))["params"]
    return train_state.TrainState.create(apply_fn=cnn.apply, params=params,
                                         tx=optax.sgd(0.05, 0.9))


@pytest.mark.parametrize("make_key", [jax.random.PRNGKey, jax.random.key])
def test_flax_mnist_example_resumes_exactly(tmp_path, make_key):
    data = np.random.default_rng(0)
    train_ds = {"image": jnp.asarray(data.normal(size=(64, 8, 8, 1)), jnp.float32),
                "label": jnp.asarray(data.integers(0, 10, 64))}

    def fresh():
        rng, init_rng = jax.random.split(make_key(0))
        return create_train_state(init_rng), rng

    def one_epoch(state, rng):
        rng, input_rng = jax.random.split(rng)
        return train_epoch(state, train_ds, 16, input_rng), rng

    state, rng = fresh()
    with CheckpointManager(tmp_path) as mngr:
        for epoch in (1, 2):
            state, rng = one_epoch(state, rng)
            mngr.save(epoch, {"state": state, "rng": rng}, epoch=epoch)
    reference = one_epoch(state, rng)

    state, rng = fresh()  # a restarted process builds its state as before training
    with CheckpointManager(tmp_path) as mngr:
        ckpt = mngr.restore_checkpoint("latest", target={"state": state, "rng": rng})
    restored = ckpt.state["state"]
    assert ckpt.step == 2 and ckpt.epoch == 2
    assert type(restored) is train_state.TrainState
    assert type(restored.step) is int and restored.step == 8
    assert restored.apply_fn is state.apply_fn and restored.tx is state.tx
    resumed = one_epoch(restored, ckpt.state["rng"])
    # tx and apply_fn are the restarted process's own objects: compare the saved leaves.
    ours, theirs = jax.tree.leaves(resumed), jax.tree.leaves(reference)
    assert len(ours) == len(theirs) > 0
    assert all(np.array_equal(value(a), value(b)) for a, b in zip(ours, theirs))


# -- never cast silently ----------------------------------------------------------------


@pytest.mark.parametrize("saved,target,words", [
    ({"w": jnp.ones(3, jnp.float32)}, {"w": jnp.zeros(3, jnp.bfloat16)},
     ["w", "float32", "bfloat16"]),
    ({"w": np.ones(3, np.int64)}, {"w": np.zeros(3, np.int32)}, ["w", "int64", "int32"]),
    ({"n": {"count": jnp.float32(1.5)}}, {"n": {"count": 0}}, ["n/count", "float32", "int"]),
    ({"flag": jnp.int32(1)}, {"flag": False}, ["flag", "int32", "bool"]),
    ({"lr": 0.5}, {"lr": jnp.int32(0)}, ["lr", "Python float", "int32"]),
])
def test_dtype_mismatch_is_refused_with_path_dtypes_and_fix(tmp_path, saved, target, words):
    with CheckpointManager(tmp_path) as m:
        m.save(1, saved)
        with pytest.raises(RestoreStructureError) as err:
            m.restore(1, target=target)
    message = str(err.value)
    for word in words + ["target=None", "saved dtype"]:
        assert word in message, (word, message)


def test_structure_mismatch_lists_differing_keys(tmp_path):
    with CheckpointManager(tmp_path) as m:
        m.save(1, {"params": {"w": jnp.ones(3), "b": jnp.ones(2)}, "step": 3})
        with pytest.raises(RestoreStructureError) as err:
            m.restore(1, target={"params": {"w": jnp.ones(4), "c": jnp.ones(2)}, "step": 0})
    message = str(err.value)
    assert "params/c" in message and "params/b" in message
    assert "params/w: checkpoint shape (3,), target shape (4,)" in message


def test_same_arrays_in_another_optimizer_chain_is_a_structure_error(tmp_path):
    """optax.adamw's state has adam's moments plus one more empty node: every array path
    matches, the containers do not. The error is ours, with the fix, not Orbax's advice
    to pass partial_restore (not a jaxckpt option)."""
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    state = train_state.TrainState.create(apply_fn=None, params=params, tx=optax.adam(0.1))
    other = train_state.TrainState.create(apply_fn=None, params=params, tx=optax.adamw(0.1))
    with CheckpointManager(tmp_path / "c") as m:
        m.save(1, state)
        m.wait()
        with pytest.raises(RestoreStructureError, match=r"(?s)checkpoint 1: every array "
                           r"matches.*opt_state.*target: \(<class 'list'>, 3\).*checkpoint: "
                           r"\(<class 'list'>, 2\).*optax.adamw") as e:
            m.restore(1, target=jax.eval_shape(lambda: other))
        assert "partial_restore" not in str(e.value)
        assert m.steps() == [1] and m.verify() == {1: []}


def test_a_mismatch_outside_the_params_names_the_subtree_restore(tmp_path):
    """Another optimizer's target: the message points to restoring the params alone."""
    with CheckpointManager(tmp_path) as m:
        m.save(1, {"params": {"w": jnp.ones(2)}, "opt": {"mu": jnp.ones(2)}})
        m.wait()
        with pytest.raises(jaxckpt.RestoreStructureError,
                           match=r"match: \['params'\].*target=state.params, subtree='params'"):
            m.restore(1, target={"params": {"w": jnp.ones(2)}, "opt": {"trace": jnp.ones(2)}})
        with pytest.raises(jaxckpt.RestoreStructureError) as err:  # nothing matches
            m.restore(1, target={"params": {"v": jnp.ones(2)}, "opt": {"mu": jnp.ones(3)}})
        assert "subtree=" not in str(err.value)


def test_bad_target_leaf_is_named(tmp_path):
    with CheckpointManager(tmp_path) as m:
        m.save(1, {"w": jnp.ones(2)})
        with pytest.raises(TypeError, match=r"(?s)w: a str.*static"):
            m.restore(1, target={"w": "weights"})


# -- save side: leaves that cannot be saved ---------------------------------------------


@pytest.mark.parametrize("leaf,words", [
    ("relu", ["text", "data_state"]),
    (object(), ["builtins.object", "register_dataclass"]),
    (lambda x: x, ["function", "static"]),
    (np.array(["a", "b"]), ["<U1", "numeric"]),
    (jax.ShapeDtypeStruct((2,), jnp.float32), ["abstract"]),
    (2**70, ["int64"]),
])
def test_unsaveable_leaf_is_a_type_error_naming_its_path(tmp_path, leaf, words):
    state = {"params": {"w": jnp.ones(2)}, "extras": {"activation": leaf}}
    with pytest.raises(TypeError) as err:
        check_saveable(state)
    for word in ["extras/activation"] + words:
        assert word in str(err.value), (word, str(err.value))
    with CheckpointManager(tmp_path) as m:
        with pytest.raises(TypeError, match="extras/activation"):
            m.save(1, state)
        assert m.all_steps() == []


@pytest.mark.parametrize("key,where", [("a/b", "jaxckpt's manifest"),
                                       ("a.b", "Orbax's files")])
def test_leaves_whose_paths_read_alike_are_refused_before_anything_is_written(
        tmp_path, key, where):
    """{"a/b": x, "a": {"b": y}} was saved, then never verified nor restored (its two
    fingerprints shared one manifest entry); with "a.b" Orbax silently kept one array."""
    state = {key: jnp.ones(2), "a": {"b": jnp.zeros(2)}}
    with CheckpointManager(tmp_path) as m:
        with pytest.raises(ValueError, match=rf"(?s)\['a'\]\['b'\].*{where}.*Rename"):
            m.save(1, state)
        assert m.all_steps() == []
        m.save(2, {key: jnp.ones(2), "c": jnp.zeros(2)})  # a separator alone is fine
        m.wait()
        assert np.array_equal(m.restore(2)[key], np.ones(2))


def test_dict_keys_of_mixed_types_name_the_dict_and_the_fix(tmp_path):
    """{1: x, "1": y} gave JAX's "Comparator raised exception" with no path."""
    state = {"params": {"w": jnp.ones(2)}, "heads": [{1: jnp.ones(2), "1": jnp.zeros(2)}]}
    with CheckpointManager(tmp_path) as m:
        with pytest.raises(ValueError, match=r"(?s)<root>\['heads'\]\[0\].*int, str.*one type"):
            m.save(1, state)
        assert m.all_steps() == []


def test_save_inside_jit_names_the_fix(tmp_path):
    with CheckpointManager(tmp_path) as m:
        @jax.jit
        def step(x):
            m.save(1, {"a": x})
            return x + 1

        with pytest.raises(TypeError, match=r"a is a traced value.*inside jax.jit.*outside"):
            step(jnp.ones(3))
        assert m.all_steps() == []


def test_to_saveable_keeps_python_scalars_and_unwraps_typed_keys():
    out = to_saveable({"step": 0, "lr": 0.1, "on": True, "key": jax.random.key(3)})
    assert out["step"] == 0 and type(out["step"]) is int
    assert type(out["lr"]) is float and type(out["on"]) is bool
    assert out["key"].dtype == jnp.uint32
    assert np.array_equal(out["key"], jax.random.key_data(jax.random.key(3)))


# -- restore_plan with what the checkpoint holds (Orbax's item metadata) -----------------


def standard_reader(path, abstract):
    return ocp.StandardCheckpointer().restore(path, abstract)


def pytree_reader(path, abstract):
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
    return ocp.PyTreeCheckpointer().restore(
        path, args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args))


@pytest.fixture(params=[standard_reader, pytree_reader], ids=["standard", "pytree"])
def plan_restore(request):
    """Restore the ``state`` item of a jaxckpt checkpoint with plain Orbax and a plan."""
    def restore(directory, step: int, target: Any) -> Any:
        path = directory / str(step) / "state"
        saved = ocp.PyTreeCheckpointer().metadata(path).item_metadata.tree
        plan = restore_plan(saved, target, step)
        return plan.finish(request.param(path, plan.abstract))
    return restore


def test_saved_python_scalars_take_the_array_targets_dtype(tmp_path, plan_restore):
    with CheckpointManager(tmp_path) as m:
        m.save(1, {"count": 5, "lr": 0.1, "np": 3})
    out = plan_restore(tmp_path, 1, {"count": jnp.int32(0), "lr": jnp.zeros((), jnp.bfloat16),
                                     "np": np.int16(0)})
    assert isinstance(out["count"], jax.Array) and out["count"].dtype == jnp.int32
    assert int(out["count"]) == 5
    assert out["lr"].dtype == jnp.bfloat16 and out["lr"] == jnp.bfloat16(0.1)
    assert type(out["np"]) is np.int16 and out["np"] == 3


def test_saved_python_int_that_does_not_fit_is_refused(tmp_path, plan_restore):
    with CheckpointManager(tmp_path) as m:
        m.save(1, {"tokens_seen": 2**40})
    with pytest.raises(RestoreStructureError, match=r"tokens_seen.*int32.*1099511627776"):
        plan_restore(tmp_path, 1, {"tokens_seen": jnp.int32(0)})
    assert plan_restore(tmp_path, 1, {"tokens_seen": 0}) == {"tokens_seen": 2**40}


def test_abstract_flax_target_from_eval_shape_restores_a_step_zero_save(tmp_path, plan_restore):
    """Levanter-style: the target is jax.eval_shape of the init; the step is then an int32
    abstract scalar while the step-0 checkpoint holds the Python int 0."""
    state = flax_state(0)
    with CheckpointManager(tmp_path) as m:
        m.save(0, state)
    target = jax.eval_shape(lambda: flax_state(1))
    out = plan_restore(tmp_path, 0, target)
    assert type(out) is train_state.TrainState
    assert isinstance(out.step, jax.Array) and out.step.dtype == jnp.int32 and out.step == 0
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(out.params),
                                                     jax.tree.leaves(state.params)))


def test_no_target_gives_numpy_arrays_and_python_scalars(tmp_path, plan_restore):
    with CheckpointManager(tmp_path) as m:
        m.save(1, {"step": 3, "lr": 0.5, "w": jnp.arange(3.0), "key": jax.random.key(1)})
    out = plan_restore(tmp_path, 1, None)
    assert out["step"] == 3 and type(out["step"]) is int and type(out["lr"]) is float
    assert type(out["w"]) is np.ndarray and np.array_equal(out["w"], np.arange(3.0))
    assert np.array_equal(out["key"], jax.random.key_data(jax.random.key(1)))


def test_old_calls_still_work():
    from jaxckpt.target import abstract_target
    abstract, rewrap = abstract_target({"k": jax.random.key(0), "n": 0})
    assert abstract["k"].dtype == jnp.uint32 and abstract["n"] == 0
    out = rewrap({"k": jnp.zeros(2, jnp.uint32), "n": 4})
    assert is_key(out["k"]) and out["n"] == 4


# -- the manifest's record of the saved tree (a restore with a target reads no Orbax metadata) --


def manifest_of(directory, step: int) -> dict:
    return json.loads((directory / str(step) / "jaxckpt_manifest.json").read_text())


@pytest.mark.parametrize("kind", sorted(CASES))
def test_the_manifest_records_what_orbax_records_of_each_leaf(tmp_path, kind):
    saved, _ = CASES[kind]()
    with CheckpointManager(tmp_path) as m:
        m.save(1, saved)
    orbax_says = _saved_leaves(orbax_io.item_metadata(tmp_path / "1" / "state"))
    ours = SavedLeaves.from_json(manifest_of(tmp_path, 1)["arrays"]["saved"])
    assert sorted(ours) == sorted(orbax_says) and ours
    for path, meta in orbax_says.items():
        assert ours[path].shape == tuple(meta.shape), path
        assert ours[path].dtype == np.dtype(meta.dtype), path
        assert ours[path].scalar == isinstance(meta, ocp.metadata.ScalarMetadata), path


def test_a_restore_into_a_target_checks_it_without_orbax_metadata(tmp_path, monkeypatch):
    saved, target = case_flax_train_state_at_create()
    with CheckpointManager(tmp_path) as m:
        m.save(1, saved)

    def unused(*_):
        raise AssertionError("Orbax's per-array metadata was read")
    monkeypatch.setattr(orbax_io, "item_metadata", unused)
    with CheckpointManager(tmp_path, read_only=True) as m:
        assert_same_pytree(m.restore(1, target=target), target, saved)
        params = m.restore(1, target=target.params, subtree="params")
        assert_same_pytree(params, target.params, saved.params)
        wrong = target.replace(params=jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                                                   target.params))
        with pytest.raises(RestoreStructureError, match="checkpoint dtype float32, target "
                                                        "dtype bfloat16"):
            m.restore(1, target=wrong)


def test_a_manifest_without_the_record_is_checked_by_orbax_metadata(tmp_path):
    """Manifests written before the record existed: the target is checked as before."""
    with CheckpointManager(tmp_path) as m:
        m.save(1, {"w": jnp.arange(4.0), "step": 3})
    manifest = manifest_of(tmp_path, 1)
    del manifest["arrays"]["saved"]
    (tmp_path / "1" / "jaxckpt_manifest.json").write_text(json.dumps(manifest))
    with CheckpointManager(tmp_path, read_only=True) as m:
        assert m.verify() == {1: []}
        out = m.restore(1, target={"w": jnp.zeros(4), "step": 0})
        assert out["step"] == 3 and np.array_equal(out["w"], np.arange(4.0))
        with pytest.raises(RestoreStructureError, match="w: checkpoint dtype float32"):
            m.restore(1, target={"w": jnp.zeros(4, jnp.int32), "step": 0})


@pytest.mark.parametrize("damage", [{"shape": "four"}, {"shape": [4], "dtype": "float33"},
                                    {"dtype": "float32"}, "w"])
def test_a_damaged_record_sets_that_checkpoint_aside(tmp_path, damage):
    with CheckpointManager(tmp_path, jaxckpt.CheckpointPolicy(keep_latest=2)) as m:
        m.save(1, {"w": jnp.arange(4.0)})
        m.save(2, {"w": jnp.arange(4.0) + 1})
    manifest = manifest_of(tmp_path, 2)
    manifest["arrays"]["saved"]["w"] = damage
    (tmp_path / "2" / "jaxckpt_manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="malformed saved leaf record for 'w'"):
        m = CheckpointManager(tmp_path, read_only=True)  # found by the cheap check at open
    with m, pytest.warns(UserWarning, match=r"skipped corrupt checkpoint\(s\) \[2\].*malformed"):
        out = m.restore("latest", target={"w": jnp.zeros(4)})
    assert np.array_equal(out["w"], np.arange(4.0)) and m.steps() == [1]
