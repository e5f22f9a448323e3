"""One persistent JAX compilation cache for the subprocesses a test session starts.

A short training subprocess spends about 40% of its CPU time compiling (the digits example:
~10 of ~26 s), and the crash, resume and example tests start the same script again and
again. With this cache a repeated run loads its compiled programs instead. Executables
are the same either way, so bitwise comparisons between runs are unaffected.

Only subprocesses get it (through their environment), unless the environment already
names a cache: then every process inherits that one and there is nothing to add.
"""

import os

_VAR = "JAX_COMPILATION_CACHE_DIR"


def compile_cache_env(tmp_path_factory) -> dict[str, str]:
    """The environment variables that point a subprocess at this session's cache."""
    if os.environ.get(_VAR):
        return {}
    base = tmp_path_factory.getbasetemp()
    # Each xdist worker has its own basetemp; their parent is the session's, shared.
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    return {_VAR: str(root / "jax-compilation-cache"),
            # Cache every program: most are the many small ones that model init compiles.
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
