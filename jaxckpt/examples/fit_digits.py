"""Keep the model of the best epoch: the seven steps of a checkpointed training run.

    python examples/fit_digits.py --workdir /tmp/jaxckpt-demo --epochs 30

1. load a dataset, 2. preprocess, 3. split train/validation/test, 4. define the model,
5. compile (optimizer, loss, metrics), 6. train with checkpointing that keeps the best
epoch by validation loss and the latest one, 7. evaluate the best model on the test split.

Run the same command again and it resumes: a finished run reports that nothing is left to
do; an interrupted one (Ctrl-C, SIGKILL, a preempted machine) continues exactly where its
last checkpoint left it. It writes, and says at the end where:

* WORKDIR/checkpoints: the best and the latest checkpoint (``jaxckpt ls WORKDIR/checkpoints``);
  ``--checkpoint-dir gs://bucket/run`` puts them in Google Cloud Storage instead;
* WORKDIR/history.csv and WORKDIR/tensorboard: written live, one row per epoch
  (``tensorboard --logdir WORKDIR/tensorboard``);
* WORKDIR/history.png: the loss and accuracy curves; WORKDIR/result.json: the test scores.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import optax
from flax import linen as nn

import jaxckpt
from jaxckpt import data


class CNN(nn.Module):
    """A small convolutional classifier for 8x8 digits."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = x.reshape((x.shape[0], -1))
        x = nn.Dropout(0.2, deterministic=not train)(nn.relu(nn.Dense(64)(x)))
        return nn.Dense(10)(x)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="checkpoints, plot and results go here")
    p.add_argument("--checkpoint-dir", default=None,
                   help="checkpoints go here instead of WORKDIR/checkpoints: a local path or "
                        "a gs://bucket/path URL")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--every-n-steps", type=int, default=None,
                   help="also save mid-epoch every N steps (default: every epoch)")
    p.add_argument("--mode", choices=["jit", "pmap"], default="jit")
    p.add_argument("--data-dir", default=None, help="TFDS data dir (default: ~/.cache/jaxckpt)")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    ckpt_dir = args.checkpoint_dir or os.path.join(args.workdir, "checkpoints")

    # 1. Load the dataset: 1,797 handwritten digits, a TFDS dataset read through grain.
    data_dir = args.data_dir or data.default_data_dir()
    data.prepare_digits(data_dir)  # once: writes array_record files from scikit-learn's copy
    dataset = data.load_tfds("sklearn_digits", "train", data_dir=data_dir)

    # 2. Preprocess: uint8 pixels to float32 in [0, 1]; keep image and label.
    dataset = dataset.map(data.normalize)

    # 3. Split: 70% train, 15% validation, 15% test, the same split on every run.
    splits = data.split_dataset(dataset, (0.7, 0.15, 0.15), seed=0)

    # 4. Define the model.
    model = CNN()

    # 5. Compile: optimizer, loss and metrics.
    trainer = jaxckpt.Trainer(model, optax.adam(args.lr),
                              loss_fn=optax.softmax_cross_entropy_with_integer_labels,
                              metrics=("accuracy",), mode=args.mode, quiet=args.quiet)

    # 6. Train with checkpointing: keep the best epoch by val_loss, and the latest.
    policy = jaxckpt.CheckpointPolicy(monitor="val_loss", mode="min", keep_best=1,
                                      keep_latest=1, every_n_epochs=1,
                                      every_n_steps=args.every_n_steps)
    #    Loggers are callbacks: a CSV row and TensorBoard scalars as each epoch ends.
    files = {name: os.path.join(args.workdir, name) for name in
             ("history.csv", "tensorboard", "history.png", "result.json")}
    loggers = [jaxckpt.CSVLogger(files["history.csv"]),
               jaxckpt.TensorBoardLogger(files["tensorboard"])]
    start = time.perf_counter()
    history = trainer.fit(splits["train"], splits["validation"], epochs=args.epochs,
                          batch_size=args.batch_size, checkpoint=ckpt_dir, policy=policy,
                          seed=args.seed, callbacks=loggers)
    seconds = time.perf_counter() - start
    print(history)
    history.plot(files["history.png"])

    # 7. Evaluate the best model: restore the best checkpoint and score the test split.
    with jaxckpt.CheckpointManager(ckpt_dir, read_only=True) as mngr:
        best_step = mngr.best_step()
        best_state = mngr.restore("best", target=trainer.state)
        best_metrics = mngr.metrics(best_step)
    test = trainer.evaluate(splits["test"], state=best_state)
    result = {"best_step": best_step, "best_epoch": history.best_epoch,
              "best_val_loss": best_metrics["val_loss"],
              "best_val_accuracy": best_metrics["val_accuracy"],
              "test_loss": test["loss"], "test_accuracy": test["accuracy"],
              "fit_seconds": seconds}
    print(f"best checkpoint: step {best_step} (val_loss {best_metrics['val_loss']:.4f}, "
          f"val_accuracy {best_metrics['val_accuracy']:.4f}); test accuracy "
          f"{test['accuracy']:.4f}")
    with open(files["result.json"], "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote: {ckpt_dir} (checkpoints), {files['history.csv']}, {files['tensorboard']} "
          f"(tensorboard --logdir {files['tensorboard']}), {files['history.png']}, "
          f"{files['result.json']}")
    return result


if __name__ == "__main__":
    main()
