"""Test setup: 4 virtual CPU devices, so sharded and pmap code runs for real."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Quiet TF-free tensorflow-datasets and absl.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

from gcs_emulator import gcs_emulator  # noqa: E402  (tests/ is on sys.path: rootdir conftest)


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
