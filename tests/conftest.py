"""Test setup: 4 virtual CPU devices, so sharded and pmap code runs for real."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Quiet TF-free tensorflow-datasets and absl.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import sys  # noqa: E402

import pytest  # noqa: E402

from gcs_emulator import gcs_emulator  # noqa: E402  (tests/ is on sys.path: rootdir conftest)

_CACHE_DIR = "JAX_COMPILATION_CACHE_DIR"


@pytest.hookimpl(trylast=True)  # after pytest's own configure made the basetemp factory
def pytest_configure(config):
    """One persistent JAX compilation cache for the whole session.

    The test processes, the xdist workers and every subprocess they start (training
    scripts, crash and resume runs, examples) compile the same small programs again and
    again; a short training run spends ~40% of its CPU time compiling. With this cache a
    program compiled once is loaded everywhere else. Executables are the same either way,
    so bitwise comparisons between runs are unaffected.

    Set in ``os.environ`` before collection, so that module-level ``{**os.environ}``
    environments and the xdist workers (started later, from this process) inherit it.
    An environment that already names a cache keeps its own.
    """
    if os.environ.get(_CACHE_DIR):
        return
    base = config._tmp_path_factory.getbasetemp()  # what the tmp_path_factory fixture uses
    # An xdist worker's basetemp sits in the session's, which all workers share.
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    os.environ[_CACHE_DIR] = str(root / "jax-compilation-cache")
    # Cache every program: most are the many small ones that model init compiles.
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    if "jax" in sys.modules:  # imported already (by a plugin): it has read its environment
        import jax

        jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_DIR])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


@pytest.fixture(scope="session")
def gcs():
    """A local GCS emulator (fake-gcs-server on 127.0.0.1) with bucket ``jaxckpt-test``.

    While it runs, ``os.environ`` points every GCS client (google-cloud-storage, gcsfs via
    etils epath, tensorstore via Orbax) at it, so subprocesses inherit it too. Tests use
    ``gcs.gs("unique", "prefix")`` for their own ``gs://`` directory and
    ``gcs.list_objects(prefix)`` to see what is really in the bucket. A missing emulator is
    an error, never a skip.
    """
    with gcs_emulator(bucket="jaxckpt-test") as emu:
        yield emu


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """One TFDS data dir with the embedded digits dataset, prepared once (~1 s)."""
    from jaxckpt import data

    path = tmp_path_factory.mktemp("tfds")
    data.prepare_digits(path)
    return path
