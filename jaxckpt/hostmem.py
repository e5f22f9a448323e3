"""Keep freed host memory mapped, so the step after a save does not fault it in again.

While a CPU save writes, its snapshot holds the state's buffers (a zero-copy view, as
Orbax's own), so the next step cannot donate them and writes its outputs to new memory.
glibc's malloc hands such buffers to the kernel when they are freed: blocks above its
mmap threshold are unmapped at once, and free memory at the top of its heap is returned
once it exceeds the trim threshold (both adapt up to a few MiB only). Every later
allocation of the same size then takes one page fault per 4 KiB page: 106k faults for a
512 MiB state on the measured 2-core host, where the step after a save took 543 ms
instead of 276 (355 ms with this module; bench/README.md).

:func:`keep_freed_pages` raises the two thresholds (glibc only, once per size) so that
blocks up to 32 MiB come from the heap and up to twice the state of free memory stays in
it, and sets malloc's top pad to the same: XLA's CPU threads allocate from arenas of
their own, made of 64 MiB heaps that glibc unmaps as soon as one is entirely free,
whatever the trim threshold, unless the arena's free space at its top stays under the
pad (a 512 MiB state faulted its buffers in again after about every third save; with the
pad, once the heaps have grown). The process keeps the peak a save needs anyway, instead
of giving it back and faulting it in at the next save. It is process-wide, as malloc is;
it is skipped where the user set malloc's thresholds (``MALLOC_*_`` variables,
``GLIBC_TUNABLES``) and when ``JAXCKPT_KEEP_HOST_PAGES=0``.
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Any

__all__ = ["ENV", "keep_freed_pages", "kept_bytes"]

ENV = "JAXCKPT_KEEP_HOST_PAGES"
"""Set to ``0`` to leave malloc's thresholds as they are."""

_M_TRIM_THRESHOLD = -1  # mallopt parameters, glibc's malloc.h
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
"""glibc's largest allowed mmap threshold on 64-bit hosts (HEAP_MAX_SIZE / 2)."""

_USER_TUNING = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_",
                "MALLOC_MMAP_MAX_")

_lock = threading.Lock()
_kept = 0  # the trim threshold set so far (0: untouched)
_mallopt: Any = None  # resolved once: the function, or False where there is none


def _glibc_mallopt() -> Any:
    """glibc's ``mallopt``, or False (another C library, or the user tuned malloc)."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if any(v in os.environ for v in _USER_TUNING):
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        os.confstr("CS_GNU_LIBC_VERSION")  # raises where the C library is not glibc
        fn = ctypes.CDLL(None).mallopt
    except (ValueError, OSError, AttributeError):
        return False
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


def keep_freed_pages(nbytes: int) -> bool:
    """Let malloc keep up to ``2 * nbytes`` of freed memory (``nbytes``: the state a
    save holds on the host); whether malloc is now set so. Raises nothing: where it does
    not apply, memory behaves as before."""
    global _kept, _mallopt
    want = min(2 * int(nbytes), 2**31 - 1)  # mallopt takes an int
    if _kept and want <= _kept:
        return True
    with _lock:
        if _mallopt is None:
            _mallopt = _glibc_mallopt()
        if not _mallopt:
            return False
        if _kept and want <= _kept:
            return True
        if not _kept and not _mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD):
            _mallopt = False
            return False
        keep = max(want, MMAP_THRESHOLD)
        # The pad first: a threshold without it would keep the main heap's pages only.
        if _mallopt(_M_TOP_PAD, keep) and _mallopt(_M_TRIM_THRESHOLD, keep):
            _kept = keep
        return bool(_kept)


def kept_bytes() -> int:
    """The trim threshold this module set (0 if it set none)."""
    return _kept
