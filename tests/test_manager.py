"""CheckpointManager against real Orbax on a temporary directory."""

import json
import os
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jaxckpt
from jaxckpt import CheckpointManager, CheckpointPolicy
from _util import TUTORIAL, init_state, leaves_equal, run_tutorial, train_step



@pytest.fixture(scope="module")
def tutorial_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tutorial")
    return d, run_tutorial(d)


@pytest.mark.parametrize("async_save", [True, False])
def test_tutorial_keeps_best_45_and_latest_50(tmp_path, async_save):
    states = run_tutorial(tmp_path, async_save=async_save)
    mngr = CheckpointManager(tmp_path)
    assert (mngr.best_step(), mngr.latest_step(), mngr.steps()) == (45, 50, [45, 50])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["45", "50"]
    best = mngr.restore("best", target=init_state())
    assert leaves_equal(best.params, states[45].params)
    assert leaves_equal(best.opt_state, states[45].opt_state)
    assert int(best.step) == 45
    latest = mngr.restore("latest")
    assert leaves_equal(latest["params"], states[50].params)
    assert mngr.restore_data_state("best") == {"epoch": 45}
    assert {s: [str(r) for r in rs] for s, rs in mngr.kept_reasons().items()} == {45: ["best #1"], 50: ["latest"]}
    mngr.close()


def test_history_has_every_step_kept_or_not(tutorial_dir):
    d, _ = tutorial_dir
    with CheckpointManager(d, read_only=True) as mngr:
        history = mngr.history()
    assert [h["step"] for h in history] == list(range(1, 51))
    assert history[44] == {"step": 45, "metrics": {"val_loss": 0.61, "loss": 0.61 + 0.1}}


def test_reopen_in_new_process_gives_same_view(tutorial_dir):
    d, _ = tutorial_dir
    code = textwrap.dedent(f"""
        import json, jaxckpt
        m = jaxckpt.CheckpointManager({str(d)!r}, read_only=True)
        print(json.dumps({{"best": m.best_step(), "latest": m.latest_step(), "steps": m.steps(),
                          "history": m.history()}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    with CheckpointManager(d, read_only=True) as mngr:
        assert seen == {"best": mngr.best_step(), "latest": mngr.latest_step(),
                        "steps": mngr.steps(), "history": mngr.history()}
    assert (seen["best"], seen["latest"]) == (45, 50)


def test_worse_metric_after_restart_never_replaces_best(tmp_path):
    run_tutorial(tmp_path)
    state = init_state()
    with CheckpointManager(tmp_path, TUTORIAL) as mngr:
        mngr.save(51, state, metrics={"val_loss": 0.7})
        assert (mngr.best_step(), mngr.latest_step(), mngr.steps()) == (45, 51, [45, 51])
        mngr.save(52, state, metrics={"val_loss": 0.5})
    with CheckpointManager(tmp_path, TUTORIAL) as mngr:
        assert (mngr.best_step(), mngr.steps()) == (52, [52])


@pytest.mark.parametrize("change", [{"mode": "max"}, {"min_delta": 0.3}])
def test_a_changed_objective_ranks_by_the_values_not_the_stored_improved_flags(tmp_path,
                                                                               change):
    # A run started with the wrong mode (or min_delta), reopened to continue with the right
    # one: flags judged under the old objective named the worst value best, and the
    # writer deleted the real best.
    state = init_state()
    first = CheckpointPolicy(monitor="score", mode="min", keep_all=True)
    with CheckpointManager(tmp_path, first) as mngr:
        for step, v in zip((1, 2, 3, 4), (0.9, 0.5, 0.45, 0.7)):
            mngr.save(step, state, metrics={"score": v})
    fixed = CheckpointPolicy(**{"monitor": "score", "mode": "min", "keep_best": 1,
                                "keep_latest": 1, **change})
    best = {"mode": 1, "min_delta": 2}[next(iter(change))]  # 0.9; 0.5 (0.45 is not 0.3 better)
    with CheckpointManager(tmp_path, fixed, read_only=True) as mngr:
        assert mngr.best_step() == best
    with CheckpointManager(tmp_path, fixed) as mngr:
        mngr.save(5, state, metrics={"score": 0.6 if "mode" in change else 0.45})
        assert mngr.best_step() == best and mngr.steps() == [best, 5]


def test_keep_latest_zero_writes_only_improvements(tmp_path):
    policy = CheckpointPolicy(monitor="val_acc", keep_best=2, keep_latest=0)
    state = init_state()
    with CheckpointManager(tmp_path, policy) as mngr:
        written = [mngr.save(s, state, metrics={"val_acc": a})
                   for s, a in enumerate([0.5, 0.4, 0.6, 0.3, 0.7, 0.55], start=1)]
        assert written == [True, True, True, False, True, False]
        assert mngr.steps() == [3, 5] and mngr.best_step() == 5
        assert len(mngr.history()) == 6


def test_every_n_steps_skips_when_not_due(tmp_path):
    with CheckpointManager(tmp_path, CheckpointPolicy(every_n_steps=5, keep_latest=2)) as m:
        saved = [s for s in range(1, 21) if m.save(s, {"x": jnp.full((3,), s)})]
        assert saved == [5, 10, 15, 20] and m.steps() == [15, 20]
        assert np.array_equal(m.restore(15)["x"], np.full((3,), 15))


def test_should_save_agrees_with_what_save_does_when_not_forced(tmp_path):
    now = [0.0]
    policy = CheckpointPolicy(every_n_steps=3, every_n_epochs=None, keep_latest=3)
    with CheckpointManager(tmp_path, policy, clock=lambda: now[0]) as m:
        for step in range(1, 10):
            asked = m.should_save(np.int64(step))
            assert m.save(step, {"x": jnp.full((2,), step)}) == asked, step
        assert m.steps() == [3, 6, 9]
        with pytest.raises(TypeError, match="step"):
            m.should_save(3.0)
    with CheckpointManager(tmp_path, read_only=True) as m:
        assert m.should_save(12) is False  # a reader never saves


def test_every_seconds_with_injected_clock(tmp_path):
    now = [0.0]
    policy = CheckpointPolicy(every_seconds=10, keep_latest=5)
    with CheckpointManager(tmp_path, policy, clock=lambda: now[0]) as m:
        for step in range(1, 8):
            now[0] = 4.0 * step
            m.save(step, {"x": jnp.zeros(2)})
        assert m.steps() == [3, 6]  # t=12 and t=24: the first calls >= 10 s after the last save


def test_target_none_returns_numpy_nested_dicts(tutorial_dir):
    d, states = tutorial_dir
    with CheckpointManager(d, read_only=True) as mngr:
        tree = mngr.restore(50)
    assert set(tree) == {"step", "params", "opt_state", "rng", "extras"}
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(tree))
    assert np.array_equal(tree["rng"], np.asarray(states[50].rng))
    assert np.array_equal(tree["opt_state"][0]["mu"]["out"]["kernel"],
                          np.asarray(states[50].opt_state[0].mu["out"]["kernel"]))


def test_restore_with_sharded_abstract_target(tmp_path):
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "fsdp"))
    x = jax.device_put(jnp.arange(32.0).reshape(8, 4), NamedSharding(mesh, P("fsdp", None)))
    with CheckpointManager(tmp_path) as m:
        m.save(1, {"w": x, "b": jnp.ones(4)})
    target = {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32,
                                        sharding=NamedSharding(mesh, P(None, "data"))),
              "b": jax.ShapeDtypeStruct((4,), jnp.float32,
                                        sharding=NamedSharding(mesh, P()))}
    with CheckpointManager(tmp_path, read_only=True) as m:
        out = m.restore(1, target=target)
    assert out["w"].sharding == target["w"].sharding
    assert np.array_equal(np.asarray(out["w"]), np.arange(32.0).reshape(8, 4))
    assert out["b"].sharding.is_fully_replicated


def test_typed_prng_key_round_trip(tmp_path):
    key = jax.random.key(7)
    with CheckpointManager(tmp_path) as m:
        m.save(1, {"key": key, "n": jnp.int32(3)})
        out = m.restore(1, target={"key": jax.random.key(0), "n": jnp.int32(0)})
    assert jax.dtypes.issubdtype(out["key"].dtype, jax.dtypes.prng_key)
    assert np.array_equal(jax.random.key_data(out["key"]), jax.random.key_data(key))


def test_data_state_bytes_and_dict(tmp_path):
    with CheckpointManager(tmp_path, CheckpointPolicy(keep_latest=3)) as m:
        m.save(1, {"x": jnp.zeros(1)}, data_state=b"\x00grain\xff")
        m.save(2, {"x": jnp.zeros(1)}, data_state={"next_index": 17, "epoch": 2})
        m.save(3, {"x": jnp.zeros(1)})
        assert m.restore_data_state(1) == b"\x00grain\xff"
        assert m.restore_checkpoint(2).data_state == {"next_index": 17, "epoch": 2}
        assert m.restore_data_state(3) is None
        with pytest.raises(TypeError, match="JSON-able or bytes"):
            m.save(4, {"x": jnp.zeros(1)}, data_state={"bad": object()})
        # a position counted with numpy comes back as the Python numbers it holds
        m.save(5, {"x": jnp.zeros(1)}, data_state={"i": np.int64(3), "seen": [np.float32(0.5)],
                                                   "rng": (np.uint32(7), 2)})
        restored = m.restore_data_state(5)
        assert restored == {"i": 3, "seen": [0.5], "rng": [7, 2]}
        assert type(restored["i"]) is int


def test_donated_buffers_after_async_save(tmp_path):
    """The caller may donate its state right after save(): the checkpoint keeps the values."""
    state = init_state()
    step = jax.jit(train_step.__wrapped__, donate_argnums=0)
    with CheckpointManager(tmp_path, CheckpointPolicy(keep_latest=10)) as m:
        for i in range(1, 6):
            state = step(state)
            expected = jax.device_get(state)
            m.save(i, state)
            state = step(state)  # donates the buffers save() was given
            m.save(i * 100, state) if i == 5 else None
            state = state.replace(params=jax.tree.map(lambda p: p * 0 + 1e9, state.params))
            saved = expected
        m.wait()
        assert leaves_equal(m.restore(5, target=init_state()).params, saved.params)


def test_saving_a_donated_state_names_the_leaf_and_the_fix(tmp_path):
    state = init_state()
    step = jax.jit(train_step.__wrapped__, donate_argnums=0)
    step(state)  # the caller kept the input, whose buffers are gone
    with CheckpointManager(tmp_path, CheckpointPolicy(keep_latest=2)) as m:
        with pytest.raises(TypeError, match=r"params/\S+ was deleted: its buffer was donated "
                                            r"to a jitted step.*save the state the step "
                                            r"returned"):
            m.save(1, state)
        assert m.steps() == []


def test_numpy_arrays_changed_in_place_after_an_async_save_are_saved_as_they_were(tmp_path):
    """A numpy loop (or an EMA buffer) updates its arrays in place as soon as save()
    returns; each checkpoint holds the values at its save() call, verifies, and restores."""
    w = np.zeros((512, 512), np.float32)  # 1 MiB: the write is still running below
    with CheckpointManager(tmp_path / "c", CheckpointPolicy(keep_all=True)) as m:
        for step in range(1, 7):
            assert m.save(step, {"w": w, "count": np.int64(step)})
            w += 1
        m.wait()
        assert m.steps() == list(range(1, 7)) and m.verify() == {s: [] for s in range(1, 7)}
        for step in range(1, 7):
            restored = m.restore(step)
            assert np.all(restored["w"] == step - 1) and restored["count"] == step


def test_fingerprints_are_of_the_saved_bytes_while_the_caller_overwrites_them(tmp_path):
    """The fingerprints are computed in the background, after save() has returned. Steps
    that donate and overwrite the saved buffers right away (16 MiB: Orbax is still
    writing) change neither the checkpoint nor its fingerprints."""
    bump = jax.jit(lambda s: jax.tree.map(lambda x: x + 1.0, s), donate_argnums=0)
    state = {f"w{i}": jnp.full((512, 1024), float(i), jnp.float32) for i in range(8)}  # 16 MiB
    with CheckpointManager(tmp_path, CheckpointPolicy(keep_latest=3)) as m:
        for step in (1, 2):
            expected = jax.device_get(state)
            m.save(step, state)
            for _ in range(3):
                state = bump(state)
        m.wait()
        assert m.verify() == {1: [], 2: []}
        assert leaves_equal(m.restore(2), expected)
        assert leaves_equal(m.restore(1), {k: v - 3.0 for k, v in expected.items()})


def test_a_cpu_state_goes_to_orbax_after_save_returns_with_the_values_of_the_call(
        tmp_path, monkeypatch):
    """On CPU, save() pins the state's buffers and Orbax's save runs on the background
    thread. Held back there until the loop has donated and overwritten the saved buffers
    three times, it still writes (and fingerprints) the values of the save() call."""
    import threading

    from jaxckpt import orbax_io

    gate, threads = threading.Event(), []
    real_save = orbax_io.save

    def held(*args):
        threads.append(threading.current_thread() is threading.main_thread())
        if threads[-1]:
            raise AssertionError("Orbax's save ran on the calling thread")
        assert gate.wait(60)
        return real_save(*args)
    monkeypatch.setattr(orbax_io, "save", held)
    bump = jax.jit(lambda s: jax.tree.map(lambda x: x + 1.0, s), donate_argnums=0)
    state = {"w": jnp.arange(4096.0).reshape(64, 64), "b": jnp.ones(3), "n": 7}
    with CheckpointManager(tmp_path, CheckpointPolicy(keep_latest=2)) as m:
        expected = jax.device_get(state)
        assert m.save(1, state, metrics={"loss": 1.0})
        for _ in range(3):
            state = bump(state)
        jax.block_until_ready(state)
        assert not [p for p in tmp_path.iterdir() if p.name.startswith("1")]  # not begun
        gate.set()
        m.wait()
        # Arrays deleted right after save() (explicit memory management) are saved too.
        expected2 = jax.device_get(state)
        assert m.save(2, state, metrics={"loss": 0.5})
        jax.tree.map(lambda x: x.delete() if isinstance(x, jax.Array) else None, state)
        m.wait()
        assert threads == [False, False]
        assert m.verify() == {1: [], 2: []}
        assert leaves_equal(m.restore(1), expected)
        assert leaves_equal(m.restore(2), expected2)
        assert m.history() == [{"step": 1, "metrics": {"loss": 1.0}},
                               {"step": 2, "metrics": {"loss": 0.5}}]


def test_views_pin_cpu_buffers_against_donation_and_only_whole_cpu_arrays_are_pinned():
    """What the background handoff relies on: while a view of a CPU buffer exists, a
    donating step copies the array instead of reusing its buffer, and deleting the array
    does not free it. A sharded array (or one on an accelerator) is not pinned: its save
    hands it to Orbax on the caller."""
    from jaxckpt import target as target_lib

    x = jnp.arange(1024.0)
    pinned = target_lib.pinned_on_host({"x": x, "n": 3, "y": np.ones(2)})
    assert len(pinned.views) == 1
    out = jax.jit(lambda a: a * 0.0 - 1.0, donate_argnums=0)(x)
    assert np.all(np.asarray(out) == -1.0)
    assert not x.is_deleted() and np.array_equal(np.asarray(x), np.arange(1024.0))
    x.delete()  # the pinned buffer outlives the array, and Orbax is given its own arrays
    given = pinned.arrays()
    assert given["n"] == 3 and np.array_equal(given["y"], np.ones(2))
    assert not given["x"].is_deleted() and np.array_equal(given["x"], np.arange(1024.0))
    mesh = Mesh(np.array(jax.devices()[:4]), ("d",))
    sharded = jax.device_put(jnp.arange(8.0), NamedSharding(mesh, P("d")))
    assert target_lib.pinned_on_host({"x": jnp.ones(2), "s": sharded}) is None


# -- bad input ---------------------------------------------------------------------------


def test_missing_metric_names_wanted_and_given_and_deletes_nothing(tutorial_dir, tmp_path):
    run_tutorial(tmp_path)
    with CheckpointManager(tmp_path, TUTORIAL) as m:
        with pytest.raises(jaxckpt.MetricError, match=r"'val_loss'.*\['acc', 'loss'\]"):
            m.save(51, init_state(), metrics={"loss": 0.1, "acc": 0.9})
        assert m.steps() == [45, 50]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["45", "50"]


def test_nan_metric_is_latest_never_best(tmp_path):
    run_tutorial(tmp_path)
    with CheckpointManager(tmp_path, TUTORIAL) as m:
        with pytest.warns(UserWarning, match="not finite"):
            assert m.save(51, init_state(), metrics={"val_loss": float("nan")})
        assert (m.best_step(), m.latest_step(), m.steps()) == (45, 51, [45, 51])
        with pytest.warns(UserWarning, match="not finite"):
            m.save(52, init_state(), metrics={"val_loss": float("-inf")})
        assert (m.best_step(), m.steps()) == (45, [45, 52])


def test_a_nan_metric_with_keep_latest_zero_is_said_not_to_be_written(tmp_path):
    policy = CheckpointPolicy(monitor="val_loss", keep_best=1, keep_latest=0)
    with CheckpointManager(tmp_path, policy) as m:
        assert m.save(1, {"x": jnp.ones(2)}, metrics={"val_loss": 0.5})
        with pytest.warns(UserWarning, match=r"not finite: it is never best, and with "
                                             r"keep_latest=0 it is not written unless forced"):
            assert not m.save(2, {"x": jnp.ones(2)}, metrics={"val_loss": float("nan")})
        assert m.steps() == [1]


def test_save_without_metrics_is_latest_never_best_and_warns_once(tmp_path, caplog):
    policy = CheckpointPolicy(monitor="val_loss", keep_best=1, keep_latest=1)
    with CheckpointManager(tmp_path, policy) as m:
        m.save(1, {"x": jnp.zeros(1)}, metrics={"val_loss": 0.5})
        with caplog.at_level("WARNING", logger="jaxckpt"):
            for step in (2, 3, 4):  # as Trainer's mid-epoch saves: no metrics
                assert m.save(step, {"x": jnp.zeros(1)})
        warned = [r for r in caplog.records if "without metrics" in r.getMessage()]
        assert len(warned) == 1 and "'val_loss'" in warned[0].getMessage()
        assert (m.best_step(), m.steps()) == (1, [1, 4])


def test_step_not_above_latest(tmp_path):
    with CheckpointManager(tmp_path) as m:
        m.save(5, {"x": jnp.zeros(1)})
        for bad in (5, 3):
            with pytest.raises(ValueError, match="not above the latest saved step 5"):
                m.save(bad, {"x": jnp.zeros(1)})
        assert m.steps() == [5]


def test_restore_missing_step_lists_available(tutorial_dir):
    d, _ = tutorial_dir
    with CheckpointManager(d, read_only=True) as m:
        with pytest.raises(jaxckpt.CheckpointNotFoundError, match=r"step 7.*\[45, 50\]"):
            m.restore(7)


def test_restore_from_empty_directory(tmp_path):
    with CheckpointManager(tmp_path) as m:
        with pytest.raises(jaxckpt.CheckpointNotFoundError, match="nothing has been saved"):
            m.restore()


def test_best_without_monitor(tmp_path):
    with CheckpointManager(tmp_path) as m:
        m.save(1, {"x": jnp.zeros(1)})
        with pytest.raises(jaxckpt.CheckpointNotFoundError, match="monitors no metric"):
            m.restore("best")


def test_mismatched_target_lists_differing_keys(tutorial_dir):
    d, _ = tutorial_dir
    wrong = init_state(width=16)
    wrong = wrong.replace(params={**wrong.params, "extra": jnp.zeros(3)})
    with CheckpointManager(d, read_only=True) as m:
        with pytest.raises(jaxckpt.RestoreStructureError) as err:
            m.restore("best", target=wrong)
    msg = str(err.value)
    assert "params/extra" in msg and "in target, not in checkpoint" in msg
    assert "params/dense/kernel: checkpoint shape (4, 8), target shape (4, 16)" in msg
    assert "target=None" in msg


def test_directory_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(jaxckpt.CheckpointDirectoryError, match="is a file"):
        CheckpointManager(f)
    assert f.read_text() == "x"


def test_directory_not_writable(tmp_path):
    # /proc refuses new entries even to root; chmod alone would not stop root.
    with pytest.raises(jaxckpt.CheckpointDirectoryError, match="not writable"):
        CheckpointManager("/proc/jaxckpt-test/ckpt")
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o500)
        with pytest.raises(jaxckpt.CheckpointDirectoryError, match="not writable"):
            CheckpointManager(d / "ckpt")


def test_background_write_failure_is_raised_and_loses_nothing(tmp_path):
    """A real failed write (file-size limit, EFBIG) reaches the next save()/wait()."""
    code = textwrap.dedent(f"""
        import resource, signal, jax, jax.numpy as jnp, jaxckpt
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        d = {str(tmp_path)!r}
        m = jaxckpt.CheckpointManager(d, jaxckpt.CheckpointPolicy(keep_latest=1))
        m.save(1, {{"x": jnp.arange(10.0)}})
        m.wait()
        big = jax.random.normal(jax.random.key(0), (1_000_000,))  # random: incompressible
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
        m.save(2, {{"x": big}})
        try:
            m.wait()
            print("NO ERROR")
        except jaxckpt.CheckpointWriteError as e:
            print("ERROR", e)
        print("STEPS", m.steps())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert "ERROR background write" in out.stdout, out.stdout + out.stderr[-3000:]
    assert "STEPS [1]" in out.stdout
    assert "File too large" in out.stdout or "EFBIG" in out.stdout, out.stdout
    with CheckpointManager(tmp_path) as m:
        assert m.steps() == [1]
        assert np.array_equal(m.restore(1)["x"], np.arange(10.0))
        m.save(3, {"x": jax.random.normal(jax.random.key(0), (1_000_000,))})  # limit gone
        m.wait()
        assert m.steps() == [3]


def test_a_failed_history_file_write_says_what_failed_and_claims_no_commit(tmp_path,
                                                                        monkeypatch):
    from jaxckpt import ledger as ledger_lib

    def refuse(*_):
        raise PermissionError(1, "Operation not permitted")
    with CheckpointManager(tmp_path, CheckpointPolicy(keep_latest=2)) as m:
        m.save(1, {"x": jnp.arange(3.0)})
        m.wait()
        monkeypatch.setattr(ledger_lib, "write_file", refuse)
        m.save(2, {"x": jnp.arange(3.0)}, force=True)
        m._writer.flush_ledger()
        with pytest.raises(jaxckpt.CheckpointWriteError) as e:
            m.wait()
        message = str(e.value)
        assert f"(writing {tmp_path / 'jaxckpt.json'})" in message, message
        assert "Operation not permitted" in message and "committed" not in message
        monkeypatch.undo()
        assert m.steps() == [1, 2]


def test_a_failed_write_is_raised_even_when_meeting_the_other_processes_fails(
        tmp_path, monkeypatch):
    """wait() meets the other processes even after its own write failed; if that meeting
    fails too (a process gone), the write's error is still the one raised, the meeting's
    in a note."""
    from jaxckpt import orbax_io

    def failing_write(*args):
        raise OSError(28, "No space left on device")

    def lost_peer(tag):
        raise TimeoutError(f"barrier jaxckpt_{tag} timed out: process 1 never arrived")

    m = CheckpointManager(tmp_path, CheckpointPolicy(keep_latest=1))
    try:
        m.save(1, {"x": jnp.arange(10.0)})
        m.wait()
        with monkeypatch.context() as patch:
            patch.setattr(orbax_io, "save", failing_write)
            patch.setattr(orbax_io, "sync_processes", lost_peer)
            m.save(2, {"x": jnp.arange(10.0) + 1})
            with pytest.raises(jaxckpt.CheckpointWriteError,
                               match="No space left on device") as raised:
                m.wait()
        assert any("process 1 never arrived" in note for note in raised.value.__notes__)
        assert m.steps() == [1]
    finally:
        m.close()


def test_a_write_past_its_deadline_in_a_multi_process_job_points_at_every_log(
        tmp_path, monkeypatch):
    """In a multi-process job, a write that failed on one process leaves every process
    waiting at Orbax's commit barrier until the deadline: the error says so (seen with
    two real processes, one of them hitting a file-size limit)."""
    import threading

    from jaxckpt import orbax_io

    release = threading.Event()
    real_save = orbax_io.save

    def stuck(*args):
        release.wait(60)
        return real_save(*args)

    m = CheckpointManager(tmp_path, CheckpointPolicy(keep_latest=2), storage_timeout_s=0.5)
    try:
        m.save(1, {"x": jnp.arange(10.0)})
        m.wait()
        with monkeypatch.context() as patch:
            patch.setattr(orbax_io, "save", stuck)
            patch.setattr(orbax_io, "process_count", lambda: 2)
            m.save(2, {"x": jnp.arange(10.0) + 1})
            with pytest.raises(jaxckpt.CheckpointWriteError) as raised:
                m.wait()
        release.set()
        message = str(raised.value)
        assert "did not finish within" in message
        assert "another process" in message and "every process's log" in message
        assert f"{orbax_io.ASYNC_TIMEOUT_S / 60:.0f} min" in message
    finally:
        release.set()
        m.close()
    with CheckpointManager(tmp_path, read_only=True) as m:
        assert m.steps() == [1, 2] and m.verify() == {1: [], 2: []}


def test_a_closed_manager_refuses_a_with_block_and_every_call(tmp_path):
    m = CheckpointManager(tmp_path, CheckpointPolicy(keep_latest=1))
    m.save(1, {"x": jnp.arange(3.0)})
    m.close()
    m.close()  # twice is harmless
    with pytest.raises(RuntimeError, match="is closed; open a new one"):
        with m:
            raise AssertionError("the block ran")
    for call in (lambda: m.save(2, {"x": jnp.arange(3.0)}), m.wait, lambda: m.restore(1)):
        with pytest.raises(RuntimeError, match="is closed; open a new one"):
            call()


def test_reached_preemption_sees_sigterm_in_a_single_process(tmp_path):
    # Orbax's answer needs JAX's preemption sync point (jax.distributed): alone it is
    # always False, and the default SIGTERM action ended the run with nothing saved.
    code = textwrap.dedent(f"""
        import os, signal, jax.numpy as jnp, jaxckpt
        with jaxckpt.CheckpointManager({str(tmp_path)!r},
                                       jaxckpt.CheckpointPolicy(every_n_steps=1000)) as m:
            for step in range(1, 100):
                if step == 5:
                    os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would
                if m.reached_preemption(step):
                    m.save(step, {{"x": jnp.full(3, step)}}, force=True)
                    print("PREEMPTED AT", step)
                    break
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "PREEMPTED AT 5" in out.stdout
    with CheckpointManager(tmp_path, read_only=True) as m:
        assert m.steps() == [5] and np.array_equal(m.restore(5)["x"], np.full(3, 5))


def test_relative_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with CheckpointManager("runs/ckpt") as m:
        m.save(1, {"x": jnp.arange(3)})
    with CheckpointManager(tmp_path / "runs" / "ckpt", read_only=True) as m:
        assert m.steps() == [1] and np.array_equal(m.restore(1)["x"], np.arange(3))


@pytest.mark.parametrize("asks", [False, True])
def test_every_auto_saves_once_to_measure_then_spaces_saves(tmp_path, asks):
    """every="auto": one save measures the cost; then saves are spaced N > 1 steps apart.

    ``asks``: the loop asks should_save() each step and calls save() only when due (as
    fit does); the asking must time the steps and close the first save's window (without
    it, no save after the first was ever due). The loop runs at least 400 steps and on
    until the third save, up to 2,000 steps: N is the first save's cost over 5 % of a step, and that cost ranged from
    under 1 ms to 100 ms (two test workers on 2 cores; N then 400: a fixed 400 steps saw
    no second save)."""
    policy = CheckpointPolicy(every="auto", overhead_budget=0.05, keep_latest=100)
    x = jax.random.normal(jax.random.key(0), (200_000,))
    saved = []
    with CheckpointManager(tmp_path, policy) as m:
        for s in range(1, 2001):
            time.sleep(0.005)  # a "training step"; the assertions below are not timings
            if (not asks or m.should_save(s)) and m.save(s, {"x": x}):
                saved.append(s)
            if s >= 400 and len(saved) >= 3:
                break
        assert saved[0] == 1
        assert m.every_n_steps is not None and m.every_n_steps > 1
        assert 1 < len(saved) < s // 2, saved
        assert all(b - a > 1 for a, b in zip(saved, saved[1:]))


def test_the_constructor_takes_design_s_arguments_in_design_s_order(tmp_path):
    """DESIGN.md: CheckpointManager(directory, policy=..., async_save=True, read_only=False)."""
    with CheckpointManager(tmp_path, CheckpointPolicy(keep_latest=2), False) as m:
        m.save(1, {"x": jnp.ones(2)})
    with CheckpointManager(tmp_path, None, True, True) as reader:
        assert reader.steps() == [1]
        with pytest.raises(RuntimeError, match="opened read_only"):
            reader.save(2, {"x": jnp.ones(2)})


@pytest.mark.parametrize("fits", [True, False])
def test_a_local_restore_reads_its_files_ahead_and_arrays_a_window_at_a_time(
        tmp_path, monkeypatch, fits):
    """Every file of the state is read ahead (``WILLNEED``) when it fits in half the free
    memory, none otherwise; arrays larger than the read window are read all the same
    (Orbax refuses an array larger than its in-flight limit), bit for bit."""
    from etils import epath

    from jaxckpt import orbax_io

    monkeypatch.setattr(orbax_io, "_READ_WINDOW_BYTES", 1 << 20)
    monkeypatch.setattr(orbax_io, "_PLACED_AFTER_MAX_BYTES", 0)  # all through Orbax's read
    keys = jax.random.split(jax.random.key(0), 3)
    state = {"a": jax.random.normal(keys[0], (600_000,)),  # 2.3 MiB: over the window
             "b": jax.random.normal(keys[1], (400_000,)), "c": jnp.arange(10)}
    with CheckpointManager(tmp_path, CheckpointPolicy(keep_latest=1)) as m:
        m.save(1, state)
    advised = []
    fadvise, sysconf = os.posix_fadvise, os.sysconf
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, n, advice: (
        advised.append((os.readlink(f"/proc/self/fd/{fd}"), advice)),
        fadvise(fd, offset, n, advice))[1])
    if not fits:
        monkeypatch.setattr(os, "sysconf", lambda name: 16 if name == "SC_AVPHYS_PAGES"
                            else sysconf(name))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
    with CheckpointManager(tmp_path, read_only=True) as m:
        assert leaves_equal(m.restore(1, target=target), state)
    files = {str(p) for p in (tmp_path / "1" / "state").rglob("*") if p.is_file()}
    ahead = {path for path, advice in advised if advice == os.POSIX_FADV_WILLNEED}
    assert ahead == (files if fits else set())
    leaves = list(target.values())
    assert orbax_io._read_window(epath.Path("gs://bucket/run/1/state"), leaves) is None


def _saved_small_and_large(directory):
    """A state of a few small arrays, which jaxckpt reads itself, and one over
    ``_PLACED_AFTER_MAX_BYTES``, which Orbax reads; saved at step 1 in ``directory``."""
    keys = jax.random.split(jax.random.key(3), 3)
    state = {"w": jax.random.normal(keys[0], (300, 200)), "b": jnp.arange(7.0),
             "big": jax.random.normal(keys[1], (1_200_000,)),  # 4.6 MiB
             "h": jax.random.normal(keys[2], (64, 64)).astype(jnp.bfloat16)}
    with CheckpointManager(directory, CheckpointPolicy(keep_latest=1)) as m:
        m.save(1, state)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
    return state, target


def test_a_restore_leaves_no_reference_cycle_holding_its_arrays(tmp_path):
    """Dropped, a restore's arrays are freed at once, not whenever the garbage collector
    runs: a cycle through Orbax's read tasks (each task's context held the set of tasks)
    kept every array read alive, and each restore after it faulted in fresh memory."""
    import gc
    import weakref

    state, target = _saved_small_and_large(tmp_path)
    with CheckpointManager(tmp_path, read_only=True) as m:
        m.restore(1, target=target)  # Orbax's and jaxckpt's first-use caches filled
        gc.collect()
        gc.disable()
        try:
            out = m.restore(1, target=target)
            assert leaves_equal(out, state)
            refs = {k: weakref.ref(v) for k, v in out.items()}
            del out
            assert {k: r() is None for k, r in refs.items()} == dict.fromkeys(refs, True)
        finally:
            gc.enable()


def test_small_arrays_are_read_into_the_buffers_the_restored_arrays_own(tmp_path):
    """jaxckpt reads an array of up to ``_PLACED_AFTER_MAX_BYTES`` into an aligned host
    buffer that, on CPU, becomes the device array's own (no copy); such an array then
    donates to a jitted step like any other, without JAX's "donated buffers were not
    usable" warning."""
    import warnings

    from jaxckpt import orbax_io

    state, target = _saved_small_and_large(tmp_path)
    read = []
    real = orbax_io._read_aligned

    async def spy(info, arg):
        read.append((info.name, await real(info, arg)))
        return read[-1][1]

    with pytest.MonkeyPatch.context() as mp, \
            CheckpointManager(tmp_path, read_only=True) as m:
        mp.setattr(orbax_io, "_read_aligned", spy)
        out = m.restore(1, target=target)
    assert leaves_equal(out, state)
    assert sorted(name for name, _ in read) == ["b", "h", "w"]  # "big" went through Orbax
    for name, host in read:
        assert host.ctypes.data % 64 == 0
        if out[name].sharding.device_set.pop().platform == "cpu":  # elsewhere: a transfer
            assert out[name].unsafe_buffer_pointer() == host.ctypes.data, name
    step = jax.jit(lambda s: jax.tree.map(lambda x: x * 2, s), donate_argnums=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        doubled = jax.block_until_ready(step(out))
    assert leaves_equal(doubled, jax.tree.map(lambda x: x * 2, state))
    assert all(x.is_deleted() for x in jax.tree.leaves(out))


def _slow_removals(monkeypatch, events, release=None, pause_s=0.0):
    """Removals of replaced checkpoints that wait for ``release`` (or ``pause_s``) and
    record themselves in ``events``; writes of the state record themselves too."""
    from jaxckpt import orbax_io, storage

    remove, save = storage.remove_set_aside, orbax_io.save

    def slow_remove(aside):
        if release is not None:
            assert release.wait(60), "the test never released the removal"
        time.sleep(pause_s)
        remove(aside)
        events.append(f"removed {os.path.basename(aside).split('-')[2]}")

    def recorded_save(manager, step, *args, **kwargs):
        events.append(f"write {step}")
        return save(manager, step, *args, **kwargs)

    monkeypatch.setattr(storage, "remove_set_aside", slow_remove)
    monkeypatch.setattr(orbax_io, "save", recorded_save)


@pytest.mark.parametrize("async_save", [True, False])
def test_wait_returns_once_the_replaced_checkpoint_is_out_of_sight(tmp_path, monkeypatch,
                                                                   async_save):
    """wait() (and a synchronous save) returns when the directory holds what the policy
    keeps; freeing the replaced checkpoint's space goes on behind it, and close() waits
    for that. Here the removal is held until after wait() returned."""
    import threading

    events, release = [], threading.Event()
    _slow_removals(monkeypatch, events, release=release)
    m = CheckpointManager(tmp_path, CheckpointPolicy(keep_latest=1), async_save=async_save)
    m.save(1, {"x": np.arange(4.0)})
    m.save(2, {"x": np.arange(4.0) + 1})
    waiter = threading.Thread(target=m.wait)
    waiter.start()
    waiter.join(30)
    try:
        assert not waiter.is_alive(), "wait() waited for the removal of checkpoint 1"
        assert m.steps() == [2] and "removed 1" not in events
        names = os.listdir(tmp_path)
        assert "1" not in names and any(n.startswith(".jaxckpt-deleting-1-") for n in names)
        with CheckpointManager(tmp_path, read_only=True) as reader:
            assert reader.steps() == [2]
    finally:
        release.set()
    m.close()
    assert events[-1] == "removed 1"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".jaxckpt-deleting")]
    with CheckpointManager(tmp_path, read_only=True) as reader:
        np.testing.assert_array_equal(reader.restore()["x"], np.arange(4.0) + 1)


@pytest.mark.parametrize("async_save", [True, False])
def test_wait_reclaimed_returns_once_the_replaced_checkpoint_s_files_are_gone(
        tmp_path, monkeypatch, async_save):
    """A benchmark measuring a save's CPU (or a script reading the disk's free space)
    waits for the removal too, with the public API rather than polling the directory."""
    events = []
    _slow_removals(monkeypatch, events, pause_s=0.3)
    with CheckpointManager(tmp_path, CheckpointPolicy(keep_latest=1),
                           async_save=async_save) as m:
        m.save(1, {"x": np.arange(4.0)})
        m.save(2, {"x": np.arange(4.0) + 1})
        m.wait(reclaimed=True)
        assert events[-1] == "removed 1", events
        assert sorted(n for n in os.listdir(tmp_path) if n[0].isdigit() or
                      n.startswith(".jaxckpt-deleting")) == ["2"]
        with pytest.raises(TypeError, match="reclaimed must be True or False"):
            m.wait(reclaimed="yes")


def test_the_next_write_starts_once_the_replaced_checkpoint_is_removed(tmp_path,
                                                                       monkeypatch):
    """Freeing space runs behind wait(), never behind the next write: a run on a nearly
    full disk has the replaced checkpoint's space back before it writes the next one."""
    events = []
    _slow_removals(monkeypatch, events, pause_s=0.5)
    with CheckpointManager(tmp_path, CheckpointPolicy(keep_latest=1)) as m:
        for step in (1, 2, 3):
            m.save(step, {"x": np.full(4, float(step))})
            m.wait()
    assert events == ["write 1", "write 2", "removed 1", "write 3", "removed 2"], events
