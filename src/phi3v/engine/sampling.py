"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling, with
repetition penalty. One Sampler per row (its own seeded generator)."""

from __future__ import annotations

import torch

from ..options import GenerationOptions

_F32 = torch.finfo(torch.float32)


def torch_seed(seed: int) -> int:
    """`seed` as torch.Generator.manual_seed takes it: -2**63 .. 2**64-1 as they are, any other
    integer modulo 2**64. Seeds are any integer (OpenAI's API and ours say "integer"; a bound
    could not even be written exactly in the OpenAPI schema, whose bounds are floats), and a
    seed's only job is to name a reproducible stream: two seeds 2**64 apart share one."""
    return seed if -2**63 <= seed < 2**64 else seed % 2**64


class Sampler:
    """Greedy (temperature 0) or temperature / top-k / top-p sampling, with repetition penalty.

    Every value GenerationOptions accepts must give a valid distribution, however extreme: a
    temperature or penalty that rounds to 0 or overflows in float32 would otherwise make NaN or
    inf probabilities and end the generation with an error.
    """

    def __init__(self, options: GenerationOptions, device):
        self.options = options
        self.generator = None
        # A temperature below float32's smallest normal number is 0 once it meets the float32
        # logits (x / 0 = inf, 0 / 0 = NaN); its limit, greedy decoding, is what it asks for.
        self.greedy = options.greedy or options.temperature < _F32.tiny
        if not self.greedy:
            self.generator = torch.Generator(device="cpu")
            if options.seed is not None:
                self.generator.manual_seed(torch_seed(options.seed))
            else:
                self.generator.seed()

    def __call__(self, logits: torch.Tensor, seen_ids: torch.Tensor | None) -> int:
        """logits (V,) float32; seen_ids (n,) earlier token ids for the repetition penalty."""
        o = self.options
        logits = logits.float()
        if o.repetition_penalty != 1.0 and seen_ids is not None and seen_ids.numel():
            logits = logits.clone()
            seen = seen_ids.unique().to(logits.device)
            vals = logits[seen]
            # The penalty kept inside float32's range (a tiny one would round to 0: 0 / 0 = NaN), and
            # the penalized scores kept finite (a huge favour is the largest float, not inf).
            penalty = min(max(o.repetition_penalty, _F32.tiny), _F32.max)
            logits[seen] = torch.where(vals < 0, vals * penalty, vals / penalty).clamp(-_F32.max, _F32.max)
        if self.greedy:
            return int(logits.argmax())
        # Shifted so the best score is 0 before dividing: the scaled scores are <= 0, so a small
        # temperature can only send the others to -inf (probability 0), never the best one to inf.
        logits = (logits - logits.max()) / o.temperature
        if o.top_k > 0 and o.top_k < logits.numel():
            kth = torch.topk(logits, o.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits.float(), dim=-1)
        if o.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            # Drop a token when the mass before it already reaches top_p (always keeps the first).
            drop = (sorted_p.cumsum(0) - sorted_p) >= o.top_p
            drop[0] = False  # a top_p that rounds to 0 in float32 would otherwise drop every token
            sorted_p[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return int(torch.multinomial(probs.cpu(), 1, generator=self.generator))
