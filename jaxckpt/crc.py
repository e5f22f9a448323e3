"""CRC-32C in hardware, from whichever package provides it here.

``crc32c`` (a core dependency) releases the GIL while it runs, so two threads checksum
at twice one's rate (14.7 vs 8.4-9.8 GB/s on this 2-core VM, 512 MiB) and a training
thread is never held up by a background checksum. ``google-crc32c``'s C extension holds
the GIL (7.1-7.6 GB/s, however many threads); its pure-Python fallback runs at MB/s, so
it checks old manifests but is never chosen to write new ones. Both compute the same
CRC-32C (Castagnoli), so manifests written with either verify with the other.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple


class Crc32c(NamedTuple):
    extend: Callable[[int, Any], int]  # (crc so far, buffer) -> crc
    fast: bool  # in hardware or C: fit to checksum array data
    releases_gil: bool


@functools.cache
def best() -> Crc32c | None:
    """The fastest CRC-32C installed (None: neither package is)."""
    try:
        import crc32c

        if crc32c.hardware_based:
            return Crc32c(lambda value, data: crc32c.crc32c(data, value), True, True)
    except ImportError:
        pass
    try:
        import google_crc32c
    except ImportError:
        return None
    return Crc32c(google_crc32c.extend, google_crc32c.implementation == "c", False)
