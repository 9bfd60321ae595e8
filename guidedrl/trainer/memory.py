"""Process memory settings for training on CPU.

On the GPU, PyTorch's caching allocator keeps freed blocks for the next step. On the CPU, tensors come
from the C library's `malloc`, and glibc's defaults return large freed blocks to the operating system:
blocks above the mmap threshold (128 KiB at start, adjusted up to 32 MiB) are unmapped when freed,
and the top of the heap is trimmed above 128 KiB free. Each training step then allocates the same
activations again as fresh pages, which the kernel faults in and zeroes one 4 KiB page at a time.
On the CPU benchmark job (`bench/bench_trl.py --job cpu`) that was about 20,000 page faults a step and
15% of the update's time (docs/performance.md).

`keep_freed_memory` sets glibc's mmap and trim thresholds (`mallopt`, the same settings as the
`MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_` environment variables) so that freed memory
stays in the process for reuse. PyTorch's performance tuning guide recommends the same thing for CPU
training by another route: preloading jemalloc or tcmalloc. The cost: the process keeps its peak
memory until it exits instead of giving some of it back between phases.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP = 1 << 30  # bytes: blocks up to 1 GiB come from the heap, and up to 1 GiB of free heap is kept

_applied = False


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process (see the module docstring).

    Returns True when the settings are in force (now or from an earlier call), False where the C
    library is not glibc or refused them; then nothing is changed. Process-wide and not undone.
    """
    global _applied
    if _applied:
        return True
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _KEEP) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _KEEP) == 1
    except (OSError, AttributeError):
        return False
    _applied = ok
    return ok
