"""glibc allocator settings for numeric work in dask worker processes.

distributed starts workers with ``MALLOC_TRIM_THRESHOLD_`` set, which makes glibc
stop adapting its mmap threshold: every temporary array above 128 KiB is then
mapped and unmapped again, and page faults make numpy kernels on partitions of
tens of thousands of rows 2-2.5x slower (measured in benchmarks/RESULTS.md).
:func:`tune` raises the mmap threshold to glibc's maximum and the trim threshold
to 128 MiB, so temporaries are reused from the heap; memory above that is still
returned to the operating system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 128 * 1024 * 1024

_done = False


def tune() -> bool:
    """Apply the settings once in this process; False where glibc is not available."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        ok = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    except (OSError, AttributeError):
        return False
    _done = ok
    return ok


ENVIRON = {"MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD), "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
