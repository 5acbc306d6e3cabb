"""One decoder pass over several groups of rows: the running batch's decode step together with a
newcomer's prefill chunk.

At full size a CPU decoder pass is bound by reading the weights (~7.6 GB bf16), whether it carries
B decode tokens or a 32-token prefill chunk. A newcomer's chunk run as its own pass therefore costs
the running rows a whole extra weight read; here the two share one:

    per layer:  x = [group 0 rows | group 1 rows]        (N = B0*L0 + B1*L1, hidden)
                norm, qkv_proj on x                      weights read once
                split -> each group attends through its own KV cache, mask and RoPE positions
                        (Attention.attend: decode rows through the batch cache, the chunk through
                         its one-row cache after its prefix, as a separate pass would)
                o_proj, norm, MLP on the concatenated rows again

Every per-token operation sees the same rows as in separate passes, so results equal them up to
float summation order of the larger matmuls (tests/test_fused_step.py states the tolerance).
Quantized layers and DecodeLinear pick their kernel by the row count N, as for any call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .decoder import KVCache


@dataclass
class Group:
    """Rows that attend together: embeds (B, L, hidden) at positions (B, L), written into `cache`
    at slots [cache.length, cache.length + L) with `mask` (decoder.build_attention_mask, None =
    plain causal / one token sees all). rope_len: the length that picks the RoPE factors
    (None = each row's largest position + 1, decoder.LongRoPE)."""

    embeds: torch.Tensor
    positions: torch.Tensor
    cache: KVCache
    mask: torch.Tensor | None = None
    rope_len: int | None = None


@torch.inference_mode()
def forward_groups(model, groups: list[Group]) -> list[torch.Tensor]:
    """One decoder pass over every group -> each group's final-normed hidden states (B, L, hidden).
    Each group's cache advances by its L, as model.forward_hidden would."""
    shapes = [g.embeds.shape[:2] for g in groups]  # (B_i, L_i)
    sizes = [b * n for b, n in shapes]  # rows of each group in the concatenation
    starts = []
    rotations = []  # (cos, sin) per group, (B_i, 1, L_i, D)
    for g in groups:
        starts.append(g.cache.length)
        g.cache.reserve(g.cache.length + g.embeds.shape[1])
        rotations.append(model.model.rotary(g.positions.to(g.embeds.device), g.embeds.dtype, g.rope_len))
    hidden = groups[0].embeds.shape[-1]
    h = torch.cat([g.embeds.reshape(-1, hidden) for g in groups])[None]  # (1, N, hidden)
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        qkv = attn.qkv_proj(layer.input_layernorm(h))[0]  # (N, q + 2kv)
        outs = []
        for g, (b, n), (cos, sin), start, part in zip(groups, shapes, rotations, starts, qkv.split(sizes)):
            out = attn.attend(part.reshape(b, n, -1), cos, sin, g.cache, i, start, g.mask)  # (B_i, L_i, q)
            outs.append(out.reshape(b * n, -1))
        h = h + attn.o_proj(torch.cat(outs)[None])
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    for g, start in zip(groups, starts):
        g.cache.length = start + g.embeds.shape[1]
    h = model.model.norm(h)[0]  # (N, hidden)
    return [part.reshape(b, n, hidden) for part, (b, n) in zip(h.split(sizes), shapes)]
