"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling, with
repetition penalty. One Sampler per row (its own seeded generator)."""

from __future__ import annotations

import torch

from ..options import GenerationOptions


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
