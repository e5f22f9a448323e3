"""jaxckpt.hostmem: after a save, freed host memory stays mapped for the next buffers.

Each case runs in a fresh process (malloc's settings are process-wide and cannot be read
back) and counts page faults, which the kernel counts exactly, rather than timing.
"""

import json
import os
import subprocess
import sys

import pytest

# Eight 4 MiB blocks allocated, touched and freed, four times over with glibc's malloc:
# the minor page faults of each round. With malloc's defaults every round faults every
# page in again (the freed 32 MiB at the heap's top exceeds the trim threshold).
PROBE = """
import ctypes, json, resource, sys
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
{setup}
def round_faults(n=8, size=4 << 20):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(size) for _ in range(n)]
    for b in blocks:
        ctypes.memset(b, 1, size)
    for b in blocks:
        libc.free(b)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
if {in_thread}:  # one thread, so one malloc arena other than the main one
    import threading
    faults = []
    t = threading.Thread(target=lambda: faults.extend(round_faults(**{sizes}) for _ in range(4)))
    t.start()
    t.join()
else:
    faults = [round_faults(**{sizes}) for _ in range(4)]
print(json.dumps({{"faults": faults, "out": out}}))
"""
PAGES = 8 * (4 << 20) // 4096

pytestmark = pytest.mark.skipif(
    not hasattr(os, "confstr") or sys.platform != "linux", reason="glibc's malloc only")


def _probe(setup: str, in_thread: bool = False, sizes: dict | None = None,
           **env: str) -> dict:
    full = {k: v for k, v in os.environ.items()
            if k != "JAXCKPT_KEEP_HOST_PAGES" and not k.startswith("MALLOC_")}
    code = PROBE.format(setup=setup, in_thread=in_thread, sizes=sizes or {})
    proc = subprocess.run([sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=300, env={**full, **env})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


KEEP = ("from jaxckpt import hostmem\n"
        "out = [hostmem.keep_freed_pages(32 << 20), hostmem.kept_bytes()]")


def test_defaults_fault_every_round_in_again():
    """The baseline the module exists for (and the probe's own check: it can fail)."""
    got = _probe("out = None")
    assert all(f > PAGES // 2 for f in got["faults"]), got


def test_keep_freed_pages_reuses_the_freed_memory():
    got = _probe(KEEP)
    assert got["out"] == [True, 64 << 20]
    assert got["faults"][0] > PAGES // 2  # the first round maps the memory
    assert all(f < PAGES // 20 for f in got["faults"][1:]), got


# Twenty-four 10 MiB blocks from a thread's arena: they span several of its heaps
# (64 MiB each), and glibc unmaps a thread heap as soon as it is entirely free, whatever
# the trim threshold. XLA's CPU threads allocate a state's buffers so.
THREAD_BLOCKS = {"n": 24, "size": 10 << 20}
THREAD_PAGES = THREAD_BLOCKS["n"] * THREAD_BLOCKS["size"] // 4096


def test_a_thread_arena_faults_every_round_in_again_by_default():
    """The probe's own check (it can fail). Measured with the trim threshold raised but no
    top pad as well: every round after the first faulted 180 of its 240 MiB in again."""
    got = _probe("out = None", in_thread=True, sizes=THREAD_BLOCKS)
    assert all(f > THREAD_PAGES // 2 for f in got["faults"]), got


def test_keep_freed_pages_keeps_a_thread_arenas_heaps():
    setup = ("from jaxckpt import hostmem\n"
             "out = [hostmem.keep_freed_pages(256 << 20), hostmem.kept_bytes()]")
    got = _probe(setup, in_thread=True, sizes=THREAD_BLOCKS)
    assert got["out"] == [True, 512 << 20]
    assert got["faults"][0] > THREAD_PAGES // 2  # the first round maps the memory
    assert all(f < THREAD_PAGES // 20 for f in got["faults"][1:]), got


@pytest.mark.parametrize("env", [{"JAXCKPT_KEEP_HOST_PAGES": "0"},
                                 {"MALLOC_TRIM_THRESHOLD_": "131072"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}])
def test_left_alone_when_switched_off_or_tuned_by_the_user(env):
    got = _probe(KEEP, **env)
    assert got["out"] == [False, 0]
    assert all(f > PAGES // 2 for f in got["faults"][1:]), got


def test_threshold_only_grows():
    setup = ("from jaxckpt import hostmem\n"
             "out = [hostmem.keep_freed_pages(n) and hostmem.kept_bytes()\n"
             "       for n in (1 << 20, 64 << 20, 16 << 20, 1 << 40)]")
    assert _probe(setup)["out"] == [32 << 20, 128 << 20, 128 << 20, 2**31 - 1]


def test_a_save_keeps_the_pages_of_its_state(tmp_path):
    """A manager's save sets it for its state's size."""
    setup = """
import jax.numpy as jnp
import jaxckpt
from jaxckpt import hostmem
state = {{"w": jnp.ones((5 << 20,), jnp.float32), "b": jnp.zeros((3,), jnp.float32)}}
m = jaxckpt.CheckpointManager({where!r}, jaxckpt.CheckpointPolicy(keep_latest=1))
before = hostmem.kept_bytes()
m.save(1, state)
m.close()
out = [before, hostmem.kept_bytes()]
"""
    got = _probe(setup.format(where=str(tmp_path / "on")))
    assert got["out"] == [0, 2 * ((5 << 20) * 4 + 12)]
    assert all(f < PAGES // 20 for f in got["faults"][1:]), got
    off = _probe(setup.format(where=str(tmp_path / "off")), JAXCKPT_KEEP_HOST_PAGES="0")
    assert off["out"] == [0, 0]
    assert all(f > PAGES // 2 for f in off["faults"][1:]), off
