"""jaxckpt on ``gs://`` for real, against a local GCS emulator (the ``gcs`` fixture in
conftest.py: fake-gcs-server on 127.0.0.1, nothing beyond it).

Array data goes through Orbax/tensorstore's GCS driver, jaxckpt's own files (history,
manifests, lock) through etils epath (gcsfs). What is in the bucket is checked with the
emulator's own object listing, independent of both clients. On gs:// Orbax writes a step in
place and marks it complete with ``<step>/commit_success.txt``, written last; a step without
it is never taken for a checkpoint.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid

import jax
import numpy as np
import optax
import pytest

import jaxckpt
from jaxckpt import CheckpointManager, CheckpointPolicy, data
from jaxckpt import parallel as par
from jaxckpt.cli import main as cli
from _util import (KILLED_WRITER, MLP, init_state, leaves_equal, run_tutorial,
                   train_step)



# -- helpers --------------------------------------------------------------------------------


def unique(name: str) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_-]+', '-', name)[:40]}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def gs_dir(gcs, request):
    """A fresh ``gs://`` checkpoint directory and its object-name prefix."""
    prefix = unique(request.node.name)
    return gcs.gs(prefix), prefix


def top_level(gcs, prefix: str) -> set[str]:
    """Names directly under ``prefix/`` in the bucket (step directories, files)."""
    return {name[len(prefix) + 1:].split("/")[0] for name in gcs.list_objects(prefix + "/")}


def object_sizes(gcs, prefix: str) -> dict[str, int]:
    """Object name -> size, listed with google-cloud-storage (not gcsfs, not tensorstore)."""
    from google.cloud import storage

    client = storage.Client()
    return {b.name: b.size for b in client.list_blobs(gcs.bucket, prefix=prefix)}


@pytest.fixture(scope="module")
def tutorial(gcs):
    """The tutorial run, saved asynchronously to gs://: (url, prefix, states by epoch)."""
    prefix = unique("tutorial")
    directory = gcs.gs(prefix)
    return directory, prefix, run_tutorial(directory)


# -- the tutorial's run on gs:// ----------------------------------------------------------------


def test_tutorial_keeps_best_45_and_latest_50_all_others_deleted_from_the_bucket(gcs, tutorial):
    directory, prefix, _ = tutorial
    objects = gcs.list_objects(prefix + "/")
    # The other 48 steps are gone; the lock went with close(); nothing half-written is left.
    assert top_level(gcs, prefix) == {"45", "50", "jaxckpt.json"}
    for step in (45, 50):
        for name in ("commit_success.txt", "jaxckpt_manifest.json", "state/commit_success.txt",
                     "meta/metadata", "data_state/metadata"):
            assert f"{prefix}/{step}/{name}" in objects
        assert any(o.startswith(f"{prefix}/{step}/state/") and "/d/" in o for o in objects)
    assert not [o for o in objects if o.endswith(".tmp") or "orbax-checkpoint-tmp" in o]

    with CheckpointManager(directory, read_only=True) as mngr:
        assert (mngr.best_step(), mngr.latest_step(), mngr.steps()) == (45, 50, [45, 50])
        assert {s: [str(r) for r in rs] for s, rs in mngr.kept_reasons().items()} == {45: ["best #1"], 50: ["latest"]}
        history = mngr.history()
        assert [h["step"] for h in history] == list(range(1, 51))
        assert history[44] == {"step": 45, "metrics": {"val_loss": 0.61, "loss": 0.61 + 0.1}}
        assert mngr.verify() == {45: [], 50: []}  # every object against its manifest
    assert gcs.list_objects(prefix + "/") == objects  # a reader writes nothing


def test_restore_best_and_latest_with_and_without_target(tutorial):
    directory, _, states = tutorial
    with CheckpointManager(directory, read_only=True) as mngr:
        best = mngr.restore("best", target=init_state())
        assert int(best.step) == 45
        assert leaves_equal(best.params, states[45].params)
        assert leaves_equal(best.opt_state, states[45].opt_state)
        assert leaves_equal(best.rng, states[45].rng)

        latest = mngr.restore("latest")  # no target: plain numpy in nested dicts
        assert isinstance(latest["params"]["dense"]["kernel"], np.ndarray)
        assert leaves_equal(latest["params"], states[50].params)
        assert int(latest["step"]) == 50

        # An abstract target with FSDP shardings over the 4 devices: placed like the target.
        mesh = par.make_mesh(fsdp=4)
        shapes = jax.eval_shape(init_state)
        target = par.abstract_state(shapes, par.state_sharding(shapes, mesh))
        sharded = mngr.restore("latest", target=target)
        kernel = sharded.params["dense"]["kernel"]
        assert kernel.sharding == target.params["dense"]["kernel"].sharding
        assert len(kernel.sharding.device_set) == 4
        assert leaves_equal(sharded.params, states[50].params)

        ckpt = mngr.restore_checkpoint("best")
        assert (ckpt.step, ckpt.epoch, ckpt.data_state) == (45, 45, {"epoch": 45})
        assert ckpt.metrics == {"val_loss": 0.61, "loss": 0.61 + 0.1}
        assert mngr.restore_data_state("latest") == {"epoch": 50}


REOPEN = """
    import json, sys, numpy as np, jaxckpt
    with jaxckpt.CheckpointManager(sys.argv[1], read_only=True) as m:
        best = m.restore("best")
        print(json.dumps({
            "best": m.best_step(), "latest": m.latest_step(), "steps": m.steps(),
            "history": m.history(), "verify": {str(k): v for k, v in m.verify().items()},
            "kernel": np.asarray(best["params"]["dense"]["kernel"]).tobytes().hex()}))
"""


def test_reopen_in_a_new_process_sees_the_same_checkpoints(tutorial):
    directory, _, states = tutorial
    # The child finds the emulator through the environment it inherits, nothing else.
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(REOPEN), directory],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-4000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    with CheckpointManager(directory, read_only=True) as mngr:
        assert seen["history"] == mngr.history()
        assert (seen["best"], seen["latest"], seen["steps"]) == (
            mngr.best_step(), mngr.latest_step(), mngr.steps()) == (45, 50, [45, 50])
    assert seen["verify"] == {"45": [], "50": []}
    assert bytes.fromhex(seen["kernel"]) == np.asarray(
        states[45].params["dense"]["kernel"]).tobytes()


def test_a_reader_in_a_long_lived_process_sees_steps_written_since(gs_dir):
    """gcsfs caches listings per process; a manager opened later must not be served them."""
    directory, _ = gs_dir
    writer = textwrap.dedent("""
        import sys, numpy as np, jaxckpt
        with jaxckpt.CheckpointManager(sys.argv[1], jaxckpt.CheckpointPolicy(keep_latest=5)) as m:
            m.save(int(sys.argv[2]), {"x": np.full(3, float(sys.argv[2]))}, metrics={"a": 1.0})
    """)
    for step in (1, 2):
        out = subprocess.run([sys.executable, "-c", writer, directory, str(step)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-4000:]
        with CheckpointManager(directory, read_only=True) as mngr:  # this process, again
            assert mngr.steps() == list(range(1, step + 1))
            assert [h["step"] for h in mngr.history()] == list(range(1, step + 1))
            assert mngr.restore("latest")["x"].tolist() == [float(step)] * 3


# -- async save -------------------------------------------------------------------------------


def test_async_save_commits_in_the_background_what_was_saved(gcs, gs_dir):
    directory, prefix = gs_dir
    state, saved = init_state(), {}
    mngr = CheckpointManager(directory, CheckpointPolicy(keep_latest=2), async_save=True)
    for step in range(1, 4):
        state = train_step(state)
        saved[step] = jax.device_get(state)
        assert mngr.save(step, state)
        assert mngr.steps()[-1] == step  # in flight: known before its commit
        state = train_step(state)  # training goes on while the write runs
    mngr.wait()
    objects = gcs.list_objects(prefix + "/")
    assert top_level(gcs, prefix) == {"2", "3", "jaxckpt.json", "jaxckpt.lock"}
    assert f"{prefix}/3/commit_success.txt" in objects
    for step in (2, 3):  # the state as it was at save(), not as training changed it after
        assert leaves_equal(mngr.restore(step, target=init_state()), saved[step])
    mngr.close()
    assert top_level(gcs, prefix) == {"2", "3", "jaxckpt.json"}


def test_a_step_name_taken_by_objects_jaxckpt_did_not_write_is_refused_and_left_alone(gcs,
                                                                                     gs_dir):
    """Orbax's save deletes whatever is at the step name on a store, silently: jaxckpt
    refuses the step instead, as it does on a disk, and names the fix."""
    from google.cloud import storage

    directory, prefix = gs_dir
    bucket = storage.Client().bucket(gcs.bucket)
    with CheckpointManager(directory, CheckpointPolicy(keep_latest=3)) as mngr:
        mngr.save(5, {"x": np.arange(4.0)})
        mngr.wait()
        # Put there after the open (which removes incomplete steps), by another client.
        bucket.blob(f"{prefix}/7/notes.txt").upload_from_string(b"not a checkpoint\n")
        bucket.blob(f"{prefix}/9").upload_from_string(b"a file\n")
        for step, what in ((7, "objects that are not a checkpoint"), (9, "an object")):
            with pytest.raises(jaxckpt.CheckpointWriteError,
                               match=f"save\\(step={step}\\): gs://.*/{step} already exists, "
                                     f"{what}.*move it away or delete it") as e:
                mngr.save(step, {"x": np.arange(4.0) * step})
                mngr.wait()
            assert "every checkpoint is intact ([5])" in str(e.value)
        mngr.save(10, {"x": np.arange(4.0) * 10})
        mngr.wait()
        assert mngr.steps() == [5, 10]
        assert [e["step"] for e in mngr.entries() if e["saved"]] == [5, 10]
    assert object_text(gcs, f"{prefix}/7/notes.txt") == "not a checkpoint\n"
    assert object_text(gcs, f"{prefix}/9") == "a file\n"
    assert gcs.list_objects(f"{prefix}/7/") == [f"{prefix}/7/notes.txt"]
    with CheckpointManager(directory, read_only=True) as mngr:
        assert mngr.steps() == [5, 10] and mngr.verify() == {5: [], 10: []}


# -- the CLI on the bucket ---------------------------------------------------------------------


def test_cli_ls_best_verify_on_the_bucket(gcs, tutorial, capsys):
    directory, prefix, _ = tutorial
    before = gcs.list_objects(prefix + "/")
    assert cli(["ls", "--json", directory]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert (listing["best_step"], listing["latest_step"]) == (45, 50)
    rows = {r["step"]: r for r in listing["checkpoints"]}
    assert sorted(rows) == [45, 50]
    assert rows[45]["kept"] == ["best #1"] and rows[50]["kept"] == ["latest"]
    assert rows[45]["integrity"] == rows[50]["integrity"] == "ok"
    sizes = object_sizes(gcs, prefix + "/")
    for step in (45, 50):  # size on "disk" = the step's objects in the bucket
        assert rows[step]["bytes"] == sum(v for k, v in sizes.items()
                                          if k.startswith(f"{prefix}/{step}/"))

    assert cli(["ls", directory]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"{directory}: 2 checkpoints, monitor val_loss (min), best 45")
    assert re.search(r"^\s*45\s+45\s.*best #1.*ok\s+<- best$", text, re.M), text
    assert re.search(r"^\s*50\s+50\s.*latest.*ok\s+<- latest$", text, re.M), text

    assert cli(["best", "--json", directory]) == 0
    best = json.loads(capsys.readouterr().out)
    assert (best["step"], best["epoch"], best["metrics"]["val_loss"]) == (45, 45, 0.61)

    assert cli(["verify", directory]) == 0
    assert capsys.readouterr().out.splitlines() == ["step 45: ok", "step 50: ok",
                                                    "2 checkpoint(s) ok"]
    assert gcs.list_objects(prefix + "/") == before  # read-only commands write nothing


def test_corrupt_object_is_named_skipped_and_moved_aside(gcs, gs_dir, capsys):
    directory, prefix = gs_dir
    values = {s: np.arange(1000.0) * s for s in (1, 2)}
    with CheckpointManager(directory, CheckpointPolicy(keep_latest=2)) as mngr:
        for step, x in values.items():
            mngr.save(step, {"x": x})
    # Change bytes of one array object of step 2 behind jaxckpt's back (same size).
    from google.cloud import storage

    bucket = storage.Client().bucket(gcs.bucket)
    victim = next(o for o in gcs.list_objects(f"{prefix}/2/state/") if "/d/" in o)
    blob = bucket.blob(victim)
    payload = bytearray(blob.download_as_bytes())
    payload[len(payload) // 2] ^= 0xFF
    bucket.blob(victim).upload_from_string(bytes(payload))
    rel = victim[len(f"{prefix}/2/"):]

    assert cli(["verify", directory]) == 1
    out, err = capsys.readouterr()
    assert "step 1: ok" in out
    assert f"step 2: CORRUPT: {rel}: checksum mismatch" in out
    assert "failed verification: step(s) 2." in err

    # Truncated: found by sizes alone (a listing, no reads).
    bucket.blob(victim).upload_from_string(bytes(payload[:10]))
    assert cli(["ls", "--quick", directory]) == 0
    assert f"step 2 is corrupt: {rel}: size 10 bytes, manifest says {len(payload)}" in \
        capsys.readouterr().out

    with pytest.warns(UserWarning, match="checkpoint 2 .* is corrupt"):
        mngr = CheckpointManager(directory, CheckpointPolicy(keep_latest=2))
    with mngr:
        assert mngr.steps() == [1]
        with pytest.warns(UserWarning, match=r"skipped corrupt checkpoint\(s\) \[2\]"):
            assert np.array_equal(mngr.restore("latest")["x"], values[1])
        with pytest.warns(UserWarning, match="moved corrupt checkpoint 2"):
            mngr.save(2, {"x": values[2]})
    assert {"1", "2", "jaxckpt-corrupt", "jaxckpt.json"} == top_level(gcs, prefix)
    aside = gcs.list_objects(f"{prefix}/jaxckpt-corrupt/")
    assert any(o.endswith(rel.split("/")[-1]) for o in aside)
    with CheckpointManager(directory, read_only=True) as mngr:
        assert mngr.verify() == {1: [], 2: []}
        assert np.array_equal(mngr.restore(2)["x"], values[2])


# -- Trainer.fit -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def splits(digits_dir):
    ds = data.load_tfds("sklearn_digits", "train", data_dir=digits_dir).map(data.normalize)
    return data.split_dataset(ds, (0.7, 0.15, 0.15), seed=0)


def test_trainer_fit_on_gs_stops_resumes_and_matches_an_uninterrupted_run(gcs, gs_dir, splits):
    directory, prefix = gs_dir
    policy = CheckpointPolicy(monitor="val_loss", keep_best=1, keep_latest=1, every_n_steps=10)

    def fit(checkpoint, **kwargs):
        trainer = jaxckpt.Trainer(MLP(), optax.adam(1e-3), quiet=True)
        history = trainer.fit(splits["train"], splits["validation"], epochs=3, batch_size=64,
                              checkpoint=checkpoint, seed=1, **kwargs)
        return trainer, history

    fit(directory, policy=policy, max_steps=45)  # stops mid-epoch 3 (19 steps per epoch)
    with CheckpointManager(directory, read_only=True) as mngr:
        assert mngr.latest_step() in (40, 45)
    resumed, history = fit(directory, policy=policy)
    assert history.events[-1]["event"] == "resume"
    assert [r["epoch"] for r in history.rows] == [1, 2, 3]
    reference, ref_history = fit(None)  # the same run, uninterrupted, no checkpoints
    untimed = lambda rows: [{k: v for k, v in r.items() if k != "time"} for r in rows]  # noqa: E731
    assert untimed(history.rows) == untimed(ref_history.rows)
    assert leaves_equal(resumed.state.params, reference.state.params)
    assert leaves_equal(resumed.state.opt_state, reference.state.opt_state)
    with CheckpointManager(directory, read_only=True) as mngr:
        assert mngr.latest_step() == 57 and mngr.verify() == {s: [] for s in mngr.steps()}
        assert {str(s) for s in mngr.steps()} | {"jaxckpt.json"} == top_level(gcs, prefix)


def test_example_takes_a_gs_checkpoint_dir(gs_dir, tmp_path, digits_dir):
    from jaxckpt.examples import fit_digits

    directory, _ = gs_dir
    result = fit_digits.main(["--workdir", str(tmp_path), "--checkpoint-dir", directory,
                              "--epochs", "1", "--quiet", "--data-dir", str(digits_dir)])
    assert result["best_step"] is not None
    assert (tmp_path / "history.png").exists() and not (tmp_path / "checkpoints").exists()
    with CheckpointManager(directory, read_only=True) as mngr:
        assert mngr.best_step() == result["best_step"]


# -- a writer killed during an upload ---------------------------------------------------------



def big(step, n=2_000_000):
    return np.asarray(jax.random.normal(jax.random.key(step), (n,)))


def uploads_in_flight(gcs, prefix) -> set[int]:
    """Steps with array data in the bucket but no commit marker yet."""
    steps: dict[int, set[str]] = {}
    for name in gcs.list_objects(prefix + "/"):
        m = re.match(rf"{re.escape(prefix)}/(\d+)/(.*)", name)
        if m:
            steps.setdefault(int(m.group(1)), set()).add(m.group(2))
    return {s for s, files in steps.items() if "commit_success.txt" not in files
            and any(f.startswith("state/") and "/d/" in f for f in files)}


def kill_during_upload(gcs, prefix):
    """Start KILLED_WRITER on ``gs://bucket/prefix`` and SIGKILL it while a step's array
    objects are in the bucket and its commit marker is not. Returns (pid, steps in flight),
    or (pid, set()) when the commit won the race between the listing and the kill."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(KILLED_WRITER),
                             gcs.gs(prefix)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "COMMITTED", proc.stderr.read()[-3000:]
        deadline = time.monotonic() + 60
        while not uploads_in_flight(gcs, prefix):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "never saw an upload in flight"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    return proc.pid, uploads_in_flight(gcs, prefix)


def test_writer_killed_during_upload_leaves_nothing_a_reader_takes(gcs, capsys):
    for _ in range(5):  # a kill that lands after the commit marker proves nothing: again
        prefix = unique("killed")
        pid, in_flight = kill_during_upload(gcs, prefix)
        if in_flight:
            break
    assert in_flight, "every kill landed after a commit"
    directory = gcs.gs(prefix)
    owner = json.loads(object_text(gcs, f"{prefix}/jaxckpt.lock"))
    assert owner["pid"] == pid  # it died holding the lock
    before = gcs.list_objects(prefix + "/")

    with CheckpointManager(directory, read_only=True) as mngr:  # readers ignore the upload
        steps = mngr.steps()
        assert steps and max(steps) < min(in_flight)
        assert mngr.verify() == {s: [] for s in steps}
        assert np.array_equal(mngr.restore("latest")["x"], big(steps[-1]))
    assert cli(["ls", "--json", directory]) == 0
    assert [r["step"] for r in json.loads(capsys.readouterr().out)["checkpoints"]] == steps
    assert cli(["verify", directory]) == 0
    capsys.readouterr()
    assert gcs.list_objects(prefix + "/") == before  # read_only cleans nothing

    with pytest.warns(UserWarning, match=rf"stale lock .* pid {pid}.* no longer running"):
        mngr = CheckpointManager(directory, CheckpointPolicy(keep_latest=2))
    with mngr:
        assert mngr.steps() == steps
        # The next writer deleted the half-written step before writing anything.
        assert not top_level(gcs, prefix) & {str(s) for s in in_flight}
        nxt = steps[-1] + 1
        mngr.save(nxt, {"x": big(nxt)})
        mngr.wait()
    with CheckpointManager(directory, read_only=True) as mngr:
        assert mngr.steps() == [steps[-1], nxt]
        assert mngr.verify() == {steps[-1]: [], nxt: []}
        assert np.array_equal(mngr.restore(nxt)["x"], big(nxt))
    assert top_level(gcs, prefix) == {str(steps[-1]), str(nxt), "jaxckpt.json"}


def object_text(gcs, name: str) -> str:
    from google.cloud import storage

    return storage.Client().bucket(gcs.bucket).blob(name).download_as_text()


# -- the lock on an object store ------------------------------------------------------------------


def test_lock_on_gs_refuses_a_second_writer_beats_and_notices_a_takeover(gcs, gs_dir,
                                                                        monkeypatch):
    from jaxckpt import lock as lock_mod

    directory, prefix = gs_dir
    monkeypatch.setattr(lock_mod, "HEARTBEAT_S", 0.05)
    m = CheckpointManager(directory)
    m.save(1, {"x": np.zeros(2)})
    with pytest.raises(jaxckpt.DirectoryLockedError, match="another CheckpointManager in this"):
        CheckpointManager(directory)
    lock_name = f"{prefix}/jaxckpt.lock"
    first = json.loads(object_text(gcs, lock_name))["heartbeat"]
    deadline = time.monotonic() + 30
    while json.loads(object_text(gcs, lock_name))["heartbeat"] == first:
        assert time.monotonic() < deadline, "the heartbeat never moved"
        time.sleep(0.02)
    # Heartbeats replace the object in place: no temporary objects, no renames.
    assert not [o for o in gcs.list_objects(prefix + "/") if o.endswith(".tmp")]

    # Another run takes the directory over (this one looked hung), from another client.
    from google.cloud import storage

    other = {"format": "jaxckpt-lock/1", "run_id": "other-run-on-a-tpu-host",
             "host": "some-other-host.internal", "pid": 4242, "pid_ns": None,
             "pid_start": None, "started": time.time(), "heartbeat": time.time(),
             "heartbeat_s": 5.0}
    blob = storage.Client().bucket(gcs.bucket).blob(lock_name)
    while m._dirlock._lost is None:
        assert time.monotonic() < deadline, "the lost lock was never noticed"
        # The other run beats too: on gs:// the lock is best-effort (no conditional write),
        # so a heartbeat of ours that read before this upload can overwrite it once.
        if json.loads(object_text(gcs, lock_name))["run_id"] != other["run_id"]:
            blob.upload_from_string(json.dumps(other))
        time.sleep(0.02)
    with pytest.raises(jaxckpt.DirectoryLockedError,
                       match="lost the lock .* other-run-on-a-tpu-host on host some-other"):
        m.save(2, {"x": np.zeros(2)})
    with pytest.raises(jaxckpt.DirectoryLockedError):
        m.close()
    assert json.loads(object_text(gcs, lock_name))["run_id"] == "other-run-on-a-tpu-host"
    with CheckpointManager(directory, read_only=True) as reader:
        assert reader.steps() == [1]


def test_prune_deletes_from_the_bucket(gcs, gs_dir, capsys):
    directory, prefix = gs_dir
    with CheckpointManager(directory, CheckpointPolicy(monitor="loss", keep_best=3,
                                                       keep_latest=3)) as mngr:
        for step, loss in enumerate([5.0, 4.0, 3.0, 6.0, 7.0, 8.0, 9.0], start=1):
            mngr.save(step, {"x": np.full(100, float(step))}, metrics={"loss": loss})
    assert top_level(gcs, prefix) == {"1", "2", "3", "5", "6", "7", "jaxckpt.json"}
    assert cli(["prune", directory, "--keep-best", "1", "--keep-latest", "1"]) == 0
    assert "deleted 4 of 6 checkpoint(s)" in capsys.readouterr().out
    assert top_level(gcs, prefix) == {"3", "7", "jaxckpt.json"}
    with CheckpointManager(directory, read_only=True) as mngr:
        assert (mngr.best_step(), mngr.latest_step(), mngr.steps()) == (3, 7, [3, 7])


# -- one job, two processes (as on a TPU pod): one checkpoint in the bucket ---------------------

TWO_PROCESS_WORKER = """
    import json, sys
    from jaxckpt import parallel as par
    pid, port, directory = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    assert par.initialize_distributed(f"127.0.0.1:{port}", 2, pid)
    import jax, jax.numpy as jnp, jaxckpt
    mesh = par.make_mesh(fsdp=4)  # 2 devices in each process: params split over all 4
    state = par.shard_state({"params": {"w": jnp.arange(32.0).reshape(8, 4)},
                             "opt_state": {"mu": jnp.ones((8, 4))}}, mesh)
    policy = jaxckpt.CheckpointPolicy(monitor="loss", keep_best=1, keep_latest=1)
    with jaxckpt.CheckpointManager(directory, policy) as m:  # every process saves
        for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0)]:
            state = jax.tree.map(lambda x: x + 1, state)
            m.save(step, state, metrics={"loss": loss})
    target = par.abstract_state(state, par.state_sharding(state, mesh))
    with jaxckpt.CheckpointManager(directory, read_only=True) as m:
        best = m.restore("best", target=target)
        local = [s.data.tolist() for s in best["params"]["w"].addressable_shards]
        print("RESULT " + json.dumps({"steps": m.steps(), "best": m.best_step(),
                                      "spec": str(best["params"]["w"].sharding.spec),
                                      "local": local}), flush=True)
"""


def test_two_processes_save_one_checkpoint_to_gs(gcs, gs_dir):
    directory, prefix = gs_dir
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(TWO_PROCESS_WORKER),
                               str(i), str(port), directory], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    results, logs = [], []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=180)
            assert proc.returncode == 0, stderr[-3000:]
            results.append(json.loads(stdout.split("RESULT ", 1)[1]))
            logs.append(stderr[-3000:])
    finally:
        for proc in procs:
            proc.kill()
    expected = np.arange(32.0).reshape(8, 4) + 2  # step 2, the best loss
    for i, out in enumerate(results):
        assert (out["steps"], out["best"], out["spec"]) == ([2, 3], 2, "P('fsdp', None)"), \
            (i, logs, gcs.list_objects(prefix))
        # Each process holds its own rows of the best step: 2 devices x 2 rows.
        assert np.array_equal(np.concatenate(out["local"]), expected[4 * i:4 * i + 4])
    objects = gcs.list_objects(f"{prefix}/2/")
    # Both processes wrote their shards; process 0 wrote the manifest covering them all.
    assert any("/ocdbt.process_0/" in o for o in objects)
    assert any("/ocdbt.process_1/" in o for o in objects)
    with CheckpointManager(directory, read_only=True) as mngr:  # one process reads it all
        assert mngr.verify() == {2: [], 3: []}
        assert np.array_equal(mngr.restore("best")["params"]["w"], expected)
    assert top_level(gcs, prefix) == {"2", "3", "jaxckpt.json"}


def test_missing_bucket_is_named_with_the_fix(gcs):
    with pytest.raises(jaxckpt.CheckpointDirectoryError,
                       match=r"bucket gs://no-such-bucket-here .* does not exist.*Create it"):
        CheckpointManager("gs://no-such-bucket-here/run/checkpoints")
    with pytest.raises(jaxckpt.CheckpointDirectoryError, match="does not exist"):
        CheckpointManager(gcs.gs(unique("never-written")), read_only=True)
    assert cli(["ls", "gs://no-such-bucket-here/run"]) == 2
