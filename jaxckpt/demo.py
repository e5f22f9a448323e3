"""``jaxckpt demo``: the seven-step digits example, in a given or temporary directory."""

from __future__ import annotations

import tempfile


def run(workdir: str | None = None, epochs: int = 20, seed: int = 0,
        quiet: bool = False) -> dict:
    """Run :mod:`jaxckpt.examples.fit_digits`; return its results (test accuracy, ...)."""
    from jaxckpt.examples import fit_digits

    workdir = workdir or tempfile.mkdtemp(prefix="jaxckpt-demo-")
    argv = ["--workdir", workdir, "--epochs", str(epochs), "--seed", str(seed)]
    result = fit_digits.main(argv + (["--quiet"] if quiet else []))
    return {**result, "workdir": workdir}
