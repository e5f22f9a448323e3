"""A checkpoint directory that survives anything (issue 12): each fault injected for real.

Damaged files damage only themselves; deletions are atomic for readers; losing
``jaxckpt.json`` loses neither the policy nor the best checkpoint; bad ``save()``
arguments fail on the calling thread before anything is queued; readers beside a live
writer never fail; a vanished directory is not silently re-created; a stalled store
raises past a deadline.
"""

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import numpy as np
import pytest

import jaxckpt
from jaxckpt import CheckpointManager, CheckpointPolicy, cli
from jaxckpt import format as fmt
from jaxckpt import ledger as ledger_lib
from jaxckpt import lock as lock_mod
from jaxckpt import storage

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
POLICY = CheckpointPolicy(monitor="val_loss", mode="min", keep_best=1, keep_latest=2)
LOSSES = {1: 0.5, 2: 0.3, 3: 0.4, 4: 0.6}


def value(step):
    return np.arange(8.0) * step


@pytest.fixture
def ckpt(tmp_path):
    """Steps 2 (best), 3 and 4 (latest two) of the losses above; 1 deleted."""
    d = tmp_path / "c"
    with CheckpointManager(d, POLICY) as m:
        for step, loss in LOSSES.items():
            m.save(step, {"x": value(step)}, metrics={"val_loss": loss})
    return d


def listing(d):
    return {os.path.relpath(os.path.join(r, f), d): os.path.getsize(os.path.join(r, f))
            for r, _, fs in os.walk(d) for f in fs}


# -- one damaged file damages only itself ----------------------------------------------------


def test_non_utf8_history_file_is_rebuilt_from_the_checkpoints(ckpt):
    (ckpt / fmt.HISTORY_FILE).write_bytes(b"\xff\xfe{not utf-8")
    with pytest.warns(UserWarning, match="jaxckpt.json is unreadable.*rebuilding"):
        with CheckpointManager(ckpt, read_only=True) as m:
            assert (m.steps(), m.best_step(), m.latest_step()) == ([2, 3, 4], 2, 4)
            # each checkpoint carries the entries no written snapshot held when it was
            # saved (none was, in this short run): step 1's is still there, though step 1
            # was deleted
            assert [h["step"] for h in m.history()] == [1, 2, 3, 4]
    with pytest.warns(UserWarning, match="unreadable"), CheckpointManager(ckpt) as m:
        m.save(5, {"x": value(5)}, metrics={"val_loss": 0.9})
    data = json.loads((ckpt / fmt.HISTORY_FILE).read_text())  # rewritten whole
    assert [e["step"] for e in data["history"]] == [1, 2, 3, 4, 5]


def test_a_killed_run_keeps_the_metrics_of_checkpoints_it_deleted(tmp_path):
    """kill -9 before jaxckpt.json was rewritten, after keep_latest deleted checkpoints
    (synchronous saves: each returns after its commit and deletions):
    the history comes back whole from the checkpoints that remain, also after a snapshot
    was written mid-run (the segments then start at its last entry)."""
    code = textwrap.dedent("""
        import os, signal, sys, numpy as np, jaxckpt
        m = jaxckpt.CheckpointManager(sys.argv[1], jaxckpt.CheckpointPolicy(
            monitor="val_loss", keep_best=1, keep_latest=1), async_save=False)
        for s in range(12):
            if s == 6:
                m.wait()  # writes a snapshot of steps 0-5, as the 10 s flush would
            m.save(s, {"w": np.ones(4) * s}, metrics={"val_loss": 1.0 + s})
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    d = tmp_path / "c"
    out = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True,
                         env=ENV, timeout=120)
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    assert sorted(p.name for p in d.iterdir() if p.name.isdigit()) == ["0", "11"]
    stored = json.loads((d / fmt.HISTORY_FILE).read_text())
    assert [e["step"] for e in stored["history"]] == list(range(6))  # the mid-run snapshot
    with CheckpointManager(d, read_only=True) as m:
        assert [h["step"] for h in m.history()] == list(range(12))
        assert [h["metrics"]["val_loss"] for h in m.history()] == [1.0 + s for s in range(12)]
    with CheckpointManager(d):  # a writable open rewrites the file whole
        pass
    stored = json.loads((d / fmt.HISTORY_FILE).read_text())
    assert [e["step"] for e in stored["history"]] == list(range(12))


def test_a_file_a_dangling_link_or_a_directory_named_like_a_step_is_left_alone(ckpt):
    """Not checkpoints: never listed, moved or deleted; saving their step names the fix."""
    (ckpt / "7").write_text("a log someone put here\n")
    os.symlink(ckpt / "nowhere", ckpt / "8")
    (ckpt / "9").mkdir()
    with CheckpointManager(ckpt, POLICY) as m:
        assert m.steps() == [2, 3, 4]
        m.save(5, {"x": value(5)}, metrics={"val_loss": 0.9})
        for step, what in ((7, "a file"), (8, "a link to nowhere"), (9, "an empty directory")):
            with pytest.raises(jaxckpt.CheckpointWriteError,
                               match=f"save\\(step={step}\\): .*/{step} already exists, {what}"
                                     ".*move it away or delete it") as e:
                m.save(step, {"x": value(step)}, metrics={"val_loss": 0.1})
            assert "[2, 4, 5]" in str(e.value)
        m.save(10, {"x": value(10)}, metrics={"val_loss": 0.1})
        assert m.steps() == [5, 10] and m.best_step() == 10
        assert [e["step"] for e in m.entries() if e["saved"]] == [1, 2, 3, 4, 5, 10]
    assert (ckpt / "7").read_text() == "a log someone put here\n"
    assert os.path.islink(ckpt / "8") and (ckpt / "9").is_dir()
    assert not (ckpt / fmt.CORRUPT_DIR).exists()
    with CheckpointManager(ckpt, read_only=True) as m:
        assert m.steps() == [5, 10] and m.verify() == {5: [], 10: []}


def test_a_step_linked_in_from_another_run_is_used_and_deleting_it_removes_the_link(
        ckpt, tmp_path):
    other = tmp_path / "other"
    os.mkdir(other)
    os.symlink(ckpt / "4", other / "4")  # another run's checkpoint, linked in
    policy = CheckpointPolicy(monitor="val_loss", keep_best=1, keep_latest=1)
    with CheckpointManager(other, policy) as m:
        assert m.steps() == [4]
        assert np.array_equal(m.restore(4)["x"], value(4))
        m.save(5, {"x": value(5)}, metrics={"val_loss": 0.1})  # replaces 4
        m.save(6, {"x": value(6)}, metrics={"val_loss": 0.2})
        assert m.steps() == [5, 6]
    assert sorted(os.listdir(other)) == ["5", "6", fmt.HISTORY_FILE]
    with CheckpointManager(ckpt, read_only=True) as m:  # the target is untouched
        assert m.steps() == [2, 3, 4] and m.verify()[4] == []


def test_orbax_metadata_of_the_wrong_shape_sets_aside_that_step_only(ckpt):
    (ckpt / "4" / "_CHECKPOINT_METADATA").write_text(json.dumps([1, 2, 3]))
    with pytest.warns(UserWarning, match="checkpoint 4 .* corrupt"):
        with CheckpointManager(ckpt, read_only=True) as m:
            assert (m.steps(), m.latest_step()) == ([2, 3], 3)
            assert np.array_equal(m.restore("latest")["x"], value(3))
    out = subprocess.run(["jaxckpt", "ls", str(ckpt)], capture_output=True, text=True, env=ENV)
    assert out.returncode == 0 and "step 4 is corrupt" in out.stdout, out
    with pytest.warns(UserWarning), CheckpointManager(ckpt) as m:  # a writer opens too
        m.save(5, {"x": value(5)}, metrics={"val_loss": 0.9})
        assert m.steps() == [2, 3, 5]
    assert len(os.listdir(ckpt / fmt.CORRUPT_DIR)) == 1  # set aside, never deleted


@pytest.mark.parametrize("name", [fmt.LOCK_FILE, fmt.HISTORY_FILE])
def test_a_directory_named_like_the_lock_or_history_file_is_refused_before_anything(
        ckpt, name):
    if (ckpt / name).exists():
        os.remove(ckpt / name)
    os.mkdir(ckpt / name)
    before = listing(ckpt)
    with pytest.raises(jaxckpt.CheckpointDirectoryError,
                       match=rf"{name} is a directory.*move it away or delete it"):
        CheckpointManager(ckpt, POLICY)
    assert listing(ckpt) == before and (ckpt / name).is_dir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an unreadable history file: rebuilt, with a warning
        with CheckpointManager(ckpt, read_only=True) as m:
            assert m.steps() == [2, 3, 4]


def test_a_lock_file_of_garbage_bytes_is_taken_over(ckpt):
    (ckpt / fmt.LOCK_FILE).write_bytes(b"\xff\x00\x81garbage")
    old = time.time() - 2 * lock_mod.STALE_AFTER_S  # nobody has touched it for 4 minutes
    os.utime(ckpt / fmt.LOCK_FILE, (old, old))
    with pytest.warns(UserWarning, match="taking over the stale lock .*jaxckpt.lock: the "
                      r"lock file is unreadable and was last modified 2\d\d s ago") as got:
        with CheckpointManager(ckpt) as m:
            m.save(5, {"x": value(5)}, metrics={"val_loss": 0.9})
    assert "None" not in str(got[0].message) and "heartbeat" not in str(got[0].message)
    assert not any(n.endswith(".stale") for n in os.listdir(ckpt))


GARBAGE_BESIDE_A_WRITER = """
    import sys, numpy as np, jaxckpt
    from jaxckpt import lock
    lock.HEARTBEAT_S = 0.2
    p = jaxckpt.CheckpointPolicy(monitor="val_loss", mode="min", keep_best=1, keep_latest=1)
    with jaxckpt.CheckpointManager(sys.argv[1], p) as m:
        for step in range(1, 60):
            m.save(step, {"x": np.full(1000, float(step))}, metrics={"val_loss": 1.0 / step})
            if step in (1, 30):
                m.wait()
                print("AT", step, flush=True)
                sys.stdin.readline()
    print("SAVED", m.latest_step(), flush=True)
"""


def test_garbage_over_a_live_writers_lock_refuses_others_and_the_writer_repairs_it(tmp_path):
    d, path = tmp_path / "c", tmp_path / "c" / fmt.LOCK_FILE
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(GARBAGE_BESIDE_A_WRITER),
                             str(d)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        assert proc.stdout.readline().strip() == "AT 1", proc.stderr.read()[-2000:]
        # Suspended for a moment, so that no heartbeat repairs the lock before the refusal.
        proc.send_signal(signal.SIGSTOP)
        path.write_text("garbage\n")
        with pytest.raises(jaxckpt.DirectoryLockedError) as refused:
            CheckpointManager(d, POLICY)
        proc.send_signal(signal.SIGCONT)
        msg = str(refused.value)
        for part in (f"lock file {path} is unreadable and was modified ",
                     "another run may hold it", "Wait until it is 120 s old",
                     f"delete {path} if no run writes here"):
            assert part in msg, msg
        assert "None" not in msg, msg
        deadline = time.monotonic() + 60
        for _ in range(3):  # again while it runs: a beat in flight may overwrite one write
            while not path.read_text().startswith("{"):
                assert time.monotonic() < deadline, "the writer never repaired its lock"
                time.sleep(0.05)
            path.write_text("garbage\n")
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "AT 30", proc.stderr.read()[-2000:]
        with pytest.raises(jaxckpt.DirectoryLockedError, match=f"pid {proc.pid}, last heart"):
            CheckpointManager(d, POLICY)  # repaired: its own record again
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == 0 and out.strip() == "SAVED 59", err[-3000:]
    assert f"the lock {path} became unreadable while this run held it" in err, err[-3000:]
    assert not path.exists()  # released as its own at exit


def test_a_lost_lock_names_the_run_that_took_it_and_no_made_up_cause(tmp_path, monkeypatch):
    monkeypatch.setattr(lock_mod, "HEARTBEAT_S", 0.05)
    m = CheckpointManager(tmp_path, POLICY)
    other = {"format": "jaxckpt-lock/1", "run_id": "other-run", "host": "elsewhere",
             "pid": 7, "heartbeat": time.time()}
    (tmp_path / fmt.LOCK_FILE).write_text(json.dumps(other))  # replaced by hand, not stale
    deadline = time.monotonic() + 30
    while m._dirlock._lost is None:
        assert time.monotonic() < deadline, "the lost lock was never noticed"
        time.sleep(0.02)
    with pytest.raises(jaxckpt.DirectoryLockedError) as lost:
        m.save(1, {"x": value(1)}, metrics={"val_loss": 0.5})
    msg = str(lost.value)
    assert "taken over by run other-run on host elsewhere, pid 7" in msg, msg
    assert "although this run wrote its heartbeat" in msg and "None" not in msg, msg
    with pytest.raises(jaxckpt.DirectoryLockedError):
        m.close()


@pytest.mark.parametrize("owner, text", [
    ({}, "an unreadable lock"),
    ({"run_id": "r", "heartbeat": None}, "run r, no heartbeat"),
    ({"run_id": "r", "host": "h", "pid": 3}, "run r on host h, pid 3, no heartbeat"),
])
def test_describe_leaves_out_what_the_lock_does_not_say(owner, text):
    assert lock_mod.describe(owner) == text


def test_a_lock_heartbeat_in_the_future_is_judged_by_the_file_not_trusted(ckpt):
    record = {"format": "jaxckpt-lock/1", "run_id": "x", "host": "elsewhere", "pid": 1,
              "heartbeat": time.time() + 10 * 365 * 86400}
    (ckpt / fmt.LOCK_FILE).write_text(json.dumps(record))
    old = time.time() - 2 * lock_mod.STALE_AFTER_S
    os.utime(ckpt / fmt.LOCK_FILE, (old, old))
    with pytest.warns(UserWarning, match="in the future"), CheckpointManager(ckpt):
        pass
    (ckpt / fmt.LOCK_FILE).write_text(json.dumps(record))  # fresh file: respected
    with pytest.raises(jaxckpt.DirectoryLockedError):
        CheckpointManager(ckpt)


# -- deletion is atomic; what an interrupted one leaves is finished -------------------------


def test_half_deleted_steps_are_never_listed_and_the_next_writer_finishes_them(ckpt):
    # What a writer killed mid-deletion leaves: a renamed step (new code) or a step with
    # files missing (a deletion in place).
    os.rename(ckpt / "3", ckpt / fmt.deleting_name(3))
    os.remove(ckpt / "4" / "_CHECKPOINT_METADATA")
    shutil.rmtree(ckpt / "4" / "state")
    with CheckpointManager(ckpt, read_only=True) as m:
        assert (m.steps(), m.latest_step()) == ([2], 2)
        assert m.verdicts()[4].incomplete
        with pytest.raises(jaxckpt.CheckpointNotFoundError, match="available steps: \\[2\\]"):
            m.restore(4)
    with CheckpointManager(ckpt) as m:
        m.save(5, {"x": value(5)}, metrics={"val_loss": 0.9})
    assert sorted(os.listdir(ckpt)) == ["2", "5", fmt.HISTORY_FILE]


@pytest.mark.parametrize("lost", ["meta/metadata", "_CHECKPOINT_METADATA",
                                  "jaxckpt_manifest.json _CHECKPOINT_METADATA"])
def test_a_committed_step_that_lost_one_small_file_is_set_aside_never_deleted(ckpt, lost):
    """Its manifest says it was complete: a lost file is damage, not a half-deletion.
    Without the manifest too, a whole state says the same (the next writer deleted such
    a step as unfinished, though Orbax could restore it)."""
    for name in lost.split():
        os.remove(ckpt / "4" / name)
    lost = lost.split()[-1]
    with pytest.warns(UserWarning, match=f"checkpoint 4 .* corrupt .*{lost}: missing"):
        m = CheckpointManager(ckpt, read_only=True)
    with m:
        assert m.steps() == [2, 3] and m.verdicts()[4].problems[0] == f"{lost}: missing"
    with pytest.warns(UserWarning, match="moved corrupt checkpoint 4"):
        with CheckpointManager(ckpt) as m:
            m.save(5, {"x": value(5)}, metrics={"val_loss": 0.9})
    kept = os.listdir(ckpt / fmt.CORRUPT_DIR)
    assert len(kept) == 1 and kept[0].startswith("4-")
    assert os.path.exists(ckpt / fmt.CORRUPT_DIR / kept[0] / "state")


# -- losing jaxckpt.json loses neither the policy nor the best ------------------------------


def test_the_history_rebuilt_from_the_checkpoints_is_the_one_recorded(tmp_path):
    """Every field of every entry (epoch, time, written or not), from the segments the
    checkpoints carry, including those of calls that wrote nothing and of checkpoints
    deleted since."""
    d = tmp_path / "c"
    policy = CheckpointPolicy(monitor="val_loss", keep_best=1, keep_latest=1,
                              every_n_steps=5)
    with CheckpointManager(d, policy) as m:
        for step in range(1, 13):
            m.save(step, {"x": value(step)}, epoch=step // 4,
                   metrics={"val_loss": 1.0 + step % 3 - step / 100, "acc": step / 10})
        recorded = m.entries()
        steps = m.steps()
    assert len(recorded) == 12 and 0 < sum(e["saved"] for e in recorded) < 12
    os.remove(d / fmt.HISTORY_FILE)
    with CheckpointManager(d, read_only=True) as m:
        assert m.steps() == steps
        assert m.entries() == recorded


@pytest.mark.parametrize("n", [0, 1, 5, 6, 7, 20])
def test_a_history_snapshot_encoded_chunk_by_chunk_is_the_text_json_dumps_writes(n,
                                                                                 monkeypatch):
    monkeypatch.setattr(ledger_lib, "_ENCODE_CHUNK", 3)  # chunk edges at every size above
    ledger = ledger_lib.Ledger([ledger_lib.Entry(i, {"v": i / 3} if i % 2 else None,
                                                 i // 4 if i % 3 else None, 1.5 + i,
                                                 i % 5 == 0) for i in range(n)])
    snap = ledger_lib.snapshot(ledger, policy={"monitor": "v"}, auto_every=None)
    assert ledger_lib.encode(snap) == json.dumps(
        {"format": fmt.HISTORY_FORMAT, "policy": {"monitor": "v"}, "auto_every": None,
         "history": [e._asdict() for e in ledger.entries()]})


def test_the_history_file_holds_every_entry_after_a_chunked_snapshot(tmp_path, monkeypatch):
    monkeypatch.setattr(ledger_lib, "_ENCODE_CHUNK", 4)
    with CheckpointManager(tmp_path / "c", POLICY) as m:
        for step in range(1, 11):
            m.save(step, {"x": value(step)}, metrics={"val_loss": 1 / step}, epoch=step // 3)
        entries = [{k: v for k, v in e.items() if k != "kept"} for e in m.entries()]
    data = json.loads((tmp_path / "c" / fmt.HISTORY_FILE).read_text())
    assert fmt.validate_history(data) == []
    assert data["history"] == entries and len(entries) == 10


def test_without_the_history_file_the_stored_policy_still_keeps_the_best(ckpt):
    os.remove(ckpt / fmt.HISTORY_FILE)
    with CheckpointManager(ckpt) as m:  # policy=None: the checkpoints remember it
        assert m.policy == POLICY
        m.save(5, {"x": value(5)}, metrics={"val_loss": 0.8})
        m.save(6, {"x": value(6)}, metrics={"val_loss": 0.7})
        assert (m.steps(), m.best_step()) == ([2, 5, 6], 2)


def test_reading_a_steps_record_copies_neither_its_ledger_segment_nor_shares_metrics(
        tmp_path):
    # A record carries every save() call since the last snapshot: copying that segment at
    # each read made metrics(step) and opening cost O(calls) (20k calls: 0.1-0.3 s each).
    policy = CheckpointPolicy(monitor="val_loss", keep_best=1, keep_latest=1,
                              every_n_steps=10**6)
    with CheckpointManager(tmp_path, policy) as m:
        m.save(0, {"x": value(1)}, metrics={"val_loss": 0.0})
        for step in range(1, 300):
            m.save(step, {"x": value(1)}, metrics={"val_loss": 1.0 + step})
        m.save(300, {"x": value(1)}, metrics={"val_loss": 0.5}, force=True)
    with CheckpointManager(tmp_path, read_only=True) as m:
        catalog = m._catalog
        assert "ledger" not in catalog.read_meta(300)
        segment = catalog.read_meta(300, ledger=True)["ledger"]
        assert len(segment) > 100
        assert segment is catalog.read_meta(300, ledger=True)["ledger"]  # not copied
        got = m.metrics(300)
        got["val_loss"] = 7.0
        assert m.metrics(300) == {"val_loss": 0.5}  # a copy: the catalog's is unchanged
        assert len(m.history()) == 301


def test_a_changed_policy_in_the_history_file_does_not_override_the_checkpoints(ckpt):
    # One flipped bit, "keep_best": 1 -> 0: the file has no checksum; each checkpoint's
    # record has one (in its manifest).
    path = ckpt / fmt.HISTORY_FILE
    path.write_text(path.read_text().replace('"keep_best": 1', '"keep_best": 0'))
    with pytest.warns(UserWarning, match=r"jaxckpt.json disagrees with the policy that "
                                         r"checkpoint 4.*keep_best 0 there, 1 in the checkpoint"):
        m = CheckpointManager(ckpt)
    with m:
        assert m.policy == POLICY
        m.save(5, {"x": value(5)}, metrics={"val_loss": 0.8})
        assert (m.steps(), m.best_step()) == ([2, 4, 5], 2)


def test_a_directory_with_checkpoints_and_no_readable_policy_refuses_a_default(ckpt):
    os.remove(ckpt / fmt.HISTORY_FILE)
    for step in (2, 3, 4):  # strip the policy from each step's record, keep it valid
        path = ckpt / str(step) / "meta" / "metadata"
        meta = json.loads(path.read_text())
        meta["policy"] = None
        path.write_text(json.dumps(meta))
        os.remove(ckpt / str(step) / fmt.MANIFEST_FILE)
    with pytest.raises(jaxckpt.CheckpointDirectoryError, match="Pass policy="):
        CheckpointManager(ckpt)
    assert sorted(os.listdir(ckpt)) == ["2", "3", "4"]


# -- save() checks every argument on the calling thread ---------------------------------------


@pytest.mark.parametrize("kwargs, error, match", [
    ({"step": 5.0}, TypeError, "step must be an int.*Pass int"),
    ({"step": np.float32(5)}, TypeError, "step must be an int"),
    ({"step": True}, TypeError, "step must be an int"),
    ({"step": "5"}, TypeError, "step must be an int"),
    ({"epoch": 1.5}, TypeError, "epoch must be an int"),
    ({"epoch": "3"}, TypeError, "epoch must be an int"),
    ({"state": {"x": value(5), "name": "run-1"}}, TypeError, "name"),
    ({"state": {"f": lambda x: x}}, TypeError, "f"),
    ({"state": {"x": value(5), "empty": np.zeros((3, 0))}}, TypeError,
     r"empty.*empty array \(shape \(3, 0\)\).*leave it out"),
    ({"metrics": {"val_loss": "low"}}, TypeError, "metric 'val_loss'"),
    ({"data_state": object()}, TypeError, "data_state must be JSON-able"),
    # restored as {"1": "x"}: not the state that was saved
    ({"data_state": {"pos": {1: "x"}}}, TypeError, "key 1 is a int: use str keys"),
    ({"metrics": {"val_loss": True}}, TypeError, "metric 'val_loss' is a bool"),
    ({"metrics": {"val_loss": 0.1, "tokens": 10**400}}, TypeError, "metric 'tokens'"),
    ({"force": "no"}, TypeError, "force must be True or False"),
])
def test_bad_save_arguments_fail_here_and_write_nothing(ckpt, kwargs, error, match):
    args = {"step": 5, "state": {"x": value(5)}, "metrics": {"val_loss": 0.1}, **kwargs}
    before = listing(ckpt)
    with CheckpointManager(ckpt) as m:
        with pytest.raises(error, match=match):
            m.save(args.pop("step"), args.pop("state"), **args)
        assert m.steps() == [2, 3, 4]
        m.save(5, {"x": value(5)}, metrics={"val_loss": 0.9})  # and saving still works
        assert m.steps() == [2, 4, 5]
    assert set(before) - set(listing(ckpt)) <= {k for k in before if k.startswith("3/")}


def test_numpy_integer_step_and_epoch_are_fine_and_scalars_round_trip(tmp_path):
    with CheckpointManager(tmp_path / "c") as m:
        for i in range(1, 7):
            assert m.save(np.int64(i), {"x": value(i), "n": 3, "lr": 0.5, "on": True},
                          epoch=np.int32(i))
        m.wait()
        restored = m.restore("latest", target={"x": value(0), "n": 0, "lr": 0.0, "on": False})
        plain = m.restore("latest")  # no target: numpy in the saved dtype, even float64
    assert plain["x"].dtype == np.float64 and np.array_equal(plain["x"], value(6))
    assert (restored["n"], restored["lr"], restored["on"]) == (3, 0.5, True)
    assert type(restored["n"]) is int and type(restored["on"]) is bool


# -- one definition of latest ------------------------------------------------------------------


def test_latest_step_agrees_with_restore_latest_after_a_flipped_byte(ckpt):
    data = max((p for p in (ckpt / "4" / "state").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))  # same size: only checksums find it
    with CheckpointManager(ckpt, read_only=True) as m:
        with pytest.warns(UserWarning, match="skipped corrupt checkpoint"):
            got = m.restore_checkpoint("latest")
        assert got.step == m.latest_step() == 3 and m.steps() == [2, 3]
        assert np.array_equal(got.state["x"], value(3))
        m.reload()  # sizes alone cannot see the flip: what was found stays found
        assert m.latest_step() == 3 and m.verify()[4]


# -- the directory under the writer -----------------------------------------------------------


def test_directory_deleted_under_a_writer_is_an_error_not_a_re_creation(tmp_path):
    d = tmp_path / "c"
    with CheckpointManager(d, POLICY) as m:
        m.save(1, {"x": value(1)}, metrics={"val_loss": 0.5})
        m.wait()
        os.rename(d, tmp_path / "moved")
        with pytest.raises(jaxckpt.CheckpointDirectoryError, match="deleted or renamed"):
            m.save(2, {"x": value(2)}, metrics={"val_loss": 0.4})
        assert not d.exists()
        os.rename(tmp_path / "moved", d)  # so that close() can release the lock


def _recording_barriers(monkeypatch) -> list[str]:
    from jaxckpt import orbax_io

    met = []
    monkeypatch.setattr(orbax_io, "sync_processes", met.append)
    return met


def test_a_symlinked_corrupt_dir_never_moves_data_outside(ckpt, tmp_path, monkeypatch):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, ckpt / fmt.CORRUPT_DIR)
    os.remove(ckpt / "4" / "meta" / "metadata")
    (ckpt / "4" / "meta" / "metadata").write_text("{}")
    met = _recording_barriers(monkeypatch)
    with pytest.warns(UserWarning, match="leads outside"):
        with CheckpointManager(ckpt) as m:
            m.save(5, {"x": value(5)}, metrics={"val_loss": 0.9})
    assert os.listdir(outside) == [] and (ckpt / "4").is_dir()
    # The primary still meets the other processes, which wait for the move it skipped.
    assert "move_corrupt" in met


def test_a_failed_move_of_a_corrupt_checkpoint_still_meets_the_other_processes(
        ckpt, monkeypatch):
    os.remove(ckpt / "4" / "meta" / "metadata")
    (ckpt / "4" / "meta" / "metadata").write_text("{}")
    met = _recording_barriers(monkeypatch)

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(ckpt / "4"))

    monkeypatch.setattr(storage, "move_tree", refused)
    with CheckpointManager(ckpt) as m:
        with pytest.raises(PermissionError):
            m.save(5, {"x": value(5)}, metrics={"val_loss": 0.9})
        assert met == ["move_corrupt"]
    assert (ckpt / "4").is_dir()


# -- readers beside a live writer -----------------------------------------------------------------

WRITER = """
    import sys, numpy as np, jaxckpt
    p = jaxckpt.CheckpointPolicy(monitor="val_loss", mode="min", keep_best=1, keep_latest=1)
    with jaxckpt.CheckpointManager(sys.argv[1], p) as m:
        for step in range(1, 400):
            m.save(step, {"x": np.full(50_000, float(step))},
                   metrics={"val_loss": float((step * 7919) % 101)})
            if step == 1:
                m.wait()
                print("GO", flush=True)
"""


def test_a_reader_whose_best_was_replaced_meanwhile_restores_the_new_best(tmp_path):
    """The writer commits a new best and deletes the old one after a reader listed the
    directory: restore('best') finds the new one, not 'no best' among what is left."""
    d = tmp_path / "c"
    policy = CheckpointPolicy(monitor="val_loss", keep_best=1, keep_latest=2)
    with CheckpointManager(d, policy) as writer:
        writer.save(1, {"x": value(1)}, metrics={"val_loss": 0.5})
        writer.save(2, {"x": value(2)})  # mid-epoch: latest, never best
        writer.wait()
        reader = CheckpointManager(d, read_only=True)
        assert (reader.best_step(), reader.steps()) == (1, [1, 2])
        writer.save(3, {"x": value(3)}, metrics={"val_loss": 0.3})
        writer.wait()  # 3 committed, then 1 deleted
        assert not (d / "1").exists()
        ckpt = reader.restore_checkpoint("best")
        assert ckpt.step == 3 and np.array_equal(ckpt.state["x"], value(3))
        assert reader.best_step() == 3 and reader.steps() == [2, 3]
        reader.close()


def test_verify_skips_a_step_the_writer_deletes_while_its_arrays_are_read(ckpt, monkeypatch):
    from jaxckpt import orbax_io, storage

    real = orbax_io.restore_state

    def deleted_meanwhile(step_dir, *args, **kwargs):
        if step_dir.name == "3":  # the writer's deletion: renamed away, then removed
            storage.remove_tree(step_dir.parent, 3)
        return real(step_dir, *args, **kwargs)

    with CheckpointManager(ckpt, read_only=True) as m:
        monkeypatch.setattr(orbax_io, "restore_state", deleted_meanwhile)
        assert m.verify() == {2: [], 4: []}
        assert m.steps() == [2, 4]


def test_verify_beside_a_writer_checks_what_it_committed_after_the_listing(tmp_path):
    """A reader lists [1]; the writer (latest 1) commits 2 and deletes 1 before the check.
    verify() used to return {} -- the CLI then said "no checkpoints" of a directory that
    always held one -- and now lists again and checks 2."""
    d = tmp_path / "c"
    with CheckpointManager(d, CheckpointPolicy(keep_latest=1)) as writer:
        writer.save(1, {"x": value(1)})
        writer.wait()
        with CheckpointManager(d, read_only=True) as reader:
            assert reader.steps() == [1]
            writer.save(2, {"x": value(2)})
            writer.wait()
            assert not (d / "1").exists()
            assert reader.verify() == {2: []}
            assert reader.steps() == [2]


def test_a_read_that_fails_midway_prints_no_asyncio_tracebacks(tmp_path, capfd, caplog):
    """One array that fails while another is still being read (a step the writer deletes
    meanwhile): Orbax closed its event loop at the first error, and the read still in
    flight then printed "Event loop is closed" (or "Future exception was never
    retrieved") to stderr, after jaxckpt had raised. The restore now raises once every
    read has finished."""
    import orbax.checkpoint as ocp
    step = tmp_path / "c" / "1"
    big = np.random.default_rng(0).standard_normal(4_000_000)  # 32 MB: read for ~10 ms
    ocp.PyTreeCheckpointer(use_ocdbt=False).save(step, {"big": big, "small": np.arange(8.0)})
    (step / "small" / "0").unlink()  # a file per array: this one fails at once
    unraisable = []  # what tensorstore's threads print (pytest would make it a warning)
    hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        with CheckpointManager(tmp_path / "c", read_only=True) as m, \
                pytest.raises(ValueError, match="small/0"):
            m.restore(1)
        time.sleep(1)  # a read left in flight is done long before this
    finally:
        sys.unraisablehook = hook
    noise = "".join(f"{u.exc_value!r}\n" for u in unraisable) + capfd.readouterr().err + caplog.text
    for text in ("Event loop is closed", "never retrieved", "never awaited", "destroyed"):
        assert text not in noise, noise[-3000:]


def test_readers_beside_a_live_writer_never_fail(tmp_path):
    d = tmp_path / "c"
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(WRITER), str(d)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        assert proc.stdout.readline().strip() == "GO", proc.stderr.read()[-2000:]
        reads = 0
        while proc.poll() is None and reads < 40:
            with CheckpointManager(d, read_only=True) as m:
                got = m.restore_checkpoint("latest")
                assert np.all(got.state["x"] == got.step)
                best = m.restore_checkpoint("best")
                assert np.all(best.state["x"] == best.step)
            with contextlib.redirect_stdout(io.StringIO()) as out, \
                    contextlib.redirect_stderr(io.StringIO()) as err:
                rc = cli.main(["ls", str(d), "--quick", "--json"])
            assert rc == 0, err.getvalue()
            listed = json.loads(out.getvalue())
            # (a step committed a moment ago may not have its manifest yet: unverified)
            assert {r["integrity"] for r in listed["checkpoints"]} <= {
                "ok (sizes)", "unverified"}, listed["checkpoints"]
            reads += 1
        assert reads > 5
    finally:
        proc.kill()
        proc.communicate()


# -- a stalled store ---------------------------------------------------------------------------------


def test_a_store_that_never_answers_raises_past_the_deadline(monkeypatch):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []
    stop = threading.Event()

    def accept():  # accept every connection and never answer
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass
    threading.Thread(target=accept, daemon=True).start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    code = textwrap.dedent(f"""
        import time, jaxckpt
        t = time.monotonic()
        try:
            jaxckpt.CheckpointManager("gs://bucket/run", storage_timeout_s=3)
        except TimeoutError as e:
            print("TIMEOUT", round(time.monotonic() - t), e)
    """)
    env = {**ENV, "STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           "GOOGLE_CLOUD_PROJECT": "test"}
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, timeout=120)
    finally:
        stop.set()
    line = next((x for x in out.stdout.splitlines() if x.startswith("TIMEOUT")), None)
    assert line is not None, out.stdout + out.stderr[-3000:]
    assert "gs://bucket/run" in line and "did not finish within 3 s" in line


# -- a forgotten close() ---------------------------------------------------------------------------


def test_a_pending_write_completes_at_exit_without_close(tmp_path):
    code = textwrap.dedent("""
        import sys, numpy as np, jaxckpt
        m = jaxckpt.CheckpointManager(sys.argv[1])
        m.save(1, {"x": np.random.default_rng(1).standard_normal(2_000_000)})
        # no wait(), no close(): the interpreter exits with the write in flight
    """)
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "c")], capture_output=True,
                         text=True, env=ENV, timeout=120)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    with CheckpointManager(tmp_path / "c", read_only=True) as m:
        assert m.steps() == [1] and m.verify() == {1: []}
        assert m.verdicts()[1].has_manifest
        assert np.array_equal(m.restore(1)["x"], np.random.default_rng(1).standard_normal(2_000_000))
    assert not (tmp_path / "c" / fmt.LOCK_FILE).exists()


def test_a_lock_read_torn_by_a_heartbeat_rewrite_is_read_again(tmp_path, monkeypatch):
    """A store that replaces objects in place can hand a reader half a heartbeat's rewrite
    (the GCS emulator did, in CI): the second opener must still see the live owner and say
    that another CheckpointManager holds the directory, not that the lock is garbage."""
    from etils import epath

    d = tmp_path / "c"
    with CheckpointManager(d, POLICY):
        lock = str(d / fmt.LOCK_FILE)
        real, torn = epath.Path.read_text, []

        def read_text(self, *args, **kwargs):
            text = real(self, *args, **kwargs)
            if str(self) == lock and not torn:
                torn.append(text)
                return text[:len(text) // 2]
            return text
        monkeypatch.setattr(epath.Path, "read_text", read_text)
        with pytest.raises(jaxckpt.DirectoryLockedError,
                           match="another CheckpointManager in this"):
            CheckpointManager(d, POLICY)
        assert torn, "the lock was never read"
