"""A writer killed with SIGKILL at random moments (issue 12): after each kill every reader
lists only complete checkpoints, latest and best restore exactly what was saved, the next
writer leaves nothing that is neither a checkpoint nor the library's own file, and no
disk is leaked.

``JAXCKPT_KILLS`` sets the number of kills (default 4 for CI; the slow run uses 40).
"""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np

from jaxckpt import CheckpointManager, CheckpointPolicy
from jaxckpt import format as fmt

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
KILLS = int(os.environ.get("JAXCKPT_KILLS", "4"))
N = 4_000_000  # 32 MB of float64 per checkpoint
POLICY = CheckpointPolicy(monitor="val_loss", mode="min", keep_best=1, keep_latest=1)

WRITER = f"""
    import sys, numpy as np, jaxckpt
    policy = jaxckpt.CheckpointPolicy(monitor="val_loss", mode="min", keep_best=1,
                                      keep_latest=1)
    with jaxckpt.CheckpointManager(sys.argv[1], policy) as m:
        start = (m.latest_step() or 0) + 1
        print("START", start, flush=True)
        for step in range(start, start + 10_000):
            m.save(step, {{"x": np.random.default_rng(step).standard_normal({N})}},
                   metrics={{"val_loss": float((step * 7919) % 101)}})
"""


def expected(step):
    return np.random.default_rng(step).standard_normal(N)


def val_loss(step):
    return float((step * 7919) % 101)


def disk_usage(d):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)


def check_directory(d):
    with CheckpointManager(d, read_only=True) as m:
        steps = m.steps()
        assert steps, "no checkpoint survived"
        assert all(v.ok for s, v in m.verdicts().items() if s in steps)
        latest, best = m.restore_checkpoint("latest"), m.restore_checkpoint("best")
        assert latest.step == steps[-1]
        assert np.array_equal(latest.state["x"], expected(latest.step))
        assert np.array_equal(best.state["x"], expected(best.step))
        assert best.metrics["val_loss"] == val_loss(best.step)
        # best is the best of the steps that were ever kept: no later step beat it
        assert all(val_loss(s) >= val_loss(best.step) for s in steps)
    return steps


def test_random_sigkills_lose_nothing_and_leak_nothing(tmp_path):
    d = tmp_path / "c"
    rng = random.Random(0)
    for kill in range(KILLS):
        proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(WRITER), str(d)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=ENV)
        line = proc.stdout.readline()
        assert line.startswith("START"), proc.stderr.read()[-3000:]
        time.sleep(rng.uniform(0.5, 4.0))  # after a few saves, at a random moment
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        if not any(fmt.step_of(n) is not None for n in os.listdir(d)):
            continue  # killed before the first commit: nothing to check yet
        check_directory(d)
    # The next writer finishes what the kills left: only checkpoints and jaxckpt's files.
    with CheckpointManager(d) as m:
        steps = m.steps()
    names = set(os.listdir(d))
    assert names == {str(s) for s in steps} | {fmt.HISTORY_FILE}, names
    check_directory(d)
    # No leak: the directory holds the kept checkpoints and a little metadata.
    assert disk_usage(d) < len(steps) * (N * 8 + 200_000), (disk_usage(d), steps)
