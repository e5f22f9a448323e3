"""Two real JAX processes (2 CPU devices each, 4 global, gloo collectives) train an MLP
with FSDP-sharded parameters and optimizer state and checkpoint it. Both are killed with
SIGKILL mid-run (right after an async save started), restarted, and resume; the run ends
bit for bit where an uninterrupted two-process run ends. The checkpoint then restores in
this single process: on one device, without and with a target, and onto a 1x4 FSDP mesh.

This file is also the worker script: ``python test_multiprocess.py PROCESS_ID PORT DIR MODE``.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import json  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxckpt  # noqa: E402
from jaxckpt import parallel as par  # noqa: E402

STEPS, EVERY, KILL_AFTER = 12, 3, 9
CHURN_SAVES, CHURN_INNER = 20, 5  # mode "churn": every save deletes the previous one
FIT_EPOCHS, FIT_EVERY = 3, 7  # mode "fit": Trainer.fit on the embedded digits
BATCH, FEATURES, HIDDEN, CLASSES = 16, 8, 32, 4
TX = optax.adam(1e-2)  # one instance: states built twice must have equal static fields


def fresh_state():
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"dense": {"kernel": jax.random.normal(k1, (FEATURES, HIDDEN)) * 0.3,
                        "bias": jnp.zeros((HIDDEN,))},
              "out": {"kernel": jax.random.normal(k2, (HIDDEN, CLASSES)) * 0.3,
                      "bias": jnp.zeros((CLASSES,))}}
    return jaxckpt.TrainState.create(params=params, tx=TX, rng=3)


def loss_fn(params, batch, rng, state):
    h = jax.nn.relu(batch["x"] @ params["dense"]["kernel"] + params["dense"]["bias"])
    h = h * jax.random.bernoulli(rng, 0.9, h.shape) / 0.9  # dropout: uses the step's key
    logits = h @ params["out"]["kernel"] + params["out"]["bias"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    return loss, {"accuracy": (logits.argmax(-1) == batch["y"]).mean()}


def batch(i):
    data = np.random.default_rng(i)
    return {"x": data.normal(size=(BATCH, FEATURES)).astype(np.float32),
            "y": data.integers(0, CLASSES, size=BATCH).astype(np.int32)}


def _worker(process_id: int, port: int, directory: str, mode: str) -> None:
    """Train STEPS steps from the latest checkpoint in ``directory`` (if any), saving every
    EVERY steps. ``mode="killed"``: after save(KILL_AFTER) returns, report and wait to die.
    ``mode="churn"``: CHURN_SAVES saves, each after CHURN_INNER steps, keeping only one."""
    assert par.initialize_distributed(f"127.0.0.1:{port}", 2, process_id)
    mesh = par.make_mesh(data=2, fsdp=2)
    shardings = par.state_sharding(jax.eval_shape(fresh_state), mesh)
    step_fn = par.make_train_step(loss_fn, mesh, shardings)
    rows = slice(process_id * BATCH // 2, (process_id + 1) * BATCH // 2)
    if mode == "churn":
        _churn(mesh, step_fn, rows, directory)
        return
    if mode == "fit":
        _fit(directory)
        return
    if mode == "wait":
        _wait(process_id, mesh, step_fn, rows, directory)
        return
    if mode.startswith("clock:"):
        _clock(process_id, mesh, step_fn, rows, directory, mode.split(":", 1)[1])
        return
    if mode == "metrics":
        _metrics(process_id, mesh, step_fn, rows, directory, shardings)
        return
    if mode == "unshared":  # each process its own directory, as on per-host disks
        try:
            jaxckpt.CheckpointManager(f"{directory}-p{process_id}",
                                      jaxckpt.CheckpointPolicy(keep_latest=1))
        except jaxckpt.CheckpointDirectoryError as e:
            print(f"REFUSED {e}", flush=True)
        return
    policy = jaxckpt.CheckpointPolicy(every_n_steps=EVERY, keep_latest=2)
    with jaxckpt.CheckpointManager(directory, policy) as mngr:
        start = 0
        if mngr.latest_step() is not None:
            target = par.abstract_state(jax.eval_shape(fresh_state), shardings)
            ckpt = mngr.restore_checkpoint("latest", target=target)
            state, start = ckpt.state, ckpt.data_state["next_batch"]
            print(f"RESUMED {ckpt.step}", flush=True)
        else:
            state = par.shard_state(fresh_state(), mesh)
        for i in range(start, STEPS):
            local = {k: v[rows] for k, v in batch(i).items()}
            state, metrics = step_fn(state, par.shard_batch(local, mesh))
            mngr.save(i + 1, state, metrics={"loss": float(metrics["loss"])},
                      data_state={"next_batch": i + 1})
            if mode == "killed" and i + 1 == KILL_AFTER - 1:
                print(f"AT {i + 1}", flush=True)
                sys.stdin.readline()  # the test looks at the lock while the job lives
            if mode == "killed" and i + 1 == KILL_AFTER:
                print(f"AT {i + 1}", flush=True)  # its async write is under way: kill me now
                time.sleep(600)
    print("DONE", flush=True)


def _churn(mesh, step_fn, rows, directory):
    """Each save's commit deletes the checkpoint before it while this thread trains on."""
    state = par.shard_state(fresh_state(), mesh)
    policy = jaxckpt.CheckpointPolicy(every_n_steps=1, keep_latest=1)
    with jaxckpt.CheckpointManager(directory, policy) as mngr:
        for i in range(CHURN_SAVES):
            for j in range(CHURN_INNER):  # collectives, while the previous save commits
                local = {k: v[rows] for k, v in batch(i * CHURN_INNER + j).items()}
                state, metrics = step_fn(state, par.shard_batch(local, mesh))
            mngr.save(i + 1, state, metrics={"loss": float(metrics["loss"])})
    print("DONE", flush=True)


def _wait(process_id, mesh, step_fn, rows, directory):
    """Three saves keeping one, then wait(), then what this process sees on disk. The
    primary writes each manifest (and deletes what it replaced) after Orbax's commit,
    here slowly: a process whose wait() returned before that saw the newest checkpoint
    without its manifest and the one it replaced still there."""
    if process_id == 0:
        write = jaxckpt.integrity.write_manifest

        def slow_write(*args, **kwargs):
            time.sleep(1.0)
            return write(*args, **kwargs)
        jaxckpt.integrity.write_manifest = slow_write
    state = par.shard_state(fresh_state(), mesh)
    policy = jaxckpt.CheckpointPolicy(every_n_steps=1, keep_latest=1)
    with jaxckpt.CheckpointManager(directory, policy) as mngr:
        for i in range(3):
            local = {k: v[rows] for k, v in batch(i).items()}
            state, metrics = step_fn(state, par.shard_batch(local, mesh))
            mngr.save(i + 1, state, metrics={"loss": float(metrics["loss"])})
        mngr.wait()
        steps = sorted(p for p in os.listdir(directory) if p.isdigit())
        manifest = os.path.exists(os.path.join(directory, "3", jaxckpt.integrity.MANIFEST_FILE))
        print("SEEN " + json.dumps({"steps": steps, "manifest": manifest}), flush=True)
    print("DONE", flush=True)


CLOCK_STEPS = 24


def _clock(process_id, mesh, step_fn, rows, directory, schedule):
    """A policy that reads the clock, and process 1's clock runs 1.6x fast: each process
    deciding by its own clock saved different steps, and both waited at Orbax's commit.
    ``schedule`` "seconds": every_seconds (and keep_time_interval); "auto": every="auto"
    (the step time each process measures differs as well). Prints the steps saved."""
    t0 = time.time()
    clock = (lambda: t0 + 1.6 * (time.time() - t0)) if process_id == 1 else time.time
    state = par.shard_state(fresh_state(), mesh)
    if schedule == "seconds":
        policy = jaxckpt.CheckpointPolicy(every_seconds=0.3, keep_latest=1, keep_time_interval=0.9)
    else:
        policy = jaxckpt.CheckpointPolicy(every="auto", overhead_budget=0.9, keep_latest=1)
    saved = []
    with jaxckpt.CheckpointManager(directory, policy, clock=clock) as mngr:
        for i in range(CLOCK_STEPS):
            local = {k: v[rows] for k, v in batch(i).items()}
            state, metrics = step_fn(state, par.shard_batch(local, mesh))
            jax.block_until_ready(state)
            time.sleep(0.05 * (1 + process_id))  # process 1 spends longer on the host
            if mngr.save(i + 1, state, metrics={"loss": float(metrics["loss"])}):
                saved.append(i + 1)
        mngr.wait()
        kept = mngr.steps()
    print("SAVED " + json.dumps({"saved": saved, "kept": kept}), flush=True)
    print("DONE", flush=True)


def _metrics(process_id, mesh, step_fn, rows, directory, shardings):
    """Each process passes its own val_loss (a loss of its own shard, not averaged):
    process 0's falls, process 1's rises. Deciding alone, one process saved a step the
    other did not (a hang), or each ranked another step best."""
    state = par.shard_state(fresh_state(), mesh)
    policy = jaxckpt.CheckpointPolicy(monitor="val_loss", keep_best=1, keep_latest=1,
                                      every_n_steps=4)
    saved = []
    with jaxckpt.CheckpointManager(directory, policy) as mngr:
        for i in range(12):
            local = {k: v[rows] for k, v in batch(i).items()}
            state, _ = step_fn(state, par.shard_batch(local, mesh))
            val_loss = 1.0 / (i + 1) if process_id == 0 else float(i)
            if mngr.save(i + 1, state, metrics={"val_loss": val_loss}):
                saved.append(i + 1)
        mngr.wait()
        target = par.abstract_state(jax.eval_shape(fresh_state), shardings)
        best = mngr.restore_checkpoint("best", target=target).step
        print("SAVED " + json.dumps({"saved": saved, "kept": mngr.steps(), "best": best}),
              flush=True)
    print("DONE", flush=True)


def _fit(directory):
    """Trainer.fit over both processes (each reads its half of every batch); SIGTERM to
    either process stops both at one step. The digits' TFDS dir is $JAXCKPT_DATA_DIR."""
    from jaxckpt import data
    from _util import MLP

    ds = data.load_tfds("sklearn_digits", "train", data_dir=os.environ["JAXCKPT_DATA_DIR"])
    ds = ds.map(data.normalize)
    splits = data.split_dataset(ds, (0.7, 0.15, 0.15), seed=0)
    policy = jaxckpt.CheckpointPolicy(monitor="val_loss", keep_best=1, keep_latest=1,
                                      every_n_steps=FIT_EVERY)
    jaxckpt.Trainer(MLP(), optax.adam(1e-3), quiet=True).fit(
        splits["train"], splits["validation"], epochs=FIT_EPOCHS, batch_size=64,
        checkpoint=directory, policy=policy, seed=0)
    print("DONE", flush=True)


# -- the test ------------------------------------------------------------------------------------


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(directory, mode, **env_vars):
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu", **env_vars}
    return [subprocess.Popen([sys.executable, __file__, str(i), str(port), str(directory), mode],
                             env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
            for i in range(2)]


def _finish(procs, timeout=120):
    """Each process's (stdout, stderr), once all exited successfully."""
    outs = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, stderr[-4000:]
            outs.append((stdout, stderr))
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate()
    return outs


def _wait_for(proc, line, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = proc.stdout.readline()
        if got.strip() == line:
            return
        if not got:
            break
    proc.kill()
    raise AssertionError(f"worker never printed {line!r}: {proc.stderr.read()[-4000:]}")


def _bitwise_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.asarray(x).dtype == np.asarray(y).dtype and
        np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 2-process run and one killed at step 9 and resumed; both dirs."""
    if jax.device_count() < 4:
        raise RuntimeError("needs XLA_FLAGS=--xla_force_host_platform_device_count=4")
    whole, broken = tmp_path_factory.mktemp("whole"), tmp_path_factory.mktemp("broken")
    reference = _launch(whole, "whole")  # runs alongside the killed pair
    killed = _launch(broken, "killed")
    try:
        for proc in killed:
            _wait_for(proc, f"AT {KILL_AFTER - 1}")
        # While the job lives: process 0 alone holds the lock, and nobody else may write.
        owner = json.loads((broken / "jaxckpt.lock").read_text())
        assert owner["pid"] == killed[0].pid
        with pytest.raises(jaxckpt.DirectoryLockedError, match=f"pid {killed[0].pid}"):
            jaxckpt.CheckpointManager(broken)
        for proc in killed:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        _wait_for(killed[0], f"AT {KILL_AFTER}")
    finally:
        for proc in killed:
            proc.send_signal(signal.SIGKILL)
        for proc in killed:
            proc.communicate()
    step_9_committed = (broken / str(KILL_AFTER)).exists()
    assert step_9_committed or list(broken.glob(f"{KILL_AFTER}.orbax-checkpoint-tmp*"))
    resumed = _launch(broken, "resume")
    outs = _finish(resumed) + _finish(reference)
    assert all(out.strip().endswith("DONE") for out, _ in outs)
    restarted_from = int(outs[0][0].split("RESUMED ")[1].split()[0])
    assert restarted_from == (KILL_AFTER if step_9_committed else KILL_AFTER - EVERY)
    assert f"stale lock {broken / 'jaxckpt.lock'}" in outs[0][1]  # the dead job's lock
    assert f"pid {killed[0].pid}" in outs[0][1]
    print(f"killed during the write of step {KILL_AFTER}; resumed from step {restarted_from}")
    return whole, broken


def test_killed_and_resumed_run_ends_bitwise_equal(runs):
    whole, broken = runs
    with jaxckpt.CheckpointManager(whole, read_only=True) as a, \
            jaxckpt.CheckpointManager(broken, read_only=True) as b:
        assert a.steps() == b.steps() == [9, 12]
        assert a.verify() == b.verify() == {9: [], 12: []}  # manifests cover both processes
        assert any("ocdbt.process_1" in p for p in
                   json.loads((broken / "12" / "jaxckpt_manifest.json").read_text())["files"])
        assert _bitwise_equal(a.restore(12), b.restore(12))
        assert a.history() == b.history()  # the same losses, step by step, bit for bit
        assert [h["step"] for h in b.history()] == list(range(1, STEPS + 1))
        assert b.restore_data_state(12) == {"next_batch": STEPS}
    assert not (broken / "jaxckpt.lock").exists()  # the resumed job took it over, released it
    assert not list(broken.glob("*.orbax-checkpoint-tmp*"))


def test_restores_in_one_process_on_one_device_and_on_another_mesh(runs):
    whole, _ = runs
    with jaxckpt.CheckpointManager(whole, read_only=True) as m:
        plain = m.restore(12)  # numpy, whatever wrote it
        assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(plain))
        one = m.restore(12, target=fresh_state())  # one device, in the target's containers
        assert isinstance(one, jaxckpt.TrainState) and int(one.step) == STEPS
        assert all(len(x.devices()) == 1 for x in jax.tree.leaves(one))
        assert _bitwise_equal(one.checkpoint_tree(), plain)
        mesh = par.make_mesh(data=1, fsdp=4)
        shapes = jax.eval_shape(fresh_state)
        target = par.abstract_state(shapes, par.state_sharding(shapes, mesh))
        wide = m.restore(12, target=target)
    kernel = wide.params["dense"]["kernel"]
    assert kernel.sharding.spec == P(None, "fsdp") and len(kernel.devices()) == 4
    assert kernel.addressable_shards[0].data.shape == (FEATURES, HIDDEN // 4)
    assert _bitwise_equal(wide, one)
    # And it trains on: one more step on the 1x4 mesh equals one more step on one device.
    step4 = par.make_train_step(loss_fn, mesh, par.state_sharding(shapes, mesh), donate=False)
    step1 = par.make_train_step(loss_fn, par.make_mesh(data=1), par.state_sharding(
        shapes, par.make_mesh(data=1)), donate=False)
    b = batch(STEPS)
    after4, _ = step4(wide, par.shard_batch(b, mesh))
    after1, _ = step1(par.shard_state(one, par.make_mesh(data=1)),
                      par.shard_batch(b, par.make_mesh(data=1)))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                 jax.device_get(after4.params), jax.device_get(after1.params))


def test_deleting_while_training_does_not_deadlock(tmp_path):
    """Orbax's delete() ends in a device-collective barrier; run from the background
    commit it interleaved with the train step's collectives differently on each process
    and hung the job (at the second save, on a 2-core machine). Deletions now wait for
    the calling thread, where both processes make the same calls in the same order."""
    outs = _finish(_launch(tmp_path, "churn"))  # a hang: fails on timeout
    assert all(out.strip().endswith("DONE") for out, _ in outs)
    with jaxckpt.CheckpointManager(tmp_path, read_only=True) as mngr:
        assert mngr.steps() == [CHURN_SAVES]
        assert [h["step"] for h in mngr.history()] == list(range(1, CHURN_SAVES + 1))
        assert mngr.verify() == {CHURN_SAVES: []}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == [str(CHURN_SAVES)]


def test_wait_returns_on_every_process_once_the_primary_has_committed(tmp_path):
    outs = _finish(_launch(tmp_path, "wait"))
    for stdout, _ in outs:
        seen = json.loads(stdout.split("SEEN ", 1)[1].splitlines()[0])
        assert seen == {"steps": ["3"], "manifest": True}
    with jaxckpt.CheckpointManager(tmp_path, read_only=True) as mngr:
        assert mngr.steps() == [3] and mngr.verify() == {3: []}


@pytest.mark.parametrize("schedule", ["seconds", "auto"])
def test_a_policy_that_reads_the_clock_saves_the_same_steps_on_every_process(tmp_path,
                                                                             schedule):
    """every_seconds, keep_time_interval and every="auto" decide by time; the processes'
    clocks (and measured step times) differ, and each deciding alone hung the job. Every
    process now takes process 0's decision: the same steps saved and kept everywhere."""
    outs = _finish(_launch(tmp_path, f"clock:{schedule}"))  # a hang: fails on timeout
    seen = [json.loads(out.split("SAVED ", 1)[1].splitlines()[0]) for out, _ in outs]
    assert seen[0] == seen[1], seen
    assert len(seen[0]["saved"]) >= 3
    with jaxckpt.CheckpointManager(tmp_path, read_only=True) as mngr:
        assert mngr.steps() == seen[0]["kept"]
        assert all(not problems for problems in mngr.verify().values())


def test_metrics_that_differ_between_processes_are_process_0s_everywhere(tmp_path):
    outs = _finish(_launch(tmp_path, "metrics"))  # a hang: fails on timeout
    seen = [json.loads(out.split("SAVED ", 1)[1].splitlines()[0]) for out, _ in outs]
    assert seen[0] == seen[1], seen
    assert seen[0]["best"] == 12 and seen[0]["kept"] == [12]  # process 0's falling loss
    assert "every process must pass the same metrics" in outs[1][1]
    assert "every process must pass the same metrics" not in outs[0][1]
    with jaxckpt.CheckpointManager(tmp_path, read_only=True) as mngr:
        assert mngr.verify() == {12: []}


def test_a_directory_the_processes_do_not_share_is_refused_on_every_process(tmp_path):
    """Per-host disks: each process saw its own directory, every save "succeeded", and no
    checkpoint could be restored (each held one process's shards)."""
    outs = _finish(_launch(tmp_path / "ckpt", "unshared"))  # a hang: fails on timeout
    for out, _ in outs:
        assert "REFUSED process(es) [1] do not see the lock file process 0 wrote" in out, out
        assert "shared file system" in out
    assert not (tmp_path / "ckpt-p0" / "jaxckpt.lock").exists()  # released


def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes_bitwise(
        tmp_path, digits_dir):
    """A preempted multi-process job: SIGTERM reaches process 1 only. Both processes agree
    on the step (an allgather of the flag after each step), save it together, exit 0; the
    job restarted with the same command ends bit for bit where an uninterrupted job ends."""
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    env = {"JAXCKPT_DATA_DIR": str(digits_dir)}
    reference = _launch(whole, "fit", **env)
    signalled = _launch(broken, "fit", **env)
    deadline = time.monotonic() + 180
    while not any(p.name.isdigit() for p in broken.glob("*")):
        assert time.monotonic() < deadline and all(p.poll() is None for p in signalled), \
            "no checkpoint from the job to be signalled"
        time.sleep(0.05)
    signalled[1].send_signal(signal.SIGTERM)
    (out0, _), (out1, _) = _finish(signalled)
    assert "DONE" not in out0 + out1, "the job finished before SIGTERM arrived"
    stopped_at = int(out0.split("SIGTERM: saved checkpoint at step ")[1].split()[0])
    resumed = _finish(_launch(broken, "fit", **env))
    assert f"resumed from checkpoint step {stopped_at}" in resumed[0][0]
    outs = resumed + _finish(reference)
    assert all(out.strip().endswith("DONE") for out, _ in outs)
    with jaxckpt.CheckpointManager(whole, read_only=True) as a, \
            jaxckpt.CheckpointManager(broken, read_only=True) as b:
        assert stopped_at in [e["step"] for e in b.entries() if e["saved"]]
        assert a.steps() == b.steps() and a.latest_step() == b.latest_step()
        assert a.verify() == b.verify() == {s: [] for s in a.steps()}
        assert _bitwise_equal(a.restore("latest"), b.restore("latest"))
        assert a.history() == b.history()
        rows = [_epoch_rows(m.restore_data_state("latest")) for m in (a, b)]
        assert rows[0] == rows[1] and len(rows[0]) == FIT_EPOCHS


def _epoch_rows(loop_state):
    """The Trainer's per-epoch rows without their wall-clock times."""
    return [{k: v for k, v in row.items() if k != "time"}
            for row in loop_state["history"]["rows"]]


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
