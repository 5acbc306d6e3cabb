"""Give freed heap memory back to the OS now and then, so the server's RSS follows what it uses.

Why: a request's large temporary buffers (decoded images, pixel_values of 1-23 MB per image,
prefill activations) are allocated and freed in several threads (preparation pools, the engine
thread). glibc gives each thread an arena and, once a large mmapped block has been freed, raises
its mmap threshold (up to 32 MB), so later buffers of that size come from the arenas and their
pages stay with the process after free(). Measured with the tiny checkpoint under load
(scripts/soak_server.py): ~200 MB of the server's RSS was such free memory, and it drifted up
with the mix of requests; malloc_trim(0) returns it (every arena, whole free pages).

Two things: at start, the mmap threshold is pinned at 1 MiB (mallopt), so every buffer of 1 MiB or
more is its own mapping, given back to the OS the moment it is freed, whatever sizes came before;
and a daemon thread calls malloc_trim(0) every `interval_s` seconds (--heap-trim-s, default 5). A trim takes milliseconds and
briefly locks each arena in turn, so it is done rarely rather than after every request. Not glibc
(macOS, musl): nothing to do, the thread is not started.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading

log = logging.getLogger("phi3v.server")

TRIM_INTERVAL_S = 5.0  # a trim took 13-34 ms with ~200 MB to return: ~0.5% of one core
MMAP_THRESHOLD = 1 << 20  # buffers this large or larger are mmapped (glibc's default floats up to 32 MB)
_M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)


def _load_malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_malloc_trim = _load_malloc_trim()


def pin_mmap_threshold(size: int = MMAP_THRESHOLD) -> bool:
    """mallopt(M_MMAP_THRESHOLD, size) where glibc has it: a fixed threshold also turns off glibc's
    dynamic one, which after large frees moves big buffers into the arenas. -> whether it was set."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, size) == 1


def trim_heap() -> bool:
    """malloc_trim(0) where glibc has it; -> whether memory was returned."""
    return bool(_malloc_trim(0)) if _malloc_trim is not None else False


class HeapTrimmer:
    """start() / stop(): the periodic trim thread (one per app)."""

    def __init__(self, interval_s: float = TRIM_INTERVAL_S):
        """interval_s 0: never trim."""
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if _malloc_trim is None or self._thread is not None or self.interval_s <= 0:
            return
        pin_mmap_threshold()
        self._thread = threading.Thread(target=self._run, name="phi3v-heap-trim", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                trim_heap()
            except Exception:  # never let housekeeping take anything down
                log.debug("malloc_trim failed", exc_info=True)
                return
