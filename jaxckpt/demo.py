"""``jaxckpt demo``: the seven-step digits example, in a given or temporary directory.

The README quotes the demo's numbers; they are produced here, never typed by hand::

    python -m jaxckpt.demo --readme README.md     # run the README's demo, rewrite its numbers
    python -m jaxckpt.demo --check README.md      # run it, exit 1 if the README differs

On one CPU device, as the README's command runs (more devices sum in another order).
tests/test_examples.py runs the same check.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile

README_EPOCHS, README_SEED = 30, 0  # the README's demo command: --epochs 30, seed 0
_BLOCK = re.compile(r"(<!-- demo-numbers[^>]*-->\n)(.*?)(\n<!-- /demo-numbers -->)", re.S)


def run(workdir: str | None = None, epochs: int = 20, seed: int = 0,
        quiet: bool = False) -> dict:
    """Run :mod:`jaxckpt.examples.fit_digits`; return its results (test accuracy, ...)."""
    from jaxckpt.examples import fit_digits

    workdir = workdir or tempfile.mkdtemp(prefix="jaxckpt-demo-")
    argv = ["--workdir", workdir, "--epochs", str(epochs), "--seed", str(seed)]
    result = fit_digits.main(argv + (["--quiet"] if quiet else []))
    return {**result, "workdir": workdir}


def readme_numbers(result: dict, epochs: int = README_EPOCHS, seed: int = README_SEED) -> str:
    """The README's sentence about a demo run, from that run's result."""
    return (f"**test accuracy {result['test_accuracy']:.3f}** (best `val_loss` "
            f"{result['best_val_loss']:.3f} at epoch {result['best_epoch']} of {epochs}, "
            f"`val_accuracy` {result['best_val_accuracy']:.3f}; seed {seed}, CPU)")


def readme_block(readme_text: str) -> str:
    """The numbers the README quotes now (between its demo-numbers markers)."""
    found = _BLOCK.search(readme_text)
    if found is None:
        raise ValueError("the README has no <!-- demo-numbers --> ... <!-- /demo-numbers --> "
                         "block.")
    return found.group(2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Run the README's demo and write or check the "
                                            "numbers the README quotes.")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--readme", metavar="README.md", help="rewrite the numbers in place")
    group.add_argument("--check", metavar="README.md", help="exit 1 if they differ")
    p.add_argument("--workdir", help="where the demo writes (default: a new temporary "
                                     "directory)")
    args = p.parse_args(argv)
    path = args.readme or args.check
    with open(path) as f:
        text = f.read()
    old = readme_block(text)
    new = readme_numbers(run(args.workdir, epochs=README_EPOCHS, seed=README_SEED, quiet=True))
    if args.check:
        print(f"README: {old}\ndemo:   {new}")
        return 0 if old == new else 1
    with open(path, "w") as f:
        f.write(_BLOCK.sub(lambda m: m.group(1) + new + m.group(3), text))
    print(f"wrote into {path}: {new}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
