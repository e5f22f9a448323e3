"""In case of a system failure, not everything is lost: kill a run, restart it, compare.

    python examples/crash_and_resume.py --workdir /tmp/jaxckpt-crash

1. trains the digits example once without interruption (the reference);
2. starts the same run again elsewhere and kills it with SIGKILL mid-training, the way an
   out-of-memory killer or a lost machine would (no chance to clean up);
3. shows what survived on disk: only complete checkpoints;
4. reruns the same command, which resumes from the newest checkpoint;
5. checks that the final parameters, optimizer state and history are bitwise identical
   to the reference.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

import jaxckpt

HERE = os.path.dirname(os.path.abspath(__file__))


def command(workdir: str, epochs: int) -> list[str]:
    return [sys.executable, os.path.join(HERE, "fit_digits.py"), "--workdir", workdir,
            "--epochs", str(epochs), "--every-n-steps", "10", "--quiet"]


def kill_after_checkpoint(cmd: list[str], ckpt_dir: str, min_step: int) -> None:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    while True:
        steps = [int(n) for n in os.listdir(ckpt_dir) if n.isdigit()] \
            if os.path.isdir(ckpt_dir) else []
        if steps and max(steps) >= min_step:
            break
        if proc.poll() is not None:
            raise SystemExit("the run finished before it could be killed; use more epochs")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    print(f"killed the run with SIGKILL after step {max(steps)} was checkpointed")


def final(workdir: str):
    with jaxckpt.CheckpointManager(os.path.join(workdir, "checkpoints"), read_only=True) as m:
        return m.restore("latest"), m.history()


def main(argv=None) -> bool:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--epochs", type=int, default=6)
    args = p.parse_args(argv)
    reference, crashy = (os.path.join(args.workdir, n) for n in ("reference", "crashy"))

    print("1. reference run, never interrupted")
    subprocess.run(command(reference, args.epochs), check=True, stdout=subprocess.DEVNULL)

    print("2. the same run, killed mid-training")
    ckpt_dir = os.path.join(crashy, "checkpoints")
    kill_after_checkpoint(command(crashy, args.epochs), ckpt_dir, min_step=60)

    with jaxckpt.CheckpointManager(ckpt_dir, read_only=True) as m:
        print(f"3. on disk after the crash: checkpoints {m.steps()} (best {m.best_step()}, "
              f"latest {m.latest_step()}); a half-written one, if any, is ignored")

    print("4. rerun the same command")
    out = subprocess.run(command(crashy, args.epochs), check=True, capture_output=True,
                         text=True).stdout
    print("   " + next(line for line in out.splitlines() if line.startswith("resumed")))

    (a, hist_a), (b, hist_b) = final(reference), final(crashy)
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    same = (jax.tree.structure(a) == jax.tree.structure(b) and len(la) == len(lb) > 0
            and all(np.array_equal(x, y) for x, y in zip(la, lb)))
    same = same and hist_a == hist_b
    print(f"5. final params, optimizer state and history identical to the reference: {same}")
    return same


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
