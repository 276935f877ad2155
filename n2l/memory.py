"""Keep freed memory in the process heap during training (glibc only; elsewhere a no-op).

Each training step allocates and frees the same few-megabyte activations. glibc returns such
blocks to the system after every free (mmap, or a trim of the heap top), so the next step
page-faults all of them in again: 40-55% of a step's time on 256x256 crops (bench/RESULTS.md
7k). Raising the mmap and trim thresholds for the duration of an encode lets the steps reuse the
same pages. The thresholds are process-wide: encodes running side by side in threads are still
correct, only slower once the first of them has returned.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from collections.abc import Iterator

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_DEFAULT_THRESHOLD = 128 * 1024  # glibc's initial value of both
_MAX_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest mmap threshold on 64-bit systems
_RETAIN = 1 << 30


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (raises AttributeError outside glibc)
        return libc
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def retain_freed_memory() -> Iterator[None]:
    """Within the block, freed blocks of up to 32 MiB stay in the heap for reuse; on exit the
    thresholds go back to glibc's initial values and the heap is trimmed."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, _MAX_MMAP_THRESHOLD)
    libc.mallopt(_M_TRIM_THRESHOLD, _RETAIN)
    try:
        yield
    finally:
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_THRESHOLD)
        libc.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_THRESHOLD)
        libc.malloc_trim(0)
