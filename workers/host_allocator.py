"""glibc malloc settings for a CPU worker: keep freed memory in the process for the next step to reuse.

A CPU forward allocates tensors of several MB every step (activations, the logits of a decode batch). By default
glibc serves a large allocation from a fresh mapping and unmaps it when freed, and returns free memory at the top
of a heap to the system once it passes the trim threshold; either way the next step's tensors fault their pages
in again, and the kernel zeroes each one. Workload 1 on SmolLM2 took about 110,000 such page faults (450 MB) in
every run; with the settings below, about 550 once warm, and its first run after startup took 2% less time and
later runs 8% less (docs/performance.md, session 25).

So a CPU worker raises the mmap threshold to its ceiling (32 MiB) and the trim threshold to 1 GiB: freed memory
stays with the process and is reused. Peak RSS is unchanged; memory a burst took is kept for the next one, as a
serving process wants. Malloc is left alone where the user set any of these thresholds themselves (glibc's
`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`, `MALLOC_TOP_PAD_`, `MALLOC_MMAP_MAX_`, or the same in
`GLIBC_TUNABLES`), where another allocator is preloaded, and off glibc. Note that setting any one of them also
turns off glibc's own adaptive threshold: workload 1 then took 2 million page faults per run, not 110,000.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys

logger = logging.getLogger("prefix_serve.host_allocator")

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit); larger values are refused
TRIM_THRESHOLD = 1 << 30

# glibc's settings of when memory is mapped, unmapped and trimmed: one the user set is theirs to keep
_THRESHOLDS = ("MMAP_THRESHOLD", "TRIM_THRESHOLD", "TOP_PAD", "MMAP_MAX")
_OTHER_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")

_applied = False


def why_not_tuned(environ=os.environ) -> str | None:
    """Why this process's malloc is left as it is, or None when the settings apply."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    tunables = environ.get("GLIBC_TUNABLES", "")
    chosen = [f"MALLOC_{name}_" for name in _THRESHOLDS if f"MALLOC_{name}_" in environ]
    chosen += [f"glibc.malloc.{name.lower()}" for name in _THRESHOLDS if f"glibc.malloc.{name.lower()}" in tunables]
    if chosen:
        return f"the user's own malloc thresholds ({', '.join(chosen)})"
    preload = environ.get("LD_PRELOAD", "")
    if any(name in preload for name in _OTHER_ALLOCATORS):
        return "another allocator is preloaded"
    return None


def retain_freed_memory() -> bool:
    """Apply the settings above to this process (once); returns whether they are in force."""
    global _applied
    if _applied:
        return True
    reason = why_not_tuned()
    if reason is not None:
        logger.debug("malloc left as it is: %s", reason)
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    logger.debug("malloc keeps freed memory (mmap threshold %d, trim threshold %d): %s", MMAP_THRESHOLD,
                 TRIM_THRESHOLD, _applied)
    return _applied
