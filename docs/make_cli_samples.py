"""Make the checkpoint directories docs/cli.md shows, and print every sample in it.

    python docs/make_cli_samples.py --workdir /tmp/run     # about 90 s on 2 CPU cores

1. ``/tmp/run/checkpoints``: the tutorial's 50 epochs (best ``val_loss`` 0.61 at epoch 45,
   epoch 50 ends at 0.629) saved with ``keep_best=3, keep_latest=3``. The state is a real
   MLP with Adam, trained one step per epoch; the metrics are the tutorial's, so the
   samples read the same on every machine.
2. Runs ``ls``, ``best``, ``verify``, ``plot``, ``prune`` (dry runs, then a real one) in
   ``/tmp/run`` as a user would, then damages one array of step 50 (bytes changed in place,
   the size unchanged) and runs ``ls``, ``verify`` and the error cases.
3. ``jaxckpt demo --workdir /tmp/run/demo --epochs 5`` and ``ls``/``plot`` of it
   (skip with ``--no-demo``).

Every command runs as ``python -m jaxckpt`` in a subprocess and is printed as
``$ jaxckpt ...`` followed by its output; the script exits 1 if any command's exit status
is not the one the page shows. ``/tmp/run/curves.png`` is ``docs/cli-plot.png``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

TUTORIAL_LOSSES = [round(1.2 - 0.0125 * e, 4) for e in range(1, 45)] + [
    0.61, 0.615, 0.62, 0.625, 0.627, 0.629]


def write_tutorial_run(directory: str) -> None:
    """50 epochs of a 512-wide MLP with Adam (a 3 MiB state), saved with the tutorial's
    metrics. Big enough that the arrays are covered by fingerprints, not file checksums
    (a version-2 manifest checksums only files up to 1 MiB)."""
    import jax
    import jax.numpy as jnp
    import optax

    import jaxckpt

    def loss(params, x, y):
        hidden = jax.nn.relu(x @ params["dense"]["kernel"] + params["dense"]["bias"])
        return jnp.mean((hidden @ params["out"]["kernel"] - y) ** 2)

    @jax.jit
    def train_step(state):
        x = jax.random.normal(state.step_rng(), (16, 512))
        y = jnp.sum(x, axis=1, keepdims=True)
        return state.apply_gradients(jax.grad(loss)(state.params, x, y))

    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"dense": {"kernel": jax.random.normal(k1, (512, 512)) * 0.05,
                        "bias": jnp.zeros((512,))},
              "out": {"kernel": jax.random.normal(k2, (512, 1)) * 0.05}}
    state = jaxckpt.TrainState.create(params=params, tx=optax.adam(1e-3), rng=0)
    policy = jaxckpt.CheckpointPolicy(monitor="val_loss", mode="min", keep_best=3,
                                      keep_latest=3)
    with jaxckpt.CheckpointManager(directory, policy) as mngr:
        for epoch, val_loss in enumerate(TUTORIAL_LOSSES, start=1):
            state = train_step(state)
            mngr.save(epoch, state, metrics={"val_loss": val_loss, "loss": val_loss + 0.1},
                      epoch=epoch, data_state={"epoch": epoch})


def damage_largest_file(step_dir: str) -> str:
    """Change 16 bytes in the middle of the step's largest file, keeping its size (what a
    bad disk or a broken copy does); return its path relative to ``step_dir``."""
    files = [os.path.join(root, name) for root, _, names in os.walk(step_dir) for name in names]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.seek(os.path.getsize(largest) // 2)
        data = f.read(16)
        f.seek(-len(data), os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in data))
    return os.path.relpath(largest, step_dir)


UNEXPECTED: list[str] = []


def jaxckpt(cwd: str, *args: str, expect: int = 0, shell_tail: str = "") -> None:
    """Run ``jaxckpt ARGS`` in ``cwd`` and print it as a console sample; remember it when
    its exit status is not ``expect`` (the samples would show a broken command)."""
    print(f"$ jaxckpt {' '.join(args)}{shell_tail}")
    sys.stdout.flush()
    done = subprocess.run([sys.executable, "-m", "jaxckpt", *args], cwd=cwd, check=False,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(done.stdout, end="")
    if shell_tail:
        print(f"exit {done.returncode}")
    print()
    if done.returncode != expect:
        UNEXPECTED.append(f"jaxckpt {' '.join(args)}: exit {done.returncode}, expected {expect}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="/tmp/run",
                   help="where to write (default /tmp/run); must not exist yet")
    p.add_argument("--no-demo", action="store_true", help="skip the demo section")
    args = p.parse_args(argv)
    work = os.path.abspath(args.workdir)
    if os.path.exists(work):
        p.error(f"{work} exists; remove it or pass another --workdir.")
    os.makedirs(work)
    print(f"# writing {work}/checkpoints\n")
    write_tutorial_run(os.path.join(work, "checkpoints"))

    print("## ls, best, verify, plot\n")
    jaxckpt(work, "ls", "checkpoints")
    jaxckpt(work, "ls", "checkpoints", "--json")
    jaxckpt(work, "best", "checkpoints")
    jaxckpt(work, "best", "checkpoints", "--json")
    jaxckpt(work, "verify", "checkpoints")
    jaxckpt(work, "plot", "checkpoints", "-o", "curves.png")

    print("## prune\n")
    jaxckpt(work, "prune", "checkpoints", "--keep-best", "1", "--keep-latest", "1", "--dry-run")
    jaxckpt(work, "prune", "checkpoints", "--keep-best", "2", "--keep-latest", "2",
            "--max-bytes", "10MiB", "--dry-run")
    jaxckpt(work, "prune", "checkpoints", "--keep-best", "0", "--keep-latest", "1", "--dry-run")
    jaxckpt(work, "prune", "checkpoints", "--keep-best", "2", "--keep-latest", "1")

    damaged = damage_largest_file(os.path.join(work, "checkpoints", "50"))
    print(f"## after changing 16 bytes of checkpoints/50/{damaged}\n")
    jaxckpt(work, "ls", "checkpoints")
    jaxckpt(work, "verify", "checkpoints", expect=1, shell_tail='; echo "exit $?"')

    print("## errors\n")
    jaxckpt(work, "ls", os.path.join(work, "nope"), expect=2)
    jaxckpt(work, "ls", work, expect=2)
    jaxckpt(work, "verify", "checkpoints", "--step", "7", expect=2)
    jaxckpt(work, "prune", "checkpoints", "--max-bytes", "1000", expect=2)

    if not args.no_demo:
        print("## demo\n")
        demo = os.path.join(work, "demo")
        jaxckpt(work, "demo", "--workdir", demo, "--epochs", "5")
        jaxckpt(work, "ls", os.path.join(demo, "checkpoints"))
        jaxckpt(work, "plot", os.path.join(demo, "checkpoints"), "-o", "acc.png",
                "--metric", "val_loss", "--metric", "loss", "--metric", "val_accuracy",
                "--metric", "accuracy")
    print(f"# the plot of the first section is {work}/curves.png (docs/cli-plot.png)")
    if UNEXPECTED:
        print("make_cli_samples: unexpected exit status:\n  " + "\n  ".join(UNEXPECTED),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
