"""Orbax in both directions, with real Orbax on temporary directories.

Directories written by plain Orbax (a ``default`` item saved as Standard or PyTree, named
items of a Composite save, a bare checkpointer's steps; with and without ``best_fn``
metrics) are listed, verified and restored by jaxckpt, and never modified by a writing
open without ``adopt=True``. Checkpoints written by jaxckpt restore with plain Orbax, whose
``best_fn`` finds jaxckpt's best. A subtree restore reads only that subtree's bytes.
"""

import json
import logging
import os
import re
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import jaxckpt
from jaxckpt import CheckpointManager, CheckpointPolicy

STEPS = (10, 20, 30)
VAL_LOSS = {10: 0.5, 20: 0.3, 30: 0.4}  # best (min) at 20, which is not the latest
POLICY = CheckpointPolicy(monitor="val_loss", mode="min")


def state_at(step: int) -> dict:
    """A small train-state-like dict whose every value identifies its step."""
    return {"params": {"w": jnp.full((4, 3), float(step)), "b": jnp.arange(3.0) + step},
            "opt_state": {"mu": jnp.ones((4, 3)) * step, "count": jnp.int32(step)}}


def as_numpy(tree):
    return jax.tree.map(np.asarray, tree)


def assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert np.asarray(x).dtype == np.asarray(y).dtype


def abstract(tree):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)


def write_orbax(directory, layout: str, with_metrics: bool) -> None:
    """Save STEPS the way a plain Orbax user does (``best_fn`` when ``with_metrics``)."""
    if layout == "bare":  # no manager: one checkpointer save per step directory
        checkpointer = ocp.StandardCheckpointer()
        for step in STEPS:
            checkpointer.save(directory / str(step), state_at(step))
        checkpointer.wait_until_finished()
        return
    options = ocp.CheckpointManagerOptions(
        best_fn=(lambda m: m["val_loss"]) if with_metrics else None, best_mode="min")
    with ocp.CheckpointManager(directory, options=options) as mngr:
        for step in STEPS:
            mngr.save(step, args=orbax_save_args(layout, state_at(step)),
                      metrics={"val_loss": VAL_LOSS[step]} if with_metrics else None)


def orbax_save_args(layout: str, state: dict):
    if layout == "standard":
        return ocp.args.StandardSave(state)
    if layout == "pytree":
        return ocp.args.PyTreeSave(state)
    return ocp.args.Composite(params=ocp.args.PyTreeSave(state["params"]),
                              opt_state=ocp.args.StandardSave(state["opt_state"]))


def snapshot(directory) -> dict:
    """Every entry below ``directory`` (itself included) with its size, mtime and mode."""
    out = {}
    for root, dirs, files in os.walk(directory):
        for path in [root] + [os.path.join(root, f) for f in files]:
            st = os.lstat(path)
            out[os.path.relpath(path, directory)] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return out


class Noise:
    """Python warnings and log records of WARNING and above, with paths blanked out."""

    def __init__(self, caplog, *paths):
        self.caplog, self.paths = caplog, [str(p) for p in paths]

    def __enter__(self):
        self._catch = warnings.catch_warnings(record=True)
        self.warned = self._catch.__enter__()
        warnings.simplefilter("always")
        self.caplog.clear()
        self.caplog.set_level(logging.WARNING)
        return self

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        lines = [str(w.message) for w in self.warned]
        lines += [r.getMessage() for r in self.caplog.records if r.levelno >= logging.WARNING]
        for p in self.paths:
            lines = [line.replace(p, "DIR") for line in lines]
        self.messages = {re.sub(r"\d+", "N", line) for line in lines}


LAYOUTS = [(layout, metrics) for layout in ("standard", "pytree", "composite")
           for metrics in (True, False)] + [("bare", False)]


@pytest.mark.parametrize("layout,with_metrics", LAYOUTS)
def test_a_plain_orbax_directory_is_listed_verified_and_restored(tmp_path, caplog, layout,
                                                                 with_metrics):
    directory = tmp_path / "orbax"
    write_orbax(directory, layout, with_metrics)
    before = snapshot(directory)
    with CheckpointManager(directory, policy=POLICY, read_only=True) as mngr:
        assert mngr.steps() == mngr.all_steps() == list(STEPS)
        assert mngr.latest_step() == 30
        assert {s: v.describe() for s, v in mngr.verdicts().items()} == {
            s: "written by Orbax, no manifest: not verifiable" for s in STEPS}
        with pytest.warns(UserWarning) as warned:
            assert mngr.verify() == {s: [] for s in STEPS}
        text = " ".join(str(w.message) for w in warned)
        assert "written by plain Orbax" in text and "stopped" not in text

        with Noise(caplog, directory) as noise:
            for step in STEPS:
                # A Composite save comes back as the dict of its items: the same tree here.
                assert_same(mngr.restore(step), as_numpy(state_at(step)))
                target = abstract(state_at(0))
                placed = mngr.restore(step, target=target)
                assert_same(placed, state_at(step))
                assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(placed))
        assert noise.messages == set()  # no "no manifest", no Orbax step-metadata warning

        if with_metrics:
            assert mngr.best_step() == 20
            best = mngr.restore_checkpoint("best", target=abstract(state_at(0)))
            assert best.step == 20 and best.metrics == {"val_loss": 0.3}
            assert_same(best.state, state_at(20))
            assert [h["metrics"] for h in mngr.history()] == [
                {"val_loss": VAL_LOSS[s]} for s in STEPS]
        else:
            assert mngr.best_step() is None
            with pytest.raises(jaxckpt.CheckpointNotFoundError, match="restore 'latest'|"
                               "Restore 'latest'"):
                mngr.restore("best")
    assert snapshot(directory) == before  # reading changed nothing


def test_a_composite_save_restores_into_a_dict_target_and_names_its_items(tmp_path):
    directory = tmp_path / "orbax"
    write_orbax(directory, "composite", True)
    with CheckpointManager(directory, read_only=True) as mngr:
        with pytest.raises(jaxckpt.RestoreStructureError, match=r"\['opt_state', 'params'\]"):
            mngr.restore(20, target=abstract(state_at(0))["params"])
        params = mngr.restore(20, target=abstract(state_at(0)["params"]), subtree="params")
        assert_same(params, state_at(20)["params"])


@pytest.mark.parametrize("name", ["state", "default"])
def test_a_composite_item_named_state_beside_others_is_one_item_of_the_dict(tmp_path, name):
    """``Composite(state=..., opt_state=...)``: the state is the dict of both items, not
    the one named like jaxckpt's (or Orbax's default) item with the other one lost."""
    directory = tmp_path / "orbax"
    with ocp.CheckpointManager(directory) as mngr:
        mngr.save(1, args=ocp.args.Composite(**{
            name: ocp.args.StandardSave({"w": np.ones(4, np.float32)}),
            "opt_state": ocp.args.StandardSave({"mu": np.full(4, 7, np.float32)})}))
    with CheckpointManager(directory, read_only=True) as mngr:
        restored = mngr.restore(1)
        assert sorted(restored) == sorted(["opt_state", name])
        np.testing.assert_array_equal(restored["opt_state"]["mu"], np.full(4, 7, np.float32))
        np.testing.assert_array_equal(mngr.restore(1, subtree="opt_state")["mu"],
                                      np.full(4, 7, np.float32))
        items = re.escape(str(sorted(["opt_state", name])))
        with pytest.raises(jaxckpt.RestoreStructureError, match=items):
            mngr.restore(1, target={name: {"w": np.zeros(4, np.float32)}})


def test_a_refused_writing_open_changes_nothing(tmp_path):
    directory = tmp_path / "orbax"
    write_orbax(directory, "standard", True)
    before = snapshot(directory)
    with pytest.raises(jaxckpt.CheckpointDirectoryError) as refused:
        CheckpointManager(directory, policy=POLICY)
    message = str(refused.value)
    assert "[10, 20, 30]" in message and "plain Orbax" in message
    assert "read_only=True" in message and "adopt=True" in message
    assert "Nothing was changed" in message
    with pytest.raises(jaxckpt.CheckpointDirectoryError, match="needs policy="):
        CheckpointManager(directory, adopt=True)  # the default policy would delete two
    assert snapshot(directory) == before


@pytest.mark.parametrize("meta", ["json", "pytree"])
def test_an_orbax_item_named_meta_is_orbax_s_and_a_stray_file_changes_nothing(tmp_path, meta):
    """A plain Orbax Composite save with an item named ``meta`` (jaxckpt's item name) is
    Orbax's: listed, restorable, never deleted or set aside; a file named like a step
    beside it does not turn the refusal of a writable open off."""
    directory = tmp_path / "orbax"
    with ocp.CheckpointManager(directory) as mngr:
        for step in STEPS:
            item = (ocp.args.JsonSave({"lr": 0.1, "note": "mine"}) if meta == "json" else
                    ocp.args.StandardSave({"lr": np.float32(0.1)}))
            mngr.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(as_numpy(state_at(step)["params"])), meta=item))
    (directory / "7").write_text("a log, named like a step\n")
    before = snapshot(directory)
    with CheckpointManager(directory, read_only=True) as mngr:
        assert mngr.steps() == list(STEPS) and mngr.latest_step() == 30
        verdicts = mngr.verdicts()
        assert {s: verdicts[s].writer for s in STEPS} == dict.fromkeys(STEPS, "orbax")
        assert verdicts[7].incomplete and "not a checkpoint" in verdicts[7].describe()
        assert_same(mngr.restore(20, subtree="params"), as_numpy(state_at(20)["params"]))
    for kwargs in ({}, {"policy": POLICY}):
        with pytest.raises(jaxckpt.CheckpointDirectoryError, match="written by plain Orbax"):
            CheckpointManager(directory, **kwargs)
    assert snapshot(directory) == before


@pytest.mark.parametrize("naming", [{"step_prefix": "ckpt"}, {"step_format_fixed_length": 8}])
def test_orbax_checkpoints_under_another_step_naming_refuse_a_writable_open(tmp_path, naming):
    directory = tmp_path / "orbax"
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(**naming)) as m:
        for step in STEPS:
            m.save(step, args=ocp.args.StandardSave(as_numpy(state_at(step))))
    before = snapshot(directory)
    names = sorted(p.name for p in directory.iterdir())
    with pytest.raises(jaxckpt.CheckpointDirectoryError,
                       match=f"Orbax checkpoints named {', '.join(names)}: a step naming"):
        CheckpointManager(directory, policy=POLICY)
    assert snapshot(directory) == before
    # A read-only open and the CLI find nothing, and say why instead of listing nothing.
    with pytest.warns(UserWarning, match=f"no checkpoint under jaxckpt's step naming, but Orbax "
                                         f"checkpoints named {', '.join(names)}"):
        with CheckpointManager(directory, read_only=True) as m:
            assert m.steps() == []
            with pytest.raises(jaxckpt.CheckpointNotFoundError,
                               match=f"Orbax checkpoints named {names[0]}.*step_prefix=") as e:
                m.restore("latest")
            assert "nothing has been saved" not in str(e.value)
    out = subprocess.run([sys.executable, "-m", "jaxckpt", "ls", str(directory)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode != 0 and f"Orbax checkpoints named {names[0]}" in out.stderr, out
    assert snapshot(directory) == before


def test_adopt_applies_the_policy_to_orbax_checkpoints(tmp_path):
    directory = tmp_path / "orbax"
    write_orbax(directory, "standard", True)
    policy = CheckpointPolicy(monitor="val_loss", mode="min", keep_best=1, keep_latest=1)
    with CheckpointManager(directory, policy, adopt=True) as mngr:
        assert mngr.best_step() == 20
        assert mngr.save(40, state_at(40), metrics={"val_loss": 0.35})
        mngr.wait()
        assert mngr.steps() == [20, 40]  # 10 and 30 deleted by the policy, as asked
        assert_same(mngr.restore(20, target=abstract(state_at(0))), state_at(20))
        assert_same(mngr.restore("latest", target=abstract(state_at(0))), state_at(40))
    assert sorted(p.name for p in directory.iterdir() if p.name.isdigit()) == ["20", "40"]
    # While Orbax's checkpoint 20 remains, each writing open must adopt it again.
    with pytest.raises(jaxckpt.CheckpointDirectoryError, match=r"mixes .*\[40\].*\[20\]"):
        CheckpointManager(directory, policy)
    with CheckpointManager(directory, adopt=True) as mngr:  # the stored policy applies
        assert mngr.policy.keep_best == 1 and mngr.best_step() == 20


def test_a_directory_mixing_jaxckpt_and_orbax_checkpoints_is_refused(tmp_path):
    directory = tmp_path / "run"
    with CheckpointManager(directory, POLICY) as mngr:
        mngr.save(1, state_at(1), metrics={"val_loss": 0.9})
    with ocp.CheckpointManager(directory) as orbax_mngr:  # someone saves with plain Orbax
        orbax_mngr.save(2, args=ocp.args.StandardSave(state_at(2)))
    before = snapshot(directory)
    with pytest.raises(jaxckpt.CheckpointDirectoryError) as refused:
        CheckpointManager(directory, POLICY)
    message = str(refused.value)
    assert "jaxckpt ([1])" in message and "plain Orbax ([2])" in message
    assert "Move the Orbax checkpoints" in message and "adopt=True" in message
    assert snapshot(directory) == before
    with CheckpointManager(directory, read_only=True) as mngr:
        assert mngr.steps() == [1, 2]
        assert_same(mngr.restore(2), as_numpy(state_at(2)))


def test_cli_ls_lists_a_plain_orbax_directory(tmp_path):
    directory = tmp_path / "orbax"
    write_orbax(directory, "composite", True)
    before = snapshot(directory)
    out = subprocess.run([sys.executable, "-m", "jaxckpt", "ls", str(directory)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()]
    assert [r[0] for r in rows if r and r[0].isdigit()] == ["10", "20", "30"]
    assert out.stdout.count("orbax, no manifest") == 3
    assert "stopped" not in out.stdout + out.stderr
    # Kept (jaxckpt never deletes Orbax's steps) and written when Orbax committed them.
    assert out.stdout.count("orbax's own") == 2 and " ? " not in out.stdout, out.stdout
    out = subprocess.run([sys.executable, "-m", "jaxckpt", "ls", str(directory), "--json"],
                         capture_output=True, text=True, timeout=120, check=True)
    for row in json.loads(out.stdout)["checkpoints"]:
        committed = json.loads((directory / str(row["step"]) / "_CHECKPOINT_METADATA")
                               .read_text())["commit_timestamp_nsecs"]
        assert row["time"] == committed / 1e9 and row["kept"], row
    assert snapshot(directory) == before


def test_cli_ranks_a_plain_orbax_directory_by_monitor_and_mode(tmp_path):
    directory = tmp_path / "orbax"
    write_orbax(directory, "default", True)
    with CheckpointManager(directory, CheckpointPolicy(monitor="val_loss", mode="min"),
                           read_only=True) as m:
        expected = m.best_step()
    assert expected is not None
    for argv in (["best", "--monitor", "val_loss", "--mode", "min", "--json"],
                 ["ls", "--monitor", "val_loss", "--json"]):
        out = subprocess.run([sys.executable, "-m", "jaxckpt", argv[0], str(directory),
                              *argv[1:]], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        data = json.loads(out.stdout)
        assert data.get("step", data.get("best_step")) == expected, data
    out = subprocess.run([sys.executable, "-m", "jaxckpt", "best", str(directory), "--mode",
                          "min"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--mode needs --monitor" in out.stderr


def test_a_directory_of_orbax_v1_training_checkpointer_is_read(tmp_path):
    """Orbax's newer API names its PyTree item "state", like jaxckpt: still Orbax's."""
    directory = tmp_path / "v1"
    with ocp.v1.training.Checkpointer(directory) as checkpointer:
        for step in STEPS:
            checkpointer.save_pytree(step, state_at(step), metrics={"val_loss": VAL_LOSS[step]})
    with CheckpointManager(directory, POLICY, read_only=True) as m:
        assert m.steps() == list(STEPS) and m.best_step() == 20
        assert {v.writer for v in m.verdicts().values()} == {"orbax"}
        assert_same(m.restore("best", target=abstract(state_at(0))), state_at(20))
        assert_same(m.restore(30), as_numpy(state_at(30)))
    with pytest.raises(jaxckpt.CheckpointDirectoryError, match="written by plain Orbax"):
        CheckpointManager(directory, POLICY)


# -- the other direction: plain Orbax reads what jaxckpt wrote -----------------------------


def jaxckpt_run(directory, monitor="val_loss", mode="min", values=(0.5, 0.3, 0.4, 0.45, 0.35,
                                                                    0.2, 0.6, 0.7)):
    """Eight saves with deletions (best 1, latest 2) and one save without metrics."""
    policy = CheckpointPolicy(monitor=monitor, mode=mode, keep_best=1, keep_latest=2)
    with CheckpointManager(directory, policy) as mngr:
        for step, value in enumerate(values, start=1):
            mngr.save(step, state_at(step), metrics={monitor: value}, epoch=step)
        mngr.save(len(values) + 1, state_at(len(values) + 1), force=True)  # mid-epoch
        mngr.wait()
        return mngr.steps(), mngr.best_step()


@pytest.mark.parametrize("monitor,mode,values", [
    ("val_loss", "min", (0.5, 0.3, 0.4, 0.45, 0.35, 0.2, 0.6, 0.7)),
    ("val_accuracy", "max", (0.5, 0.7, 0.6, 0.65, 0.9, 0.8, 0.85, 0.7))])
def test_plain_orbax_best_fn_finds_the_best_jaxckpt_kept(tmp_path, monitor, mode, values):
    steps, best = jaxckpt_run(tmp_path, monitor, mode, values)
    assert steps == [best, 8, 9] and best < 8  # older checkpoints were deleted
    options = ocp.CheckpointManagerOptions(best_fn=lambda m: m[monitor], best_mode=mode,
                                           read_only=True)
    with ocp.CheckpointManager(tmp_path, options=options) as mngr:
        assert mngr.all_steps() == steps
        assert mngr.latest_step() == 9
        assert mngr.best_step() == best


def test_plain_orbax_restores_a_jaxckpt_checkpoint(tmp_path, caplog):
    run, own = tmp_path / "jaxckpt", tmp_path / "orbax"
    with Noise(caplog, run) as noise:
        jaxckpt_run(run)
    assert noise.messages == set()  # not Orbax's "did not provide metrics" at step 9
    with ocp.CheckpointManager(own, item_names=("state",)) as orbax_mngr:  # Orbax's own
        orbax_mngr.save(8, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state_at(8))))
    target = abstract(state_at(0))

    with Noise(caplog, run) as noise:  # with a target: no warnings at all
        with ocp.CheckpointManager(run, item_names=("state",)) as mngr:
            restored = mngr.restore(8, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target)))
        assert_same(restored.state, state_at(8))
        with ocp.CheckpointManager(run) as mngr:
            restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))))
        assert_same(restored.state, state_at(9))
        assert_same(ocp.StandardCheckpointer().restore(run / "8" / "state", target),
                    state_at(8))
    assert noise.messages == set()

    # Without a target: StandardCheckpointer returns numpy, with no warning Orbax does not
    # give for its own checkpoints. PyTreeRestore() without restore_args asks for the
    # shardings jaxckpt does not write (orbax_io._state_handler), as Orbax's message says.
    with Noise(caplog, run) as noise:
        tree = ocp.StandardCheckpointer().restore(run / "8" / "state")
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(tree))
    assert_same(tree, state_at(8))
    with Noise(caplog, own) as own_noise:
        ocp.StandardCheckpointer().restore(own / "8" / "state")
    assert noise.messages <= own_noise.messages
    assert not (run / "8" / "state" / "_sharding").exists()
    with pytest.raises(ValueError, match="Provide `mesh` and `mesh_axes` OR `sharding`"):
        ocp.PyTreeCheckpointer().restore(run / "8" / "state")


def test_a_jaxckpt_directory_opened_by_plain_orbax_for_writing_keeps_its_checkpoints(tmp_path):
    """Orbax's default options (no max_to_keep) delete nothing jaxckpt wrote."""
    steps, _ = jaxckpt_run(tmp_path)
    with ocp.CheckpointManager(tmp_path) as mngr:
        assert mngr.all_steps() == steps
    with CheckpointManager(tmp_path, read_only=True) as mngr:
        assert mngr.steps() == steps and mngr.verify() == {s: [] for s in steps}


# -- partial restore ------------------------------------------------------------------------


def read_chars() -> int:
    """Bytes this process has read through read()/pread() so far (page cache included)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def test_a_subtree_restore_reads_the_params_and_not_the_optimizer_state(tmp_path):
    rng = np.random.default_rng(0)
    params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(512, 256)), jnp.float32)}}
    def moments():  # random, so nothing compresses
        return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    state = {"params": params, "opt_state": {"mu": moments(), "nu": moments()}, "step": 7}
    params_bytes = 512 * 256 * 4
    with CheckpointManager(tmp_path, CheckpointPolicy(monitor="val_loss")) as mngr:
        mngr.save(7, state, metrics={"val_loss": 0.1})
    with CheckpointManager(tmp_path, read_only=True) as mngr:
        start = read_chars()
        whole = mngr.restore("best")
        full_read = read_chars() - start
        start = read_chars()
        only = mngr.restore("best", target=abstract(params), subtree="params")
        partial_read = read_chars() - start
        start = read_chars()
        kernel = mngr.restore(7, subtree=("params", "dense", "kernel"))
        kernel_read = read_chars() - start
    assert_same(only, params)
    assert_same(whole["params"], as_numpy(params))
    np.testing.assert_array_equal(kernel, np.asarray(params["dense"]["kernel"]))
    print(f"\nbytes read: full restore {full_read:,} (checksums + arrays), subtree 'params' "
          f"{partial_read:,}, one leaf {kernel_read:,}; params are {params_bytes:,} of "
          f"{3 * params_bytes:,} array bytes")
    assert full_read >= 3 * params_bytes  # everything, at least once
    assert partial_read < 1.25 * params_bytes  # the params, not the two moments
    assert kernel_read < 1.25 * params_bytes


def test_a_subtree_that_is_not_there_names_the_keys(tmp_path):
    with CheckpointManager(tmp_path) as mngr:
        mngr.save(1, state_at(1))
    with CheckpointManager(tmp_path, read_only=True) as mngr:
        with pytest.raises(jaxckpt.RestoreStructureError,
                           match=r"at params it holds the keys \['b', 'w'\]"):
            mngr.restore(subtree=("params", "kernel"))
        with pytest.raises(jaxckpt.RestoreStructureError,
                           match=r"the top level it holds the keys \['opt_state', 'params'\]"):
            mngr.restore(subtree="parameters")
        with pytest.raises(TypeError, match="subtree must be a dict key"):
            mngr.restore(subtree=("params", 0))


# -- stable paths ---------------------------------------------------------------------------


def test_checkpoint_path_names_the_best_and_latest_directories(tmp_path):
    policy = CheckpointPolicy(monitor="val_loss", mode="min", keep_best=1, keep_latest=1)
    with CheckpointManager(tmp_path, policy) as mngr:
        for step, value in [(1, 0.5), (2, 0.3), (3, 0.4)]:
            mngr.save(step, state_at(step), metrics={"val_loss": value})
        mngr.wait()
        best, latest = mngr.checkpoint_path("best"), mngr.checkpoint_path("latest")
        assert (best, latest) == (tmp_path / "2", tmp_path / "3")
        assert mngr.checkpoint_path() == latest and mngr.checkpoint_path(2) == best
        mngr.save(4, state_at(4), metrics={"val_loss": 0.45})
        mngr.wait()
        assert mngr.checkpoint_path("best") == best and best.is_dir()  # still kept
        assert not latest.exists() and mngr.checkpoint_path("latest") == tmp_path / "4"
        with pytest.raises(jaxckpt.CheckpointNotFoundError, match=r"\[2, 4\]"):
            mngr.checkpoint_path(3)
    # An outside tool reads the best with plain Orbax from that path.
    assert_same(ocp.StandardCheckpointer().restore(best / "state", abstract(state_at(0))),
                state_at(2))
    orbax_dir = tmp_path / "orbax"
    write_orbax(orbax_dir, "standard", True)
    with CheckpointManager(orbax_dir, POLICY, read_only=True) as mngr:
        assert mngr.checkpoint_path("best") == orbax_dir / "20"


def test_an_orbax_json_item_named_meta_leaves_orbax_metrics_readable(tmp_path):
    # Plain Orbax with its own JSON item "meta": not jaxckpt's record, so Orbax's metrics
    # (best_fn) and commit time are read, as for any other plain Orbax save.
    options = ocp.CheckpointManagerOptions(best_fn=lambda m: m["val_loss"], best_mode="min")
    with ocp.CheckpointManager(tmp_path, options=options) as m:
        for step, loss in ((1, 0.3), (2, 0.1), (3, 0.2)):
            m.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave({"w": np.full(3, step, np.float32)}),
                meta=ocp.args.JsonSave({"note": "my run", "step": step})),
                metrics={"val_loss": loss})
    policy = CheckpointPolicy(monitor="val_loss", mode="min")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "written by plain Orbax, no manifest"
        with CheckpointManager(tmp_path, policy, read_only=True) as m:
            assert m.best_step() == 2 and m.metrics(2) == {"val_loss": 0.1}
            assert [h["metrics"] for h in m.history()] == [{"val_loss": v} for v in (0.3, 0.1, 0.2)]
            assert np.array_equal(m.restore("best")["w"], np.full(3, 2, np.float32))
