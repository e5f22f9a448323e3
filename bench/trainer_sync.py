"""Steps per second of ``Trainer.fit`` on a model small enough that dispatch matters.

    python bench/trainer_sync.py                      # this checkout
    python bench/trainer_sync.py --rev aa068c3        # the Trainer of an older commit too

A tiny MLP on synthetic (x, y) arrays, one CPU device, no checkpointing: the step takes
well under a millisecond, so any time the host spends waiting for the device (reading the
loss every step to test it for NaN, say) shows up directly in steps/s. Compilation and
start-up are cancelled out: steps/s = extra steps / extra time between a short and a long
fit. Each variant runs in its own process, alternately, ``--repeats`` times; the median is
reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r"""
import importlib.util, json, sys, time
import numpy as np, optax
from flax import linen as nn
import jaxckpt

source, short, long, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if source != "-":  # an older train.py, loaded beside this checkout's package
    spec = importlib.util.spec_from_file_location("jaxckpt._bench_train", source)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    Trainer = module.Trainer
else:
    Trainer = jaxckpt.Trainer

class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(10)(nn.relu(nn.Dense(32)(x.reshape((x.shape[0], -1)))))

rng = np.random.default_rng(0)
x = rng.normal(size=(batch * 100, 64)).astype(np.float32)
y = rng.integers(0, 10, size=batch * 100).astype(np.int32)
data = {"image": x, "label": y}

def fit(epochs):
    trainer = Trainer(MLP(), optax.adam(1e-3), quiet=True)
    start = time.perf_counter()
    trainer.fit(data, epochs=epochs, batch_size=batch, seed=0)
    return time.perf_counter() - start

fit(1)  # imports, caches
t_short, t_long = fit(short), fit(long)
print(json.dumps({"steps_per_s": (long - short) * 100 / (t_long - t_short)}))
"""


def run_variant(source: str, args) -> float:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", WORKER, source, str(args.short),
                          str(args.long), str(args.batch)], capture_output=True, text=True,
                         env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["steps_per_s"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rev", help="also measure the Trainer of this git revision")
    p.add_argument("--short", type=int, default=2, help="epochs of the short fit")
    p.add_argument("--long", type=int, default=12, help="epochs of the long fit")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    variants = {"this checkout": "-"}
    with tempfile.TemporaryDirectory() as tmp:
        if args.rev:
            path = os.path.join(tmp, "train_before.py")
            with open(path, "w") as f:
                f.write(subprocess.run(["git", "-C", REPO, "show", f"{args.rev}:jaxckpt/train.py"],
                                       capture_output=True, text=True, check=True).stdout)
            variants = {f"train.py at {args.rev}": path, **variants}
        results = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, source in variants.items():
                results[name].append(run_variant(source, args))
    print(f"Trainer.fit, MLP 64-32-10, batch {args.batch}, 100 steps/epoch, 1 CPU device; "
          f"median of {args.repeats}")
    for name, values in results.items():
        print(f"  {name:>28}: {statistics.median(values):8.0f} steps/s   "
              f"(runs: {', '.join(f'{v:.0f}' for v in values)})")
    return {name: statistics.median(v) for name, v in results.items()}


if __name__ == "__main__":
    main()
