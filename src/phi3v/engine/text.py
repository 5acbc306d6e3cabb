"""A row's token ids -> text: incremental detokenization, stop ids and caller-given stop strings."""

from __future__ import annotations


class StopMatcher:
    """Finds caller-given stop strings in the growing text and says how much is safe to emit:
    text that could still be the start of a stop string is held back."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.longest = max((len(s) for s in self.stops), default=0)

    def check(self, text: str, emitted: int) -> tuple[int, bool]:
        """-> (safe length of `text` to emit, stopped?). `emitted` = length already emitted."""
        if not self.stops:
            return len(text), False
        lo = max(0, emitted - self.longest)
        hits = [i for i in (text.find(s, lo) for s in self.stops) if i >= 0]
        if hits:
            return min(hits), True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:n]):
                    hold = n
                    break
        return len(text) - hold, False


class TextAssembler:
    """One sequence's token ids -> text deltas: incremental detokenization, stop ids, stop strings.

    push(token) returns the text now safe to show; `finish_reason` becomes "stop" at a stop id or
    a stop string (the caller then ends that sequence). flush() releases held-back text when the
    sequence ends by length. `ids` keeps every pushed id (a stop id included, as before).
    """

    def __init__(self, tokenizer, stop_ids: frozenset[int], stops: tuple[str, ...]):
        self.decoder = tokenizer.incremental()
        self.matcher = StopMatcher(stops)
        self.stop_ids = stop_ids
        self.ids: list[int] = []
        self.text = ""  # what has been emitted
        self.finish_reason: str | None = None
        self._raw = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return ""
        self._raw += self.decoder.push(token)
        safe, stopped = self.matcher.check(self._raw, len(self.text))
        delta = ""
        if safe > len(self.text):
            delta = self._raw[len(self.text):safe]
            self.text = self._raw[:safe]
        if stopped:
            self.finish_reason = "stop"
        return delta

    def flush(self) -> str:
        """End by length: text held back for a stop string that never came is released. Bytes of a
        character that max_new_tokens cut off are dropped, not shown as U+FFFD."""
        self._raw += self.decoder.flush().rstrip("\ufffd")
        delta = self._raw[len(self.text):]
        self.text = self._raw
        self.finish_reason = self.finish_reason or "length"
        return delta
