"""The batch output file: one JSON line per finished record, appended as each finishes.

Crash safety: each result is written with a single `os.write` of the whole line on a file opened
with O_APPEND, so a killed job leaves complete lines plus, at worst (a kill in the middle of the
write), one truncated last line.  Reading skips lines that do not parse, and the first append of
a new run starts a fresh line if the file does not end with a newline.

Resume: a record id is *done* when the output holds a line for it; with `retry_errors`, only when
its latest line (the last one in the file for that id) has no error.  So after a retry the file
may hold an old error line followed by the new result for the same id: the latest line wins.

Two jobs appending to one file would interleave their work, so the store takes an exclusive
advisory lock (fcntl.flock, where available) for as long as it is open.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import Phi3VError

try:
    import fcntl
except ImportError:  # Windows: no advisory lock, the rest works
    fcntl = None


def read_results(path: str | os.PathLike) -> dict[str, dict]:
    """id -> latest result line of an output file; unparseable lines (a truncated tail) skipped."""
    latest: dict[str, dict] = {}
    p = Path(path)
    if not p.exists():
        return latest
    with open(p, "rb") as f:
        for raw in f:
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(obj, dict) and isinstance(obj.get("id"), str):
                latest[obj["id"]] = obj
    return latest


def done_ids(results: dict[str, dict], *, retry_errors: bool) -> set[str]:
    """Ids a new run skips: every id present, or with retry_errors only the successful ones."""
    if not retry_errors:
        return set(results)
    return {i for i, r in results.items() if r.get("error") is None}


class ResultStore:
    """Appends result dicts to a JSONL file; use as a context manager (holds the lock)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: int | None = None

    def __enter__(self) -> "ResultStore":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise Phi3VError(
                    f"{self.path} is being written by another batch job; wait for it to finish "
                    "or choose another --out") from None
        self._fd = fd
        self._start_on_fresh_line()

    def _start_on_fresh_line(self) -> None:
        """After a kill mid-write the file may end without '\\n': never glue onto that line."""
        size = os.fstat(self._fd).st_size
        if size == 0:
            return
        with open(self.path, "rb") as f:
            f.seek(size - 1)
            last = f.read(1)
        if last != b"\n":
            os.write(self._fd, b"\n")

    def append(self, result: dict) -> None:
        if self._fd is None:
            raise RuntimeError("ResultStore.append before open()")
        line = (json.dumps(result, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(line)
        while view:  # regular files take it in one write; loop only for the pathological case
            n = os.write(self._fd, view)
            view = view[n:]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # also releases the flock
            self._fd = None
