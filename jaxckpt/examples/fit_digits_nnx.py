"""The seven steps with a Flax NNX model: same data, same checkpoints, same resume.

    python examples/fit_digits_nnx.py --workdir /tmp/jaxckpt-nnx --epochs 20

NNX modules are stateful Python objects; the Trainer splits one into its static graph and
a pure :class:`jaxckpt.TrainState` (parameters in ``params``; BatchNorm statistics and the
Dropout RNG counters in ``extras``), so all of it is checkpointed and a resumed run draws
the same dropout masks. To use the trained model afterwards, merge the state back.
"""

from __future__ import annotations

import argparse
import os

import jax.numpy as jnp
import optax
from flax import nnx

import jaxckpt
from jaxckpt import data


class CNN(nnx.Module):
    """Conv, BatchNorm, Dropout: every kind of NNX state a checkpoint must carry."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(16, rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (3, 3), rngs=rngs)
        self.dense = nnx.Linear(8 * 8 * 32, 64, rngs=rngs)
        self.dropout = nnx.Dropout(0.2, rngs=rngs)
        self.out = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv1(x)))
        x = nnx.relu(self.conv2(x))
        x = self.dropout(nnx.relu(self.dense(x.reshape((x.shape[0], -1)))))
        return self.out(x)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--checkpoint-dir", default=None,
                   help="default WORKDIR/checkpoints; a local path or gs://bucket/path")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    ckpt_dir = args.checkpoint_dir or os.path.join(args.workdir, "checkpoints")

    # 1-3. Load, preprocess, split (as in fit_digits.py).
    data_dir = args.data_dir or data.default_data_dir()
    data.prepare_digits(data_dir)
    dataset = data.load_tfds("sklearn_digits", "train", data_dir=data_dir).map(data.normalize)
    splits = data.split_dataset(dataset, (0.7, 0.15, 0.15), seed=0)

    # 4. Define the model: an NNX module, initialised eagerly from its own Rngs.
    model = CNN(nnx.Rngs(args.seed))

    # 5. Compile.
    trainer = jaxckpt.Trainer(model, optax.adamw(1e-3, weight_decay=1e-4),
                              metrics=("accuracy",), quiet=args.quiet)

    # 6. Train with checkpointing: best by val_accuracy (mode "auto" picks max), and latest.
    policy = jaxckpt.CheckpointPolicy(monitor="val_accuracy", keep_best=1, keep_latest=1)
    history = trainer.fit(splits["train"], splits["validation"], epochs=args.epochs,
                          batch_size=32, checkpoint=ckpt_dir, policy=policy, seed=args.seed)
    print(history)
    history.plot(os.path.join(args.workdir, "history.png"))

    # 7. Evaluate the best model, as an ordinary NNX module rebuilt from the checkpoint.
    with jaxckpt.CheckpointManager(ckpt_dir, read_only=True) as mngr:
        best = mngr.restore("best", target=trainer.state)
        best_step = mngr.best_step()
    best_model = trainer.nnx_model(best)
    test = trainer.evaluate(splits["test"], state=best)
    batch = next(iter(data.batches(splits["test"], 8, shuffle=False, transform=None)))
    predictions = jnp.argmax(best_model(jnp.asarray(batch["image"])), axis=-1)
    print(f"best checkpoint: step {best_step}; test accuracy {test['accuracy']:.4f}; "
          f"first test predictions {predictions.tolist()} vs labels {batch['label'].tolist()}")
    print(f"wrote: {ckpt_dir} (checkpoints), {os.path.join(args.workdir, 'history.png')}")
    return {"best_step": best_step, **{f"test_{k}": v for k, v in test.items()}}


if __name__ == "__main__":
    main()
