"""Keep the C allocator from handing big buffers back to the kernel after every job.

Each job moves a few large buffers through the worker: the ~600 KB txt2img answer, the JSON string
parsed from it, the decoded PNG. glibc serves allocations above its mmap threshold (dynamic, from
128 KB) with fresh ``mmap`` pages and trims the heap top when more than twice that is free, so
every job faults its buffers in again, page by page. In a VM a page fault costs microseconds: the
parse of a txt2img answer took twice as long as with the pages kept. A fixed 32 MB mmap threshold
and a 64 MB trim threshold keep them: memory freed by one job serves the next.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's default upper bound for its dynamic threshold on 64-bit
TRIM_THRESHOLD = 64 << 20


def keep_freed_memory() -> bool:
    """Set the thresholds with glibc's ``mallopt``; False where there is none (musl, macOS)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
