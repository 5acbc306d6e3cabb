"""Prefill a long prompt in chunks through the KV cache: activation memory bounded by the chunk.

One pass over a T-token prompt holds (T, intermediate) MLP activations per layer (full-size
Phi-3: T x 16384 bf16, 0.5 GiB at 16k tokens) and, with a cached prefix, a (T, S) attention mask.
In chunks of C tokens every temporary is at most (C, intermediate) and (C, S); the attention is
torch's SDPA, whose CPU flash kernel runs for both the first chunk (plain causal) and the later ones
(a boolean mask: chunk c's queries see every earlier slot and the causal part of their own chunk):
it streams keys in blocks with an online softmax, so no (C, S) or (T, T) score matrix exists either.

Numerics: the same as one pass up to float summation order (the products are the same rows split
differently), with one condition that a naive split breaks: LongRoPE picks its factors from the
sequence length, so every chunk is rotated with the factors of the whole prompt (`rope_len`),
not of the positions it happens to hold.

    logits = prefill_chunked(module, embeds, start, cache, chunk=512)   # (V,) float32
"""

from __future__ import annotations

import torch

from .decoder import KVCache, build_attention_mask

DEFAULT_CHUNK = 512  # rows per chunk: big enough to keep the GEMMs efficient, small in memory


@torch.inference_mode()
def prefill_chunked(model, embeds: torch.Tensor, start: int, cache: KVCache, chunk: int = DEFAULT_CHUNK,
                    rope_len: int | None = None) -> torch.Tensor:
    """embeds (L, hidden) for positions [start, start+L) into `cache` (whose first `start` slots
    hold the prefix), `chunk` rows per decoder call -> the last position's logits (V,) float32.
    rope_len: the length that picks the RoPE factors (default start + L, the whole prompt)."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    L = embeds.shape[0]
    if L == 0:
        raise ValueError("nothing to prefill: the prompt has no tokens past the cached prefix")
    rope_len = start + L if rope_len is None else rope_len
    cache.reserve(start + L)  # once: chunk by chunk it would grow (and copy) the cache several times
    h = None
    for lo in range(0, L, chunk):
        n = min(chunk, L - lo)
        pos = start + lo
        positions = torch.arange(pos, pos + n, device=embeds.device)[None]  # (1, n)
        mask = build_attention_mask(n, pos, None, embeds.device)  # None for the first chunk of a fresh prompt
        h = model.forward_hidden(embeds[None, lo:lo + n], positions, cache, mask, rope_len=rope_len)
    return model.logits(h[0, -1])
