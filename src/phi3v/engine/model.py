"""Phi3VForCausalLM: text embeddings with image features spliced in, the decoder, the LM head.

Parameter names equal the checkpoint's (`model.embed_tokens.weight`, `model.layers.N.*`,
`model.vision_embed_tokens.*`, `model.norm.weight`, `lm_head.weight`).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import Phi3VConfig
from .decoder import DecoderLayer, KVCache, LongRoPE, RMSNorm
from ..kernels.decode_linear import DecodeLinear
from .vision import ImageEmbedding


class Phi3VBackbone(nn.Module):
    def __init__(self, cfg: Phi3VConfig):
        super().__init__()
        t = cfg.text
        # _weight skips the random init (slow for a large table; the checkpoint overwrites it anyway).
        self.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size, _weight=torch.empty(t.vocab_size, t.hidden_size))
        self.vision_embed_tokens = ImageEmbedding(cfg)
        self.layers = nn.ModuleList(DecoderLayer(t) for _ in range(t.num_hidden_layers))
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.rotary = LongRoPE(t)


class Phi3VForCausalLM(nn.Module):
    def __init__(self, cfg: Phi3VConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Phi3VBackbone(cfg)
        self.lm_head = DecodeLinear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)

    # -- inputs ---------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, image_embeds: list[torch.Tensor] | None = None) -> torch.Tensor:
        """input_ids (L,) with image k's placeholders = -k; image_embeds[k-1] (T_k, hidden).

        Returns (L, hidden). Each image's rows go into its own -k run (the reference fills runs in
        scan order, which only differs for out-of-order tags). The caller's ids are not modified.
        """
        ids = input_ids.to(self.model.embed_tokens.weight.device)
        x = self.model.embed_tokens(ids.clamp(min=0))
        for k, feats in enumerate(image_embeds or (), start=1):
            where = (ids == -k).nonzero().squeeze(1)
            if where.numel() != feats.shape[0]:
                raise ValueError(f"image {k}: {where.numel()} placeholders but {feats.shape[0]} image vectors")
            x[where] = feats.to(x.dtype)
        return x

    def new_cache(self, batch: int = 1, max_len: int | None = None) -> KVCache:
        t, w = self.cfg.text, self.lm_head.weight
        return KVCache(t.num_hidden_layers, batch, t.num_key_value_heads, t.head_dim, w.dtype, w.device,
                       max_len or t.max_position_embeddings)

    # -- decoder --------------------------------------------------------------------------------
    def forward_hidden(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
        rope_len: int | None = None,
    ) -> torch.Tensor:
        """embeds (B, L, hidden), positions (B, L) -> final-normed hidden states (B, L, hidden).

        With a cache, the new keys/values are written at slots [cache.length, cache.length + L)
        and cache.length advances.  rope_len: the sequence length that picks the RoPE factors
        (a chunk of a longer prompt: the prompt's length; None = this call's, decoder.LongRoPE).
        """
        start = 0
        if cache is not None:
            start = cache.length
            cache.reserve(start + embeds.shape[1])
        cos, sin = self.model.rotary(positions.to(embeds.device), embeds.dtype, rope_len)
        h = embeds
        for i, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, cache, i, start, mask)
        if cache is not None:
            cache.length = start + embeds.shape[1]
        return self.model.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., hidden) -> float32 logits (..., vocab)."""
        return self.lm_head(hidden).float()


def meta_module(cfg: Phi3VConfig) -> Phi3VForCausalLM:
    """The module's structure without memory: every tensor on the meta device (shapes only).
    The loader fills it from the checkpoint (engine.loader); engine.facts counts its parameters."""
    with torch.device("meta"):
        return Phi3VForCausalLM(cfg)
