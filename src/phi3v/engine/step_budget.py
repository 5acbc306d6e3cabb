"""How much of a newcomer's work a decode step may carry, from the times the loop measures.

While rows are decoding, every step also advances the requests waiting to join (their vision tower,
then their prompt's prefill). Fixed small pieces keep the running streams smooth but admit a
newcomer slowly: every step pays a decode pass, so admitting eight requests one after another in
~35 steps each dominated the wall time (docs/server.md, concurrency benchmark). A time budget
sizes the pieces to the machine instead: a step that carries newcomer work may take about `factor`
times the fastest plain decode step seen (one running row's: what a stream alone waits per token).

    t_fast    the fastest plain decode step seen;  t_dec  moving average of the recent ones
    budget    factor * t_fast - t_dec: the newcomer work a step may add to the rows' decode
    vision    pieces (vision_chunk crops x vision_layers layers) back to back within the step,
              while the time spent plus the last piece's time stays within the budget
    prefill   chunk = rate * budget tokens, rate = the prefill's marginal tokens per second: a
              fused step (engine/fused_step.py) costs about t_dec + chunk / rate (measured at full
              size: 411 ms plain, +289 ms for 32 tokens, +1073 ms for 128: ~110-160 tokens/s
              whatever the rows), a separate pass chunk / rate. The chunk grows at most 2x per
              step from the configured minimum (the rate was measured on smaller ones), never
              past the one-pass limit.

Until a plain decode step has been measured (and with factor None) the fixed minimum pieces are used:
one vision piece, min_tokens per step.
"""

from __future__ import annotations

# Weight of the newest sample in the moving averages.
_EMA = 0.5
# A chunk at most this many times the previous one (the rate behind it was measured on smaller chunks).
_GROWTH = 2.0


class StepBudget:
    def __init__(self, factor: float | None, min_tokens: int | None, max_tokens: int):
        """factor: a step with newcomer work may take about this many times the fastest plain decode
        step (None: fixed pieces: min_tokens per step and one vision piece). min_tokens: the smallest
        prefill chunk (None: whole prompts, no budget). max_tokens: the largest chunk."""
        self.factor = factor if min_tokens is not None else None
        self.min_tokens, self.max_tokens = min_tokens, max_tokens
        self.decode_s: float | None = None  # moving average of plain decode steps
        self.fastest_s: float | None = None  # the fastest plain decode step seen
        self.rate: float | None = None  # marginal prompt tokens per second of recent prefill parts
        self._last_tokens: int | None = None

    @property
    def active(self) -> bool:
        return self.factor is not None and self.decode_s is not None

    def budget_s(self) -> float:
        """Seconds of newcomer work the next step may add to the rows' decode (0 when inactive)."""
        if not self.active:
            return 0.0
        return max(0.0, self.factor * self.fastest_s - self.decode_s)

    def saw_decode(self, seconds: float) -> None:
        """A plain decode step of the running rows took `seconds`."""
        self.decode_s = seconds if self.decode_s is None else _EMA * seconds + (1 - _EMA) * self.decode_s
        self.fastest_s = seconds if self.fastest_s is None else min(self.fastest_s, seconds)

    def saw_prefill(self, tokens: int, seconds: float, fused: bool) -> None:
        """A prefill part of `tokens` prompt tokens took `seconds`: a fused step (its time includes
        the rows' decode) or a pass of its own."""
        work = seconds - (self.decode_s or 0.0) if fused else seconds
        if tokens <= 0 or work <= 0 or (fused and self.decode_s is None):
            return
        rate = tokens / work
        self.rate = rate if self.rate is None else _EMA * rate + (1 - _EMA) * self.rate
        self._last_tokens = tokens

    def prefill_tokens(self) -> int | None:
        """Prompt tokens the next step may prefill while rows run (None: no limit)."""
        if self.min_tokens is None:
            return None
        if not self.active or self.rate is None:
            return self.min_tokens
        tokens = int(self.rate * self.budget_s())
        if self._last_tokens is not None:
            tokens = min(tokens, int(self._last_tokens * _GROWTH))
        return max(self.min_tokens, min(self.max_tokens, tokens))

    def more_vision(self, spent_s: float, last_piece_s: float) -> bool:
        """After a vision piece in this step: may another one run? (spent_s: newcomer work so far in
        this step; last_piece_s: what the last piece took.)"""
        return self.active and spent_s + last_piece_s <= self.budget_s()
