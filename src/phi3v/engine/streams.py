"""Iterators over a DecodeLoop for callers that want text: one stream, or a fixed batch.

Both start their work on the first next() (image features, prefill), not when created, and
`close()` cancels what is still running (finish_reason "cancelled").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from ..results import Completion, Timings, Usage
from .generate import DecodeLoop, Row, run_rows


def cancelled_completion(prompt_tokens: int, image_tokens: int, preprocess_s: float) -> Completion:
    """What a stream closed before it started reports."""
    usage = Usage(prompt_tokens=prompt_tokens, image_tokens=image_tokens)
    return Completion("", "cancelled", usage, Timings(preprocess_s=preprocess_s), [])


class TextStream:
    """Iterator of text deltas for one generation. `completion` is set when it ends;
    `close()` stops it early (finish_reason "cancelled")."""

    def __init__(self, loop: DecodeLoop, make_row: Callable[[], Row], on_end: Callable[[Row], None],
                 not_started: Completion):
        """make_row() runs on the first next(); on_end(row) runs once the row is done (any way)."""
        self.completion: Completion | None = None
        self.reused_tokens = 0  # prompt tokens taken from a retained KV cache (not prefilled)
        self._not_started = not_started
        self._gen = self._run(loop, make_row, on_end)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()
        if self.completion is None:
            self.completion = self._not_started

    def text(self) -> str:
        """Consume the stream and return the whole text."""
        for _ in self:
            pass
        return self.completion.text

    def _run(self, loop: DecodeLoop, make_row, on_end) -> Iterator[str]:
        row = make_row()
        self.reused_tokens = row.reuse_prefix if row.cache is not None else 0
        try:
            for _, delta in run_rows(loop, [row]):
                if delta:
                    yield delta
        finally:
            self.completion = row.completion()
            on_end(row)


class BatchStream:
    """Iterator of (index, text delta) over several prompts decoded together; `completions` (one
    per prompt, in order) once it is exhausted; close() ends the rows still running."""

    def __init__(self, loop: DecodeLoop, make_rows: Callable[[], list[Row]], not_started: list[Completion]):
        self.completions: list[Completion | None] = [None] * len(not_started)
        self._not_started = not_started
        self._gen = self._run(loop, make_rows)

    def __iter__(self) -> Iterator[tuple[int, str]]:
        return self

    def __next__(self) -> tuple[int, str]:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()
        for i, c in enumerate(self.completions):
            if c is None:
                self.completions[i] = self._not_started[i]

    def text(self) -> list[str]:
        """Consume the stream and return each prompt's text."""
        for _ in self:
            pass
        return [c.text for c in self.completions]

    def _run(self, loop: DecodeLoop, make_rows) -> Iterator[tuple[int, str]]:
        rows = make_rows()
        index = {id(row): i for i, row in enumerate(rows)}
        try:
            for row, delta in run_rows(loop, rows):
                i = index[id(row)]
                if row.done:
                    self.completions[i] = row.completion()
                if delta:
                    yield i, delta
        finally:
            for i, row in enumerate(rows):
                if self.completions[i] is None:
                    self.completions[i] = row.completion()
