"""Each kind of saver in a process of its own, driven one operation at a time.

Host memory settings, thread pools and caches belong to a process, not to a library:
jaxckpt keeps freed host memory mapped after a save (``jaxckpt.hostmem``: the step after
the next save does not fault the state's pages in again), and in a process shared with
raw Orbax that would speed Orbax's steps as well, so neither user's real cost would be
measured. A case therefore starts one worker per kind, "jaxckpt", "orbax" and "none" (the
loop without saves; it also measures the disk and the host copy), each with the same
state, and interleaves their operations: one at a time, the others idle.

The protocol is one JSON line each way on the worker's stdin and stdout (no pickle).
A worker's own progress messages are dropped; its stderr is the case's log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from typing import Any

from ckptbench import measure, phases, progress, savers, workload

REPLY = "@@reply "


class WorkerError(RuntimeError):
    pass


class Worker:
    """The parent's handle on one worker process."""

    def __init__(self, script: str, cfg: dict, kind: str):
        self.kind = kind
        self.info: dict = {}  # the worker's state and pid, once it answered ``info``
        env = {**os.environ, progress.QUIET_ENV: "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
        self._proc = subprocess.Popen(
            [sys.executable, script, "--worker", json.dumps(cfg | {"kind": kind})],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def call(self, op: str, **kwargs: Any) -> Any:
        """Run ``op`` (a function of ``phases``) in the worker; its result."""
        self._proc.stdin.write(json.dumps({"op": op, "kwargs": kwargs}) + "\n")
        self._proc.stdin.flush()
        for line in self._proc.stdout:
            if line.startswith(REPLY):
                reply = json.loads(line[len(REPLY):])
                if "error" in reply:
                    raise WorkerError(f"{self.kind} worker, {op}: {reply['error']}")
                return reply["result"]
        raise WorkerError(f"{self.kind} worker exited (code {self._proc.wait()}) during {op}")

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.stdin.close()  # end of input: the worker cleans up and exits
                self._proc.wait(timeout=120)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()


def start(script: str, cfg: dict, kinds: tuple[str, ...]) -> dict[str, Worker]:
    """One worker per kind, started together (each builds its state and compiles); each
    is ready once it answers ``info``."""
    workers = {k: Worker(script, cfg, k) for k in kinds}
    try:
        for w in workers.values():
            w.info = w.call("info")
    except BaseException:
        close_all(workers)
        raise
    return workers


def close_all(workers: dict[str, Worker]) -> None:
    for w in workers.values():
        w.close()


OPS = {name: getattr(phases, name) for name in (
    "period", "first_save", "warm", "blocking_save", "idle_write", "disk_write",
    "disk_read", "remove", "bytes_on_disk", "before_reads", "cold_restore",
    "warm_restore_and_verify", "leaf_save", "leaf_restore")}


def _info(ctx: phases.Context) -> dict:
    w = ctx.w
    return {"state_bytes": w.state_bytes, "n_leaves": w.n_leaves, "model": w.model,
            "platform": w.platform, "pid": os.getpid()}


def _step_time(ctx: phases.Context, interval_s: float) -> float:
    return phases.step_time(ctx.w, interval_s)


def _set_every(ctx: phases.Context, every: int) -> None:
    ctx.every = every


def _sync_saves(ctx: phases.Context, directory: str) -> list[float]:
    saver = savers.JaxckptSaver(directory, async_save=False)
    try:
        return phases.sync_saves(ctx, saver)
    finally:
        saver.close()
        measure.rmtree(directory)


def _device_to_host(ctx: phases.Context) -> dict:
    out = phases.device_to_host(ctx)
    ctx.host = out.pop("host")  # kept here, for disk_write
    return out


OPS.update(info=_info, step_time=_step_time, set_every=_set_every, sync_saves=_sync_saves,
           device_to_host=_device_to_host)


def _workload(cfg: dict) -> workload.Workload:
    if cfg["job"] == "leaves":
        return workload.many_leaves(cfg["leaves"])
    return workload.mlp(cfg["size_mb"], cfg["layers"], cfg["batch"])


def _saver(kind: str, directory: str):
    if kind == "jaxckpt":
        return savers.JaxckptSaver(directory)
    if kind == "orbax":
        return savers.OrbaxSaver(directory)
    return None


def serve(cfg: dict) -> None:
    """The worker's side: build the state and the saver, then answer until stdin ends."""
    kind = cfg["kind"]
    w = _workload(cfg)
    w.run(2)  # compiled before the first timed operation
    saver = _saver(kind, f"{cfg['base']}/{kind}")
    ctx = phases.Context(w, {kind: saver} if saver else {}, every=1, rss=None,
                         prefault=cfg["prefault"])
    out = sys.stdout
    sys.stdout = sys.stderr  # anything else printed goes to the log, not the protocol
    try:
        for line in sys.stdin:
            req = json.loads(line)
            try:
                reply = {"result": OPS[req["op"]](ctx, **req["kwargs"])}
            except Exception as e:  # noqa: BLE001 - sent to the parent, which raises it
                traceback.print_exc()
                reply = {"error": f"{type(e).__name__}: {e}"}
            out.write(REPLY + json.dumps(reply, default=measure.json_default) + "\n")
            out.flush()
    finally:
        if saver is not None:
            saver.close()
