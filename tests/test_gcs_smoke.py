"""Smoke tests: Orbax and etils epath against a local GCS emulator (fake-gcs-server).

Nothing here skips: a missing emulator binary is an error (see tests/gcs_emulator.py).
The ``gcs`` fixture (one emulator per test session) lives in tests/conftest.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

try:
    from tests.gcs_emulator import GcsEmulatorUnavailable, emulator_env, gcs_emulator
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from gcs_emulator import GcsEmulatorUnavailable, emulator_env, gcs_emulator


def test_emulator_env_and_bucket(gcs):
    assert gcs.alive()
    for key, value in emulator_env(gcs.url).items():
        assert os.environ[key] == value
    assert os.environ["STORAGE_EMULATOR_HOST"] == gcs.url
    assert os.environ["TENSORSTORE_GCS_HTTP_URL"] == gcs.url
    assert gcs.url.startswith("http://127.0.0.1:")

    from google.cloud import storage

    client = storage.Client()  # emulator => anonymous credentials, no metadata server
    blob = client.bucket(gcs.bucket).blob("probe/hello.txt")
    blob.upload_from_string(b"hi")
    assert gcs.list_objects("probe/") == ["probe/hello.txt"]
    assert client.bucket(gcs.bucket).blob("probe/hello.txt").download_as_bytes() == b"hi"
    blob.delete()


def test_nested_emulator_stops_and_restores_env(gcs):
    outer = dict(os.environ)
    with gcs_emulator(bucket="other-bucket") as inner:
        assert inner.port != gcs.port
        assert os.environ["STORAGE_EMULATOR_HOST"] == inner.url
        proc = inner.process
    assert proc.poll() is not None, "emulator process still running after exit"
    assert dict(os.environ) == outer


def test_missing_binary_is_an_error_not_a_skip(monkeypatch):
    monkeypatch.setenv("FAKE_GCS_SERVER_BIN", "/nonexistent/fake-gcs-server")
    with pytest.raises(GcsEmulatorUnavailable, match="FAKE_GCS_SERVER_BIN"):
        with gcs_emulator():
            pass


def test_invalid_bucket_name_rejected_early():
    with pytest.raises(ValueError, match="invalid GCS bucket name"):
        with gcs_emulator(bucket="b0"):  # TensorStore would reject it much later
            pass


def test_epath_roundtrip(gcs):
    from etils import epath

    root = epath.Path(gcs.gs("epath"))
    # No 60 s gRPC bucket-type probe: gs:// must resolve to gcsfs's plain HTTP filesystem.
    import fsspec
    import gcsfs.core
    assert type(fsspec.filesystem("gs")) is gcsfs.core.GCSFileSystem
    (root / "a.txt").write_text("hello")
    (root / "sub" / "b.txt").write_text("b")
    assert (root / "a.txt").exists()
    assert root.exists() and root.is_dir()
    assert (root / "a.txt").read_text() == "hello"
    assert sorted(p.name for p in root.iterdir()) == ["a.txt", "sub"]
    # fake-gcs-server lacks the moveTo API: gcsfs logs an error and falls back to copy+delete.
    (root / "a.txt").rename(root / "c.txt")
    assert not (root / "a.txt").exists()
    assert (root / "c.txt").read_text() == "hello"
    assert gcs.list_objects("epath/") == ["epath/c.txt", "epath/sub/b.txt"]
    root.rmtree()
    assert not root.exists()
    assert gcs.list_objects("epath/") == []


def _tree():
    import jax.numpy as jnp

    return {
        "w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4),
        "opt": {"mu": jnp.full((5,), 0.5, jnp.float32), "count": jnp.asarray(7, jnp.int32)},
    }


def test_orbax_async_save_restore(gcs):
    import numpy as np
    import orbax.checkpoint as ocp
    from etils import epath

    root = gcs.gs("orbax", "run1")
    tree = _tree()
    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=True)
    with ocp.CheckpointManager(root, options=options) as mngr:
        for step in (1, 2, 3):
            assert mngr.save(step, args=ocp.args.StandardSave(tree))
        mngr.wait_until_finished()
        assert mngr.all_steps() == [2, 3]  # max_to_keep=2 deleted step 1

        # Orbax on gs:// does not rename: a step is complete once <step>/commit_success.txt
        # is written (last). A step directory without it is ignored by all_steps().
        objects = gcs.list_objects("orbax/run1/")
        assert "orbax/run1/3/commit_success.txt" in objects
        assert "orbax/run1/3/default/commit_success.txt" in objects
        assert not any("orbax-checkpoint-tmp" in o for o in objects)
        assert not any(o.startswith("orbax/run1/1/") for o in objects)
        (epath.Path(root) / "4" / "default" / "partial").write_text("crashed save")
        mngr.reload()
        assert mngr.all_steps() == [2, 3]
        assert mngr.latest_step() == 3

        restored = mngr.restore(3, args=ocp.args.StandardRestore(tree))
    for got, want in zip(
        (restored["w"], restored["opt"]["mu"], restored["opt"]["count"]),
        (tree["w"], tree["opt"]["mu"], tree["opt"]["count"]),
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_subprocess_inherits_env(gcs):
    """A child process sees the emulator through the inherited environment alone."""
    import orbax.checkpoint as ocp

    root = gcs.gs("orbax", "from-parent")
    with ocp.CheckpointManager(root) as mngr:
        mngr.save(5, args=ocp.args.StandardSave(_tree()))
        mngr.wait_until_finished()

    child = textwrap.dedent(
        f"""
        import numpy as np, orbax.checkpoint as ocp
        from etils import epath
        with ocp.CheckpointManager({root!r}) as m:
            assert m.all_steps() == [5], m.all_steps()
            meta = m.item_metadata(5)
            out = m.restore(5)
        np.testing.assert_array_equal(np.asarray(out["w"]), np.arange(12).reshape(3, 4))
        epath.Path({gcs.gs("child", "done.txt")!r}).write_text("ok")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", child],
        env=gcs.subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert gcs.list_objects("child/") == ["child/done.txt"]
