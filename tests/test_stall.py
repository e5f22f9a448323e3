"""A store that stalls mid-run: after a writer opened a ``gs://`` directory and committed
checkpoints, the store accepts connections and never answers.

The writer runs in a subprocess that reaches the GCS emulator (the ``gcs`` fixture) only
through :class:`StallingProxy`, a TCP relay in this process that the test turns into a
store that never answers at a chosen request: first Orbax's upload of a checkpoint's
arrays, then the background deletion of the checkpoint a newer one replaced (the case that
hung ``save()`` forever). What is in the bucket is then read directly from the emulator,
never through the proxy.
"""

import json
import queue
import re
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import numpy as np
import pytest

from jaxckpt import CheckpointManager, CheckpointPolicy

DEADLINE_S = 2.0
"""The writer's ``storage_timeout_s``; every bound below is a multiple, as a hang detector."""
HANG_BOUND_S = 10 * DEADLINE_S


class StallingProxy:
    """A TCP relay to ``upstream`` that can stop answering, as a stalled store does.

    Once stalled, it accepts new connections and never answers them, and forwards nothing
    more on the connections it holds (they stay open and silent). ``arm_on(pattern)``
    stalls it at the first request that matches, before forwarding it.
    ``resume()`` closes every silent connection and relays new ones again.
    """

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.stalled = threading.Event()
        self._trigger: re.Pattern | None = None
        self._lock = threading.Lock()
        self._held: list[socket.socket] = []
        self._closing = threading.Event()
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True, name="proxy-accept").start()

    def arm_on(self, request: re.Pattern) -> None:
        self._trigger = request

    def resume(self) -> None:
        with self._lock:
            self.stalled.clear()
            self._trigger = None
            held, self._held = self._held, []
        for s in held:
            s.close()

    def close(self) -> None:
        self._closing.set()
        self.resume()
        self._server.close()

    def _hold(self, *socks: socket.socket) -> None:
        with self._lock:
            self._held.extend(socks)

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._server.accept()
            except (TimeoutError, OSError):
                continue
            if self.stalled.is_set():
                self._hold(client)
                continue
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._relay, args=(client, upstream), daemon=True,
                             name="proxy-relay").start()

    def _relay(self, client: socket.socket, upstream: socket.socket) -> None:
        peer = {client: upstream, upstream: client}
        try:
            while not self._closing.is_set():
                if self.stalled.is_set():
                    self._hold(client, upstream)  # silent until resume() closes them
                    return
                ready, _, _ = select.select([client, upstream], [], [], 0.1)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        raise ConnectionError
                    trigger = self._trigger
                    if s is client and trigger is not None and trigger.match(data):
                        self.stalled.set()  # this request is never forwarded
                        self._hold(client, upstream)
                        return
                    peer[s].sendall(data)
        except OSError:
            client.close()
            upstream.close()


def state(step: int) -> dict:
    """The state saved at ``step`` (the writer's ``state`` is the same function)."""
    return {"w": np.random.default_rng(step).standard_normal((64, 64)).astype(np.float32),
            "b": np.full((8,), step, np.int32)}


SERVE = """
    for line in sys.stdin:  # one JSON answer per command
        name, *args = line.split()
        t = time.monotonic()
        try:
            out = {"result": calls[name](*args), "error": None}
        except Exception as e:
            out = {"result": None, "error": f"{type(e).__name__}: {e}"}
        print(json.dumps({"call": line.strip(), "s": time.monotonic() - t, **out}), flush=True)
"""
"""The command loop of a subprocess script (``calls``: name -> function)."""

WRITER = """
    import faulthandler, json, logging, signal, sys, time
    import numpy as np
    import gcsfs  # up front: a cold import on two busy cores can outlast the deadline
    import jaxckpt
    from jaxckpt import lock

    faulthandler.register(signal.SIGUSR1)  # the test asks where a hung writer hangs
    lock.HEARTBEAT_S, lock.STALE_AFTER_S = 0.5, 8.0  # a heartbeat waits stale/4 = 2 s

    heartbeat_warnings = []
    class Collect(logging.Handler):
        def emit(self, record):
            if "refreshing the lock" in record.getMessage():
                heartbeat_warnings.append(record.getMessage())
    logging.getLogger("jaxckpt").addHandler(Collect(logging.WARNING))

    def state(step):
        return {"w": np.random.default_rng(step).standard_normal((64, 64)).astype(np.float32),
                "b": np.full((8,), step, np.int32)}

    directory, deadline = sys.argv[1], float(sys.argv[2])
    m = jaxckpt.CheckpointManager(directory, jaxckpt.CheckpointPolicy(keep_latest=1),
                                  storage_timeout_s=deadline)
    calls = {"save": lambda step: m.save(int(step), state(int(step))), "wait": m.wait,
             "close": m.close, "steps": m.steps, "heartbeat": lambda: heartbeat_warnings}
"""


def _stop(proc) -> str:
    """Stop the writer if it still runs, its threads' stacks dumped first; its stderr."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(1)
        proc.kill()
        proc.wait()
    return proc.stderr.read() if not proc.stderr.closed else ""


class Writer:
    """The writer subprocess: ``call("save 3")`` answers within ``timeout`` s, or fails
    the test (a hang) with the writer's stacks."""

    def __init__(self, directory: str, env: dict, script: str = WRITER):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(script) + textwrap.dedent(SERVE), directory,
             str(DEADLINE_S)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=env)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.lines.put(json.loads(line))
        self.lines.put(None)

    def call(self, command: str, timeout: float = HANG_BOUND_S) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        try:
            answer = self.lines.get(timeout=timeout)
        except queue.Empty:
            answer = None
        if answer is None:
            raise AssertionError(f"{command!r}: no answer within {timeout:.0f} s (a hang), or "
                                 f"the writer died; its stderr:\n{_stop(self.proc)[-8000:]}")
        return answer

    def ok(self, command: str, timeout: float = HANG_BOUND_S):
        answer = self.call(command, timeout)
        assert answer["error"] is None, answer
        return answer["result"]

    def ok_unstalled(self, command: str, timeout: float = HANG_BOUND_S):
        """``ok`` for a call that may be repeated (``wait``, ``steps``, a restore), made
        while the store answers: on a loaded 2-core host a request the emulator answers
        late can pass the test's 2 s deadline (seen: the deletion of checkpoint 1 in the
        set-up). Such a call is asked again, up to 5 times; any other error fails."""
        for _ in range(5):
            answer = self.call(command, timeout)
            if answer["error"] is None or "did not finish" not in answer["error"]:
                break
        assert answer["error"] is None, answer
        return answer["result"]

    def exit(self) -> int:
        self.proc.stdin.close()
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError("the writer did not exit; its stderr:\n"
                                 + _stop(self.proc)[-8000:]) from None


def stalled(answer: dict, directory: str) -> str:
    """The error of a call that met the stalled store, checked to be prompt and named."""
    error = answer["error"]
    assert error is not None and answer["s"] < HANG_BOUND_S, answer
    assert directory in error and f"did not finish within {DEADLINE_S:.0f} s" in error, answer
    return error


def restores_exactly(directory: str, committed: list[int]) -> list[int]:
    """Steps in ``directory`` (read without the proxy); each restores to ``state(step)``."""
    with CheckpointManager(directory, read_only=True) as m:
        steps = m.steps()
        for step in steps:
            restored = m.restore(step)
            assert set(restored) == {"w", "b"}, restored
            for key, value in state(step).items():
                assert np.array_equal(restored[key], value), (step, key)
        for step in committed:
            assert m.verify(step) == {step: []}
    return steps


def objects_of(prefix: str, steps: list[int], method: str = "[A-Z]+") -> re.Pattern:
    """A request naming an object of one of ``steps`` (gcsfs and tensorstore both escape
    the ``/`` of object names: ``<prefix>%2F<step>%2F<file>``)."""
    step = "|".join(map(str, steps))
    return re.compile(f"{method} \\S*{re.escape(prefix)}%2F({step})%2F".encode())


# The stalled writer could not remove its lock (unless its late removal won the race with
# its exit); the new writer then takes it over, its process being gone, with a warning.
@pytest.mark.filterwarnings("ignore:taking over the stale lock")
def test_a_store_stalling_mid_run_raises_past_the_deadline_and_loses_nothing(gcs):
    prefix = f"stall-{uuid.uuid4().hex[:8]}"
    directory = gcs.gs(prefix)
    proxy = StallingProxy(("127.0.0.1", gcs.port))
    writer = Writer(directory, {**gcs.subprocess_env(), "JAX_PLATFORMS": "cpu",
                                "STORAGE_EMULATOR_HOST": proxy.url,
                                "TENSORSTORE_GCS_HTTP_URL": proxy.url})
    try:
        for step in (1, 2):
            writer.ok(f"save {step}", timeout=120)  # the first call waits for the start-up
            writer.ok_unstalled("wait")
        assert writer.ok_unstalled("steps") == [2]

        # 1. Orbax's write of checkpoint 3 meets a store that stopped answering.
        proxy.arm_on(objects_of(prefix, [3]))
        writer.ok("save 3")  # asynchronous: Orbax writes in the background
        error = stalled(writer.call("wait"), directory)
        assert f"writing checkpoint 3 to {directory}/3" in error
        stalled(writer.call("save 4"), directory)
        assert proxy.stalled.is_set()
        # The store answers again: the unfinished work goes on. It commits, or (a request
        # the stall cut can fail for good: the emulator forgets a resumable upload) it
        # fails and says so; either way the checkpoints on disk are intact.
        proxy.resume()
        answer = writer.call("wait")
        for _ in range(5):  # recovering (retries, backoff) may take more than a deadline
            if answer["error"] is None or "did not finish" not in answer["error"]:
                break
            answer = writer.call("wait")
        assert answer["error"] is None or "failed" in answer["error"], answer
        kept = writer.ok_unstalled("steps")
        assert kept in ([3], [2], [2, 3]) and (answer["error"] or kept == [3]), (answer, kept)

        # 2. The background deletion of what 5 replaces, once 5 is committed, meets the
        # stalled store.
        proxy.arm_on(objects_of(prefix, kept, method="DELETE"))
        writer.ok("save 5")
        error = stalled(writer.call("wait"), directory)
        assert f"deleting checkpoint {kept[0]} ({directory}/{kept[0]})" in error
        for command in ("save 6", "wait", "save 7", "close"):
            stalled(writer.call(command), directory)  # each names what stalled and where
        assert proxy.stalled.is_set()
        warnings = writer.ok("heartbeat")
        assert warnings and f"refreshing the lock {directory}/jaxckpt.lock" in warnings[0]
        proxy.resume()
        assert writer.exit() == 0, _stop(writer.proc)[-3000:]
    finally:
        proxy.close()
        _stop(writer.proc)

    # Nothing committed is lost: 5 restores exactly; the one before it, deleted by the
    # policy once 5 was committed, is gone or intact; nothing half-written is visible.
    steps = restores_exactly(directory, [5])
    assert 5 in steps and set(steps) <= {*kept, 5}, steps

    # A new writer opens the directory and saves again.
    with CheckpointManager(directory, CheckpointPolicy(keep_latest=1), storage_timeout_s=30) as m:
        assert m.latest_step() == 5
        m.save(8, state(8))
    assert restores_exactly(directory, [8]) == [8]


READER = """
    import json, sys, time
    import gcsfs  # up front: a cold import on two busy cores can outlast the deadline
    import jaxckpt

    directory, deadline = sys.argv[1], float(sys.argv[2])
    m = jaxckpt.CheckpointManager(directory, read_only=True, storage_timeout_s=deadline)
    calls = {"restore": lambda step: sorted(m.restore(int(step))), "steps": m.steps,
             "reload": m.reload, "verify": lambda: m.verify()}
"""


def test_a_reader_of_a_stalled_store_raises_past_the_deadline(gcs):
    directory = gcs.gs(f"stall-read-{uuid.uuid4().hex[:8]}")
    with CheckpointManager(directory, CheckpointPolicy(keep_latest=2)) as m:
        for step in (1, 2):
            m.save(step, state(step))
    proxy = StallingProxy(("127.0.0.1", gcs.port))
    reader = Writer(directory, {**gcs.subprocess_env(), "JAX_PLATFORMS": "cpu",
                                "STORAGE_EMULATOR_HOST": proxy.url,
                                "TENSORSTORE_GCS_HTTP_URL": proxy.url}, script=READER)
    try:
        assert reader.ok_unstalled("steps", timeout=120) == [1, 2]
        proxy.arm_on(re.compile(rb"(GET|HEAD) "))  # every read from now on
        for command in ("restore 2", "verify", "reload"):
            error = stalled(reader.call(command), directory)
            assert error.startswith("StorageTimeoutError"), error
        proxy.resume()
        assert reader.ok_unstalled("restore 2") == ["b", "w"]
        assert reader.exit() == 0, _stop(reader.proc)[-3000:]
    finally:
        proxy.close()
        _stop(reader.proc)
