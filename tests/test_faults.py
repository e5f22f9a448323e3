"""Faults injected for real: kill -9 during an async write, a second writer on the same
directory, a full disk (a 1 MiB tmpfs), permission denied (a child process without
CAP_DAC_OVERRIDE, since root ignores file modes), a read-only filesystem. After each,
nothing saved before is lost, and saving works again once the cause is gone.

Needs root (``mount``); CI and the development machines run as root.
"""

import contextlib
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxckpt
from jaxckpt import CheckpointManager, CheckpointPolicy
from jaxckpt import lock as lock_mod
from _util import KILLED_WRITER

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
TMP_GLOB = "*.orbax-checkpoint-tmp*"


def big(step, n=2_000_000):
    """Random (incompressible) values, the same for a step in every process."""
    return np.asarray(jax.random.normal(jax.random.key(step), (n,)))


@contextlib.contextmanager
def spawn(code, *args, prefix=()):
    """A child Python running ``code``; killed (if still running) when the block ends."""
    with subprocess.Popen([*prefix, sys.executable, "-c", textwrap.dedent(code),
                           *map(str, args)], env=ENV, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            yield proc
        finally:
            proc.kill()
            proc.communicate()


def read_line(proc, prefix, timeout=60):
    """The first stdout line starting with ``prefix`` (the child's progress report)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(prefix):
            return line[len(prefix):].strip()
    proc.kill()
    raise AssertionError(f"child never printed {prefix!r}: {proc.stderr.read()[-3000:]}")


def restorable(directory, expected):
    """Every checkpoint verifies (checksums) and holds the values it was saved with."""
    with CheckpointManager(directory, read_only=True) as m:
        assert m.steps() == sorted(expected)
        assert m.verify() == {s: [] for s in expected}
        for step, values in expected.items():
            assert np.array_equal(m.restore(step)["x"], values), step


@contextlib.contextmanager
def mounted(path, *options):
    path.mkdir(exist_ok=True)
    subprocess.run(["mount", *options, str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def tmpfs(path, size):
    return mounted(path, "-t", "tmpfs", "-o", f"size={size}", "tmpfs")


# -- kill -9 during an async write ----------------------------------------------------------



def test_kill_9_during_async_write_leaves_only_complete_checkpoints(tmp_path_factory):
    for _ in range(5):  # a kill that lands just after Orbax's rename proves nothing: again
        tmp_path = tmp_path_factory.mktemp("killed")
        with spawn(KILLED_WRITER, tmp_path) as proc:
            read_line(proc, "COMMITTED")
            # Kill once a write is under way: its data files exist, Orbax has not renamed it.
            pattern = str(tmp_path / TMP_GLOB / "state" / "**" / "d" / "*")
            while not glob.glob(pattern, recursive=True):
                assert proc.poll() is None, proc.stderr.read()[-3000:]
                time.sleep(0.001)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        half_written = glob.glob(str(tmp_path / TMP_GLOB))
        if half_written:
            break
    assert half_written, os.listdir(tmp_path)
    owner = json.loads((tmp_path / "jaxckpt.lock").read_text())
    assert owner["pid"] == proc.pid  # it died holding the lock

    with CheckpointManager(tmp_path, read_only=True) as m:  # readers ignore the tmp dir
        steps = m.steps()
        in_flight = {int(os.path.basename(p).split(".")[0]) for p in half_written}
        assert steps and max(steps) < min(in_flight)
        assert all(not problems for problems in m.verify().values())
        assert np.array_equal(m.restore("latest")["x"], big(steps[-1]))
    assert glob.glob(str(tmp_path / TMP_GLOB)) == half_written  # read_only cleans nothing

    with pytest.warns(UserWarning, match=rf"stale lock .* pid {proc.pid}.* no longer running"):
        m = CheckpointManager(tmp_path, CheckpointPolicy(keep_latest=2))
    with m:
        assert m.steps() == steps
        m.save(steps[-1] + 1, {"x": big(steps[-1] + 1)})
        m.wait()
        assert glob.glob(str(tmp_path / TMP_GLOB)) == []  # the next writer cleaned up
    restorable(tmp_path, {s: big(s) for s in (steps[-1], steps[-1] + 1)})


# -- one writer per directory ---------------------------------------------------------------

HOLDER = """
    import sys, jax.numpy as jnp, jaxckpt
    m = jaxckpt.CheckpointManager(sys.argv[1])
    m.save(1, {"x": jnp.arange(3.0)})
    m.wait()
    print("HOLDING", flush=True)
    sys.stdin.readline()
    m.close()
    print("CLOSED", flush=True)
"""


def test_second_run_is_refused_while_the_first_lives(tmp_path):
    with spawn(HOLDER, tmp_path) as proc:
        read_line(proc, "HOLDING")
        with pytest.raises(jaxckpt.DirectoryLockedError) as err:
            CheckpointManager(tmp_path)
        msg = str(err.value)
        for part in (f"host {socket.gethostname()}", f"pid {proc.pid}", "last heartbeat",
                     "read_only=True", "another directory"):
            assert part in msg, msg
        assert sorted(os.listdir(tmp_path)) == ["1", "jaxckpt.json", "jaxckpt.lock"]
        with CheckpointManager(tmp_path, read_only=True) as m:  # readers never lock
            assert m.steps() == [1]
        proc.stdin.write("close\n")
        proc.stdin.flush()
        read_line(proc, "CLOSED")
    assert not (tmp_path / "jaxckpt.lock").exists()  # released on close()
    with CheckpointManager(tmp_path) as m:
        m.save(2, {"x": jnp.arange(3.0)})


def test_same_process_second_writer_refused_until_closed(tmp_path):
    first = CheckpointManager(tmp_path)
    with pytest.raises(jaxckpt.DirectoryLockedError, match="in this process.*close"):
        CheckpointManager(tmp_path)
    first.close()
    second = CheckpointManager(tmp_path)
    owner = json.loads((tmp_path / "jaxckpt.lock").read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    del second  # dropped without close(): the lock goes with it
    import gc
    gc.collect()
    CheckpointManager(tmp_path).close()
    assert not (tmp_path / "jaxckpt.lock").exists()


def test_a_failed_open_leaves_no_lock(tmp_path):
    with pytest.raises(TypeError, match="CheckpointPolicy"):
        CheckpointManager(tmp_path, policy="val_loss")
    assert not (tmp_path / "jaxckpt.lock").exists()
    with CheckpointManager(tmp_path) as m:
        m.save(1, {"x": jnp.zeros(2)})


def write_lock(directory, **fields):
    record = {"format": "jaxckpt-lock/1", "run_id": "other-run", "host": "other-host",
              "pid": 4242, "pid_ns": None, "pid_start": None, "started": time.time(),
              "heartbeat": time.time(), **fields}
    (directory / "jaxckpt.lock").write_text(json.dumps(record))


@pytest.mark.parametrize("fields, why", [
    ({"heartbeat": time.time() - 1000}, r"heartbeat is \d+ s old"),
    ({"host": socket.gethostname(), "pid_ns": lock_mod._pid_namespace(), "pid": 2 ** 22 + 7},
     r"process \d+ is no longer running"),
    ({"host": socket.gethostname(), "pid_ns": lock_mod._pid_namespace(), "pid": os.getppid(),
      "pid_start": 1.0}, "now belongs to another process"),
    ({"format": "garbage"}, "unreadable"),
], ids=["old-heartbeat", "dead-pid", "reused-pid", "garbage"])
def test_stale_lock_is_taken_over_with_a_warning(tmp_path, fields, why):
    write_lock(tmp_path, **fields)
    old = time.time() - 2 * lock_mod.STALE_AFTER_S  # an unreadable lock is judged by its age
    os.utime(tmp_path / "jaxckpt.lock", (old, old))
    with pytest.warns(UserWarning, match=why):
        m = CheckpointManager(tmp_path)
    with m:
        assert json.loads((tmp_path / "jaxckpt.lock").read_text())["run_id"] == m._dirlock.run_id
        m.save(1, {"x": jnp.zeros(2)})


def test_live_lock_of_another_host_is_respected(tmp_path):
    write_lock(tmp_path)
    with pytest.raises(jaxckpt.DirectoryLockedError,
                       match="run other-run on host other-host, pid 4242, last heartbeat 0 s"):
        CheckpointManager(tmp_path)
    assert json.loads((tmp_path / "jaxckpt.lock").read_text())["run_id"] == "other-run"
    assert [p for p in os.listdir(tmp_path) if p != "jaxckpt.lock"] == []  # nothing touched


def test_heartbeat_refreshes_and_a_lost_lock_stops_the_writer(tmp_path, monkeypatch):
    monkeypatch.setattr(lock_mod, "HEARTBEAT_S", 0.05)
    m = CheckpointManager(tmp_path)
    m.save(1, {"x": jnp.zeros(2)})
    first = json.loads((tmp_path / "jaxckpt.lock").read_text())["heartbeat"]
    deadline = time.monotonic() + 30
    while json.loads((tmp_path / "jaxckpt.lock").read_text())["heartbeat"] == first:
        assert time.monotonic() < deadline, "the heartbeat never moved"
        time.sleep(0.02)
    write_lock(tmp_path)  # another run took the directory over (we looked hung)
    while m._dirlock._lost is None:
        assert time.monotonic() < deadline, "the lost lock was never noticed"
        time.sleep(0.02)
    with pytest.raises(jaxckpt.DirectoryLockedError, match="lost the lock .* other-host"):
        m.save(2, {"x": jnp.zeros(2)})
    with pytest.raises(jaxckpt.DirectoryLockedError):
        m.close()
    assert json.loads((tmp_path / "jaxckpt.lock").read_text())["run_id"] == "other-run"
    restorable(tmp_path, {1: np.zeros(2)})


# -- storage faults -----------------------------------------------------------------------


def test_disk_full_mid_write_then_bigger_disk(tmp_path, caplog):
    """A 1 MiB tmpfs: the 8 MB write fills it mid-way (real ENOSPC in Orbax's writer).
    The error names the fix; the failed write's temporary directory is removed at once
    (it stayed for the rest of the run), and Orbax's log keeps one line per thread that
    failed, without the tracebacks (three failed saves printed 1,383 lines)."""
    with tmpfs(tmp_path / "disk", "1m") as disk:
        with CheckpointManager(disk / "ckpt", CheckpointPolicy(keep_latest=1)) as m:
            m.save(1, {"x": np.arange(10.0)})
            m.wait()
            caplog.clear()
            m.save(2, {"x": big(2)})
            with pytest.raises(jaxckpt.CheckpointWriteError) as err:
                m.wait()
            msg = str(err.value)
            assert str(disk / "ckpt") in msg and "No space left on device" in msg, msg
            assert "The disk is full: free space" in msg, msg
            assert sorted(p.name for p in (disk / "ckpt").iterdir()) == [
                "1", "jaxckpt.json", "jaxckpt.lock"]
            orbax = [r for r in caplog.records if r.name == "absl"]
            assert any("_SignalingThread.run() raised" in r.getMessage() for r in orbax)
            assert [r.getMessage()[:80] for r in orbax if r.exc_info] == []
            assert m.steps() == [1]
            assert m.verify() == {1: []}
            assert np.array_equal(m.restore(1)["x"], np.arange(10.0))
            subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
            m.save(2, {"x": big(2)})  # the same step again: the failed write left no trace
            m.wait()
            assert m.steps() == [2]  # step 1 deleted only now that 2 is committed
        restorable(disk / "ckpt", {2: big(2)})


def test_a_save_refused_for_an_earlier_failure_is_not_in_the_history_as_saved(tmp_path):
    """The failure of step 2's background write is raised by save(3): neither step may
    then count as saved in the history (nor in the next manager's ledger)."""
    with tmpfs(tmp_path / "disk", "1m") as disk:
        with CheckpointManager(disk / "ckpt", CheckpointPolicy(keep_latest=1)) as m:
            m.save(1, {"x": np.arange(10.0)}, metrics={"loss": 1.0})
            m.wait()
            m.save(2, {"x": big(2)}, metrics={"loss": 0.5})
            with pytest.raises(jaxckpt.CheckpointWriteError, match="No space left"):
                m.save(3, {"x": np.arange(30.0)}, metrics={"loss": 0.25})
            saved = {e["step"]: e["saved"] for e in m.entries()}
            assert saved.get(1) is True and saved.get(2) is False and saved.get(3) in (None,
                                                                                      False)
            assert m.steps() == [1]
        with CheckpointManager(disk / "ckpt", read_only=True) as m:
            assert {e["step"] for e in m.entries() if e["saved"]} == {1}


def test_a_save_with_a_leaf_that_cannot_be_saved_records_no_saved_step(tmp_path):
    with CheckpointManager(tmp_path, CheckpointPolicy(keep_latest=2)) as m:
        m.save(1, {"x": np.arange(3.0)})
        with pytest.raises(TypeError, match="name"):
            m.save(2, {"x": np.arange(3.0), "name": "run-1"})
        for empty in ({}, {"opt": None}, []):
            with pytest.raises(ValueError, match="has no arrays or numbers.*pass the train"):
                m.save(2, empty)
        assert [e["step"] for e in m.entries() if e["saved"]] == [1]
        m.save(2, {"x": np.arange(3.0) + 1})  # the same step, now saveable
        assert m.steps() == [1, 2]


def test_disk_already_full_then_space_freed(tmp_path):
    with tmpfs(tmp_path / "disk", "2m") as disk:
        with CheckpointManager(disk / "ckpt", CheckpointPolicy(keep_latest=2)) as m:
            m.save(1, {"x": np.arange(10.0)})
            m.wait()
            ballast = disk / "ballast"
            with open(ballast, "wb") as f, pytest.raises(OSError, match="No space left"):
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            with pytest.raises(jaxckpt.CheckpointWriteError, match="No space left on device"):
                m.save(2, {"x": np.arange(20.0)})
                m.wait()
            assert m.steps() == [1]
            ballast.unlink()
            m.save(3, {"x": np.arange(30.0)})
            m.wait()
        restorable(disk / "ckpt", {1: np.arange(10.0), 3: np.arange(30.0)})


def test_the_check_before_each_save_names_each_cause_and_makes_nothing(tmp_path):
    """save() checks a local directory before Orbax makes the step directory in the
    background, from metadata alone (a mkdir waits for the ext4 journal: up to 340 ms
    beside a checkpoint's writeback). Each cause comes out as the OSError mkdir raises."""
    import errno

    from jaxckpt.storage import check_writable

    ok = tmp_path / "ok"
    ok.mkdir()
    check_writable(ok)
    assert os.listdir(ok) == []
    with pytest.raises(FileNotFoundError):
        check_writable(tmp_path / "gone")
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError) as e:
        check_writable(tmp_path / "file")
    assert e.value.errno == errno.ENOTDIR
    with tmpfs(tmp_path / "disk", "1m") as disk:
        check_writable(disk)
        with open(disk / "ballast", "wb", buffering=0) as f, \
                pytest.raises(OSError, match="No space left"):
            while True:
                f.write(b"\0" * 4096)  # page by page: no free block left
        with pytest.raises(OSError, match="No space left on device") as e:
            check_writable(disk)
        assert e.value.errno == errno.ENOSPC and e.value.filename == str(disk)
    ro = tmp_path / "ro"
    ro.mkdir()
    with mounted(ro, "--bind", str(ro)):
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        with pytest.raises(OSError, match="Read-only file system"):
            check_writable(ro)


def test_read_only_filesystem_then_writable_again(tmp_path):
    d = tmp_path / "ckpt"
    with CheckpointManager(d, CheckpointPolicy(keep_latest=3)) as m:
        m.save(1, {"x": np.arange(10.0)})
        m.wait()
        with mounted(d, "--bind", str(d)):
            subprocess.run(["mount", "-o", "remount,bind,ro", str(d)], check=True)
            with pytest.raises(jaxckpt.CheckpointWriteError,
                               match=rf"{d}.*Read-only file system"):
                m.save(2, {"x": np.arange(20.0)})
                m.wait()
            assert m.steps() == [1] and m.verify() == {1: []}
            subprocess.run(["mount", "-o", "remount,bind,rw", str(d)], check=True)
            m.save(3, {"x": np.arange(30.0)})
            m.wait()
    restorable(d, {1: np.arange(10.0), 3: np.arange(30.0)})


# Root ignores file modes; a root process without CAP_DAC_OVERRIDE (and friends) does not.
WITHOUT_DAC_OVERRIDE = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]


SAVE_THEN_FAIL = """
    import sys, numpy as np, jaxckpt
    d, ro = sys.argv[1], sys.argv[2]
    try:
        jaxckpt.CheckpointManager(ro + "/ckpt")
    except jaxckpt.CheckpointDirectoryError as e:
        print("OPEN", e, flush=True)
    m = jaxckpt.CheckpointManager(d, jaxckpt.CheckpointPolicy(keep_latest=3))
    m.save(1, {"x": np.arange(10.0)})
    m.wait()
    print("SAVED 1", flush=True)
    sys.stdin.readline()  # the parent takes the write permission away
    try:
        m.save(2, {"x": np.arange(20.0)})
        m.wait()
        print("NO ERROR", flush=True)
    except jaxckpt.CheckpointWriteError as e:
        print("ERROR", str(e).replace("\\n", " "), flush=True)
"""
PERMISSION_CHILD = SAVE_THEN_FAIL + """
    print("STEPS", m.steps(), m.verify(), flush=True)
    sys.stdin.readline()  # the parent gives it back
    m.save(3, {"x": np.arange(30.0)})
    m.close()
    print("SAVED 3", flush=True)
"""


def test_permission_denied_then_granted_again(tmp_path):
    d, ro = tmp_path / "ckpt", tmp_path / "ro"
    ro.mkdir(mode=0o555)
    ro.chmod(0o555)
    with spawn(PERMISSION_CHILD, d, ro, prefix=WITHOUT_DAC_OVERRIDE) as proc:
        assert "Permission denied" in read_line(proc, "OPEN")
        read_line(proc, "SAVED 1")
        d.chmod(0o555)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        error = read_line(proc, "ERROR")
        assert str(d) in error and "Permission denied" in error, error
        assert read_line(proc, "STEPS") == "[1] {1: []}"
        d.chmod(0o755)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        read_line(proc, "SAVED 3")
    restorable(d, {1: np.arange(10.0), 3: np.arange(30.0)})


def test_a_failed_background_delete_names_the_step_and_the_file(tmp_path):
    """A replaced step that cannot be deleted (its files read-only to a process without
    root's file capabilities): the error says what was deleted and which file refused."""
    d = tmp_path / "ckpt"
    with CheckpointManager(d, CheckpointPolicy(keep_latest=1)) as m:
        m.save(1, {"x": np.arange(3.0)})
    subprocess.run(["chmod", "-R", "a-w", str(d / "1")], check=True)
    code = textwrap.dedent(f"""
        import numpy as np, jaxckpt
        try:
            with jaxckpt.CheckpointManager({str(d)!r}, jaxckpt.CheckpointPolicy(keep_latest=1)) as m:
                m.save(2, {{"x": np.arange(3.0)}})
                m.wait()
        except jaxckpt.CheckpointWriteError as e:
            print("ERROR", e)
    """)
    drop = "-dac_override,-dac_read_search,-fowner"
    try:
        out = subprocess.run(["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}",
                              sys.executable, "-c", code], capture_output=True, text=True,
                             env=ENV, timeout=120)
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(d)], check=True)
    line = next((x for x in out.stdout.splitlines() if x.startswith("ERROR")), "")
    assert f"deleting checkpoint 1 ({d / '1'})" in line, out.stdout + out.stderr[-2000:]
    assert "Permission denied: '" in line and "intact ([2])" in line, line
    with CheckpointManager(d, read_only=True) as m:
        assert m.steps() == [2]


# A script that gives up after the error, without closing the manager.
UNCLOSED_CHILD = SAVE_THEN_FAIL + """
    raise SystemExit(3)
"""


def test_a_process_that_gives_up_after_a_failed_save_exits_at_once(tmp_path):
    """Orbax makes the step directory in the background; when that fails its writer thread
    waits 300 s for it, and the interpreter's exit with it (a script ending on the error
    hung for five minutes). save() checks the directory first and raises at once. A hang
    shows here as the child outliving the timeout."""
    d, ro = tmp_path / "ckpt", tmp_path / "ro"
    ro.mkdir(mode=0o555)
    with spawn(UNCLOSED_CHILD, d, ro, prefix=WITHOUT_DAC_OVERRIDE) as proc:
        read_line(proc, "SAVED 1")
        d.chmod(0o555)
        try:
            proc.stdin.write("go\n")
            proc.stdin.flush()
            error = read_line(proc, "ERROR")
            assert error and "Permission denied" in error, error
            assert proc.wait(timeout=120) == 3  # 300 s when the writer thread waits
        finally:
            d.chmod(0o755)
    restorable(d, {1: np.arange(10.0)})
