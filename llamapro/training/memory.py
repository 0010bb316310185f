"""A training worker's process memory: glibc's allocator told to return large blocks to the OS,
and the current and peak resident size that the metrics log records."""

from __future__ import annotations

import os
from pathlib import Path


def lean_malloc() -> bool:
    """glibc: allocations >= 1 MiB come from mmap and go back to the OS when freed, instead of
    raising the heap's high-water mark step after step (torch's CPU allocator does not cache)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 20))
    except (OSError, AttributeError):
        return False


def peak_rss() -> int:
    """Peak resident memory of this worker process so far, in bytes (Linux: ru_maxrss is KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss() -> int:
    """Current resident memory of this process, in bytes."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0
