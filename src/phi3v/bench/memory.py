"""Resident memory of this process, from /proc/self/status (Linux) with a getrusage fallback."""

from __future__ import annotations

import resource
import sys

GIB = 2**30


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_gib() -> float:
    """Current resident set size (anonymous + file-backed pages, e.g. memory-mapped weights)."""
    kib = _status_kib("VmRSS")
    return (kib or 0) / 2**20


def peak_rss_gib() -> float:
    """Highest resident set size of this process so far."""
    kib = _status_kib("VmHWM")
    if kib is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        kib = peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB on Linux
    return kib / 2**20
