"""How much of a newcomer's work a decode step may carry, from the times the loop measures.

While rows are decoding, every step also advances the requests waiting to join (their vision tower,
then their prompt's prefill). Fixed small pieces keep the running streams smooth but admit a
newcomer slowly: each piece pays for a whole decode pass, so admitting eight requests one after
another dominates the wall time (docs/server.md, concurrency benchmark). A time budget instead
sizes the pieces to the machine: a step with newcomer work may take about (1 + share) times a
plain decode step of the current batch.

    t_dec     moving average of the plain decode steps (the running rows only)
    target    (1 + share) * t_dec: what a step with newcomer work should take
    vision    pieces (vision_chunk crops x vision_layers layers) back to back within the step,
              while the time spent plus the last piece's time stays within share * t_dec
    prefill   a fused step (engine/fused_step.py) reads the weights once for the rows' tokens and
              the chunk, so its time is about max(t_dec, chunk / rate): the chunk is rate * target
              tokens, rate = tokens per second of the recent fused steps (whole step counted, so
              it is never overestimated); a separate prefill pass gets share * t_dec; it grows at most 2x per step from the configured
              minimum, and never past the one-pass limit

Until a plain decode step has been measured (and with share None) the fixed minimum pieces are used.
"""

from __future__ import annotations

# Weight of the newest sample in the moving averages.
_EMA = 0.5
# A chunk at most this many times the previous one (the rate behind it was measured on smaller chunks).
_GROWTH = 2.0


class StepBudget:
    def __init__(self, share: float | None, min_tokens: int | None, max_tokens: int):
        """share: newcomer work a step may add, as a fraction of a plain decode step (None: fixed
        pieces: min_tokens per step and one vision piece). min_tokens: the smallest prefill chunk
        (None: whole prompts, no budget). max_tokens: the largest chunk."""
        self.share = share if min_tokens is not None else None
        self.min_tokens, self.max_tokens = min_tokens, max_tokens
        self.decode_s: float | None = None  # moving average of plain decode steps
        self.rate: float | None = None  # prompt tokens per second of recent fused/prefill steps
        self._last_tokens: int | None = None

    @property
    def active(self) -> bool:
        return self.share is not None and self.decode_s is not None

    def saw_decode(self, seconds: float) -> None:
        """A plain decode step of the running rows took `seconds`."""
        self.decode_s = seconds if self.decode_s is None else _EMA * seconds + (1 - _EMA) * self.decode_s

    def saw_prefill(self, tokens: int, seconds: float) -> None:
        """A step that prefilled `tokens` prompt tokens (with or without the rows' decode) took `seconds`."""
        if tokens <= 0 or seconds <= 0:
            return
        rate = tokens / seconds
        self.rate = rate if self.rate is None else _EMA * rate + (1 - _EMA) * self.rate
        self._last_tokens = tokens

    def prefill_tokens(self, fused: bool) -> int | None:
        """Prompt tokens the next step may prefill while rows run (None: no limit). fused: the chunk
        shares the rows' decoder pass (its time is the step's); else a pass of its own after it."""
        if self.min_tokens is None:
            return None
        if not self.active or self.rate is None:
            return self.min_tokens
        target_s = ((1 + self.share) if fused else self.share) * self.decode_s
        tokens = int(self.rate * target_s)
        if self._last_tokens is not None:
            tokens = min(tokens, int(self._last_tokens * _GROWTH))
        return max(self.min_tokens, min(self.max_tokens, tokens))

    def more_vision(self, spent_s: float, last_piece_s: float) -> bool:
        """After a vision piece in this step: may another one run? (spent_s: newcomer work so far in
        this step; last_piece_s: what the last piece took.)"""
        if not self.active:
            return False
        return spent_s + last_piece_s <= self.share * self.decode_s
