"""Keeping freed memory in the process on the CPU (Linux/glibc): what it is and why.

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and
returns it to the system on ``free``. A MedNeXt step allocates and frees its large activations and
gradients anew each time, so each of them is page-faulted and zeroed by the kernel again in every
step. Measured on this project's 2-core CPU (docs/benchmarks.md, session 5): one S k3 64^3 batch-2
training step spends about half its time there, for MONAI's network (22.7 s -> 10.8 s with memory
kept) and for ours alike; one 64^3 S forward caused 460,000 page faults (1.8 GB).

:func:`reuse_freed_memory` switches glibc to the heap for large blocks and keeps freed memory for
the next allocation, the way PyTorch's CUDA caching allocator keeps GPU memory; on leaving it
restores glibc's defaults and returns the free memory (``malloc_trim``). The price is resident
memory: the heap holds on to its largest extent plus fragmentation (a first training step's
peak-RSS rise +21% for our S, +11% for MONAI's, measured). ``mednext predict`` and ``mednext train``
use it on the CPU; ``MEDNEXT_KEEP_FREED_MEMORY=0`` turns it off there.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_GLIBC_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_GLIBC_DEFAULT_MMAP_MAX = 65536


def _glibc() -> Any:
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # pragma: no cover - no dynamic loader
        return None


def enabled_by_default() -> bool:
    """Whether ``mednext train`` / ``mednext predict`` keep freed memory on the CPU
    (``MEDNEXT_KEEP_FREED_MEMORY=0`` says no)."""
    return os.environ.get("MEDNEXT_KEEP_FREED_MEMORY", "1") != "0"


def keeps_freed_memory(device: Any) -> bool:
    """Whether ``mednext train``, the demo's trainer, ``mednext predict`` and the network's own
    inference forward keep freed memory on ``device`` (a ``torch.device``): on the CPU, unless
    ``MEDNEXT_KEEP_FREED_MEMORY=0``."""
    return device.type == "cpu" and enabled_by_default()


_LOCK = threading.Lock()
_DEPTH = [0]  # open reuse_freed_memory blocks, all threads together: the outermost one switches


@contextlib.contextmanager
def reuse_freed_memory(enable: bool = True) -> Iterator[None]:
    """Inside this block, large blocks come from glibc's heap and freed memory stays in the process
    for the next allocation; on leaving the outermost block, glibc's defaults are restored and the
    free memory is returned to the system. Blocks nest (a network's forward inside a predictor's
    block leaves the predictor's setting alone). A no-op when ``enable`` is False and off
    Linux/glibc."""
    libc = _glibc() if enable else None
    if libc is None:
        yield
        return
    with _LOCK:
        _DEPTH[0] += 1
        if _DEPTH[0] == 1:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH[0] -= 1
            if _DEPTH[0] == 0:
                libc.mallopt(_M_MMAP_MAX, _GLIBC_DEFAULT_MMAP_MAX)
                libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT_TRIM_THRESHOLD)
                libc.malloc_trim(0)
