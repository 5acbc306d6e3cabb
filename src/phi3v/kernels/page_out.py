"""Hand the resident pages of memory-mapped checkpoint tensors back to the OS.

Weights loaded zero-copy from a .safetensors file are private file mappings: once read, their pages
count in the process's RSS until the kernel needs the memory.  `page_out(tensors)` asks the kernel to
reclaim them now (madvise MADV_PAGEOUT, Linux >= 5.4); the next read faults them back in from the
page cache (or the file), unchanged.  The model uses it for the vision tower between images when
`Phi3V.load(low_memory=True)`: ~0.58 GiB less resident while the decoder runs.

Only ranges inside a file mapping of a *.safetensors file are touched, so tensors in anonymous
memory (converted dtypes, quantized layers) are never paged out to swap.  Anywhere this cannot work
(not Linux, an older kernel, no libc) it does nothing and returns 0.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from collections.abc import Iterable

import torch

MADV_PAGEOUT = 21
_libc = None


def _madvise():
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _libc.madvise.restype = ctypes.c_int
        except (OSError, AttributeError):
            _libc = False
    return _libc.madvise if _libc else None


def safetensors_mappings() -> list[tuple[int, int]]:
    """(start, end) address ranges of this process's file mappings of .safetensors files."""
    ranges = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].strip().endswith(".safetensors"):
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    ranges.append((start, end))
    except OSError:
        pass
    return ranges


def page_out(tensors: Iterable[torch.Tensor]) -> int:
    """Release the resident pages of the file-mapped ones among `tensors`; returns bytes advised."""
    madvise = _madvise()
    if madvise is None or not sys.platform.startswith("linux"):
        return 0
    mapped = safetensors_mappings()
    page = mmap.PAGESIZE
    released = 0
    for t in tensors:
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        if not any(lo <= start and end <= hi for lo, hi in mapped):
            continue
        first, last = -(-start // page) * page, end // page * page  # whole pages inside the tensor
        if last > first and madvise(first, last - first, MADV_PAGEOUT) == 0:
            released += last - first
    return released
