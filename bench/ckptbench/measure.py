"""Measurement primitives: statistics, memory sampling, the page cache, plain disk I/O.

Nothing here knows about checkpoints; each function measures one thing the way its
docstring says, so a reader can check it on its own.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import statistics
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

MiB = 2 ** 20
_CHUNK = 64 * MiB


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def median_interval(values: Iterable[float], level: float = 0.9) -> dict:
    """A distribution-free interval for the median of ``values``: order statistics
    ``x(k) .. x(n+1-k)`` with the largest ``k`` whose coverage (from the binomial
    distribution of how many values fall below the median) is still at least ``level``.

    With 7 rounds the narrowest such interval at 90 % is the smallest and largest value
    (98.4 %); with 9 it is the second smallest to the second largest (96.1 %), with 15
    the fourth smallest to the fourth largest (96.5 %). Too few
    values for ``level``: the whole range, with its lower coverage.
    """
    values = sorted(values)
    n = len(values)
    if n == 0:
        return {"low": float("nan"), "high": float("nan"), "coverage": 0.0}

    def coverage(k: int) -> float:  # P(x(k) <= median <= x(n+1-k)), 1-based k
        tail = sum(math.comb(n, i) for i in range(k)) / 2 ** n
        return 1.0 - 2.0 * tail

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= level:
        k += 1
    return {"low": values[k - 1], "high": values[n - k], "coverage": coverage(k)}


def pct(values: Iterable[float], q: float) -> float:
    """The ``q`` quantile (0..1) with linear interpolation; NaN for no values."""
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def spread(values: list[float]) -> dict:
    """p50 / p95 / count / every value: the shape of a small sample, not just its centre."""
    return {"p50": median(values), "p95": pct(values, 0.95), "n": len(values), "all": values}


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall and process-CPU seconds of ``fn()`` (CPU of every thread of this process)."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def settle() -> None:
    """Write back every dirty page (``sync``) and let the disk go quiet, so that the next
    timed write pays for its own pages only: the kernel charges writeback of earlier
    writes (the previous save's, another process's) to whichever process is writing when
    the dirty limit is reached, which made idle-save CPU vary by up to 2x between runs."""
    os.sync()
    time.sleep(0.2)


def back_free_pages(nbytes: int) -> None:
    """Touch ``nbytes`` of fresh memory, one byte per page, then free it: run just before a
    timed operation, so that the pages it allocates (page cache, arrays) are backed.

    On a VM that hands free memory back to its host (virtio-balloon free page reporting,
    about 2 s after a page is freed), the first touch of such a page costs a host fault.
    Measured here: copying 512 MiB into fresh pages took 0.89 s, into recycled ones 0.05 s;
    a 512 MiB save's kernel CPU was 0.3 or 1.1 s, for jaxckpt and raw Orbax alike, at
    random. That noise was larger than any difference between the two; touched and freed
    pages come back first from the kernel's free lists, already backed.
    """
    import numpy as np

    if nbytes <= 0:
        return
    buf = np.empty(nbytes, np.uint8)
    buf[::4096] = 1
    del buf


class RssSampler:
    """Samples this process's memory in a thread, for the peak of a window: the resident
    set (RSS) and its private part (RSS less file-backed and shared pages).

    A first save's RSS includes ~4.5 MB of the tensorstore library's code, paged in from
    its ``.so`` the first time Orbax writes, whatever the state's size (measured here:
    a save of a 16 KiB state raises RSS by 5.2 MB, 4.5 of them file-backed, for jaxckpt
    and raw Orbax alike). Those pages are clean, shared by every process on the host and
    dropped by the kernel under pressure: RAM the save takes from the machine is the
    private figure.
    """

    def __init__(self, period_s: float = 0.002):
        import psutil

        self._proc = psutil.Process()
        self._period = period_s
        self._lock = threading.Lock()
        self._samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _read(self) -> tuple[int, int]:
        m = self._proc.memory_info()  # from /proc/self/statm: cheap enough at 2 ms
        return m.rss, m.rss - m.shared

    def _run(self) -> None:
        while not self._stop.is_set():
            sample = (time.perf_counter(), *self._read())
            with self._lock:
                self._samples.append(sample)
            time.sleep(self._period)

    def now(self, private: bool = False) -> int:
        return self._read()[private]

    def peak(self, start: float, end: float, private: bool = False) -> int:
        """The largest RSS (or private RSS) sampled between two ``time.perf_counter()``
        readings."""
        with self._lock:
            inside = [s[1 + private] for s in self._samples if start <= s[0] <= end]
        return max(inside) if inside else self.now(private)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def is_url(path: str) -> bool:
    return "://" in path


def drop_page_cache(path: str | Path) -> None:
    """Evict a file's (or a tree's) pages, so the next read comes from the disk.

    ``posix_fadvise(DONTNEED)`` needs no root and touches only these files, unlike
    ``/proc/sys/vm/drop_caches``, which would empty every other process's cache too.
    """
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        try:
            fd = os.open(f, os.O_RDONLY)
        except FileNotFoundError:  # replaced meanwhile (an atomic rename): nothing to evict
            continue
        try:
            os.fsync(fd)  # only clean pages can be evicted
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def tree_bytes(path: str) -> int | None:
    """Bytes of every file under ``path`` (None for a URL: listing is not free there)."""
    if is_url(path) or not Path(path).exists():
        return None
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def disk_write(host_leaves, path: str) -> float:
    """Bytes/s of writing ``host_leaves`` sequentially to one new file, fsync included.

    For a URL (gs://...) the bytes go as one object through etils.epath.
    """
    import numpy as np

    flat = [np.ascontiguousarray(x).reshape(-1).view(np.uint8) for x in host_leaves]
    n = sum(x.size for x in flat)
    if is_url(path):
        from etils import epath
        blob = b"".join(x.tobytes() for x in flat)
        t = time.perf_counter()
        epath.Path(path).write_bytes(blob)
        return n / (time.perf_counter() - t)
    t = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for x in flat:
            mv = memoryview(x)
            for o in range(0, x.size, _CHUNK):
                f.write(mv[o:o + _CHUNK])
        os.fsync(f.fileno())
    return n / (time.perf_counter() - t)


def disk_read(path: str) -> float:
    """Bytes/s of reading a file sequentially, its pages evicted from the cache first."""
    import numpy as np

    if is_url(path):
        from etils import epath
        t = time.perf_counter()
        n = len(epath.Path(path).read_bytes())
        return n / (time.perf_counter() - t)
    drop_page_cache(path)
    n = os.path.getsize(path)
    out = np.empty(n, np.uint8)
    mv = memoryview(out)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        o = 0
        while o < n:
            got = f.readinto(mv[o:o + _CHUNK])
            if not got:
                break
            o += got
    return n / (time.perf_counter() - t)


def remove(path: str) -> None:
    if is_url(path):
        from etils import epath
        epath.Path(path).unlink()
    else:
        os.remove(path)


def rmtree(path: str) -> None:
    if is_url(path):
        from etils import epath
        if epath.Path(path).exists():
            epath.Path(path).rmtree()
    else:
        shutil.rmtree(path, ignore_errors=True)


def cpu_pressure() -> str | None:
    """Linux PSI: the share of time some task waited for a CPU (other load on the host)."""
    try:
        return Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except OSError:
        return None


def load() -> dict:
    """The host's load now: what other processes may have taken from a measurement."""
    return {"load_avg": list(os.getloadavg()), "cpu_pressure": cpu_pressure()}


def machine(directory: str) -> dict:
    """CPU, RAM, disk and load of this host, for the record beside every result."""
    import psutil

    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"hostname": platform.node(), "nproc": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "cpu_model": cpu, "ram_bytes": psutil.virtual_memory().total,
            "load_avg_at_start": os.getloadavg(), "cpu_pressure_at_start": cpu_pressure(),
            "python": platform.python_version(), "dir": directory,
            "disk": None if is_url(directory) else _disk(directory)}


def _disk(directory: str) -> dict | None:
    import psutil

    best = None
    for part in psutil.disk_partitions(all=True):
        if directory.startswith(part.mountpoint) and (
                best is None or len(part.mountpoint) > len(best.mountpoint)):
            best = part
    if best is None:
        return None
    usage = shutil.disk_usage(directory)
    rotational = Path(f"/sys/block/{os.path.basename(best.device)}/queue/rotational")
    return {"device": best.device, "mountpoint": best.mountpoint, "fstype": best.fstype,
            "total_bytes": usage.total, "free_bytes": usage.free,
            "rotational": rotational.read_text().strip() if rotational.exists() else None}


def versions() -> dict:
    """The JAX device and the library versions the numbers belong to."""
    from importlib.metadata import version

    import jax

    dev = jax.devices()[0]
    return {"platform": dev.platform, "kind": dev.device_kind, "count": jax.device_count(),
            "jax": jax.__version__, "orbax_checkpoint": version("orbax-checkpoint"),
            "tensorstore": version("tensorstore")}


def json_default(x):
    """numpy scalars as Python numbers; anything else as its str (never pickled)."""
    if hasattr(x, "item"):
        return x.item()
    return str(x)
