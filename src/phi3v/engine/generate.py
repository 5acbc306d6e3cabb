"""The token loop: prefill, decode one token at a time, sample, stop.

`generate_ids` is a generator of token ids; the caller decides what to print and when to stop
(text-level stop strings live in `StopMatcher`). Long/short RoPE at the 4096 crossing follows
`rope_switch` (see config.ROPE_SWITCH_POLICIES).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .decoder import build_attention_mask
from .model import Phi3VForCausalLM
from ..options import GenerationOptions


# -- sampling -------------------------------------------------------------------------------------
class Sampler:
    """Greedy (temperature 0) or temperature / top-k / top-p sampling, with repetition penalty."""

    def __init__(self, options: GenerationOptions, device):
        self.options = options
        self.generator = None
        if not options.greedy:
            self.generator = torch.Generator(device="cpu")
            if options.seed is not None:
                self.generator.manual_seed(options.seed)
            else:
                self.generator.seed()

    def __call__(self, logits: torch.Tensor, seen_ids: torch.Tensor | None) -> int:
        """logits (V,) float32; seen_ids (n,) earlier token ids for the repetition penalty."""
        o = self.options
        if o.repetition_penalty != 1.0 and seen_ids is not None and seen_ids.numel():
            logits = logits.clone()
            seen = seen_ids.unique().to(logits.device)
            vals = logits[seen]
            logits[seen] = torch.where(vals < 0, vals * o.repetition_penalty, vals / o.repetition_penalty)
        if o.greedy:
            return int(logits.argmax())
        logits = logits / o.temperature
        if o.top_k > 0 and o.top_k < logits.numel():
            kth = torch.topk(logits, o.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits.float(), dim=-1)
        if o.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            # Drop a token when the mass before it already reaches top_p (always keeps the first).
            drop = (sorted_p.cumsum(0) - sorted_p) >= o.top_p
            sorted_p[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return int(torch.multinomial(probs.cpu(), 1, generator=self.generator))


# -- stop strings ---------------------------------------------------------------------------------
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


# -- the loop -------------------------------------------------------------------------------------
@dataclass
class GenerationState:
    """What one running sequence needs (kept so a caller can reuse the cache for a follow-up)."""

    prompt_ids: torch.Tensor  # (L,) int64, image placeholders negative
    image_embeds: list[torch.Tensor]
    cache: object  # KVCache
    generated: list[int] = field(default_factory=list)
    long_rope: bool = False  # cache currently holds keys rotated with the long factors
    prefill_s: float = 0.0


@torch.inference_mode()
def prefill(model: Phi3VForCausalLM, embeds: torch.Tensor, start: int, cache) -> torch.Tensor:
    """embeds (L, hidden) for positions [start, start+L) -> last-position logits (V,) float32."""
    L = embeds.shape[0]
    positions = torch.arange(start, start + L, device=embeds.device)[None]
    mask = build_attention_mask(L, start, None, embeds.device)
    h = model.forward_hidden(embeds[None], positions, cache, mask)
    return model.logits(h[0, -1])


@torch.inference_mode()
def decode_step(model: Phi3VForCausalLM, token: int, cache) -> torch.Tensor:
    pos = cache.length
    ids = torch.tensor([token], device=model.lm_head.weight.device)
    embeds = model.model.embed_tokens(ids)[None]  # (1, 1, hidden)
    h = model.forward_hidden(embeds, torch.tensor([[pos]], device=embeds.device), cache, None)
    return model.logits(h[0, -1])


def generate_ids(
    model: Phi3VForCausalLM,
    state: GenerationState,
    options: GenerationOptions,
    stop_ids: frozenset[int],
    rope_switch: str = "mixed",
    reuse_prefix: int = 0,
    logits_hook=None,
) -> Iterator[int]:
    """Yield generated token ids (a stop id is yielded last, then the loop ends).

    `reuse_prefix` = number of leading prompt tokens whose keys/values are already in
    state.cache (a conversation's earlier turns); only the rest is prefilled.
    `logits_hook(step, logits)` sees the float32 logits each token is chosen from (for tests).
    """
    orig = model.cfg.text.original_max_position_embeddings
    has_long = model.cfg.text.rope_long_factor is not None
    sampler = Sampler(options, model.lm_head.weight.device)
    L = state.prompt_ids.numel()

    t0 = time.perf_counter()
    with torch.inference_mode():
        if state.image_embeds:  # placeholders may sit in the reused part: embed all, keep the rest
            embeds = model.embed(state.prompt_ids, state.image_embeds)[reuse_prefix:]
        else:
            embeds = model.embed(state.prompt_ids[reuse_prefix:])
        state.cache.length = reuse_prefix
        logits = prefill(model, embeds, reuse_prefix, state.cache)
    state.long_rope = has_long and L > orig
    state.prefill_s = time.perf_counter() - t0

    text_ids = state.prompt_ids[state.prompt_ids >= 0]
    for step in range(options.max_new_tokens):
        seen = torch.cat([text_ids, torch.tensor(state.generated, dtype=torch.long)]) \
            if options.repetition_penalty != 1.0 else None
        if logits_hook is not None:
            logits_hook(step, logits)
        token = sampler(logits, seen)
        state.generated.append(token)
        yield token
        if token in stop_ids or step == options.max_new_tokens - 1:
            return
        total = L + len(state.generated)  # sequence length once this token is processed
        if rope_switch == "recompute" and has_long and not state.long_rope and total > orig:
            logits = _recompute_long(model, state)
        else:
            logits = decode_step(model, token, state.cache)


def _recompute_long(model: Phi3VForCausalLM, state: GenerationState) -> torch.Tensor:
    """Phi-3.5-vision behaviour: drop the cache and re-prefill prompt + generated tokens, so every
    position is rotated with the long factors (spec §7.4)."""
    ids = torch.cat([state.prompt_ids, torch.tensor(state.generated, dtype=torch.long)])
    with torch.inference_mode():
        embeds = model.embed(ids, state.image_embeds)
        state.cache.length = 0
        logits = prefill(model, embeds, 0, state.cache)
    state.long_rope = True
    return logits
