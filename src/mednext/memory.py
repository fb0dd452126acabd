"""Keeping freed memory in the process on the CPU (Linux/glibc): what it is and why.

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and
returns it to the system on ``free``. A MedNeXt step allocates and frees its large activations and
gradients anew each time, so each of them is page-faulted and zeroed by the kernel again in every
step; on a CPU this costs a large share of a 3D network's step time (docs/benchmarks.md).

:func:`reuse_freed_memory` switches glibc to the heap for large blocks and keeps freed memory for
the next allocation, the way PyTorch's CUDA caching allocator keeps GPU memory; on leaving it
restores glibc's defaults and returns the free memory (``malloc_trim``). The price is resident
memory: the heap holds on to its largest extent plus fragmentation. The trainer and the predictor
use it on the CPU (``MEDNEXT_KEEP_FREED_MEMORY=0`` turns it off there); the network's ``forward``
never does, so a model has no process-wide side effect: wrap your own CPU loop in
``with reuse_freed_memory():`` to get the same effect.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from mednext import config

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


def keeps_freed_memory(device: Any) -> bool:
    """Whether training and prediction keep freed memory on ``device`` (a ``torch.device``): on the
    CPU, unless switched off (``mednext.config.set_keep_freed_memory(False)`` or
    ``MEDNEXT_KEEP_FREED_MEMORY=0``)."""
    return device.type == "cpu" and config.get().keep_freed_memory


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
