"""The KV cache of the rows that decode together, left-padded to a common length.

Rows are prefilled alone (each in its own one-row cache) and then join: their keys/values are
copied in right-aligned, so every row's last token sits in the same slot and one decoder call
per step serves them all. Each row keeps its own positions (0..n-1 for its real tokens, so RoPE
and the long/short regime are what a run alone would use); `key_valid` hides the pad slots.

    slot:      0    1    2    3    4    5
    row 0:    pad  pad  t0   t1   t2   t3        next position 4
    row 1:    t0   t1   t2   t3   t4   t5        next position 6

A row that leaves is compacted away; pad columns that no row needs any more are trimmed.
"""

from __future__ import annotations

import torch

from .decoder import KVCache, build_attention_mask
from .fused_step import Group, forward_groups
from .model import Phi3VForCausalLM

# Leading all-pad columns are cut once this many accumulate (each cut copies the cache).
TRIM_SLOTS = 64


class RunningBatch:
    def __init__(self, model: Phi3VForCausalLM):
        self.model = model
        self.cache: KVCache | None = None  # (B, KVH, capacity, D) per layer; None while empty
        self.key_valid: torch.Tensor | None = None  # (B, length) False at pad slots; None = no padding
        self.next_pos: torch.Tensor | None = None  # (B,) position of each row's next token

    @property
    def size(self) -> int:
        return 0 if self.cache is None else self.cache.batch

    # -- rows joining and leaving ----------------------------------------------------------------
    def join(self, row_cache: KVCache) -> int:
        """Add a row whose own one-row cache holds its whole sequence so far -> its batch index.
        The first row's cache becomes the batch cache as it is (no copy)."""
        n = row_cache.length
        device = self.model.lm_head.weight.device
        if self.cache is None:
            self.cache, self.key_valid = row_cache, None
            self.next_pos = torch.tensor([n], dtype=torch.long, device=device)
            return 0
        old, B, C = self.cache, self.cache.batch, self.cache.length
        width = max(C, n)
        merged = _unfilled_like(old, B + 1, width)
        for layer in range(old.num_layers):  # one layer at a time: peak = old cache + merged so far
            for new_store, old_store, row_store in ((merged.k, old.k, row_cache.k), (merged.v, old.v, row_cache.v)):
                buf = _zeros_layer(merged)
                buf[:B, :, width - C:width] = old_store[layer][:, :, :C]
                buf[B, :, width - n:width] = row_store[layer][0, :, :n]
                new_store.append(buf)
                old_store[layer] = row_store[layer] = None
        valid = torch.zeros(B + 1, width, dtype=torch.bool, device=device)
        valid[:B, width - C:] = True if self.key_valid is None else self.key_valid
        valid[B, width - n:] = True
        self.cache = merged
        self.key_valid = None if bool(valid.all()) else valid
        self.next_pos = torch.cat([self.next_pos, torch.tensor([n], dtype=torch.long, device=device)])
        return B

    def keep(self, indices: list[int]) -> None:
        """Keep only these batch rows, in this order (the others leave and free their slots)."""
        if indices == list(range(self.size)):
            return
        if not indices:
            self.cache = self.key_valid = self.next_pos = None
            return
        idx = torch.tensor(indices, device=self.next_pos.device)
        c = self.cache
        for layer in range(c.num_layers):  # one layer at a time: peak memory = cache + one layer
            c.k[layer] = c.k[layer].index_select(0, idx)
            c.v[layer] = c.v[layer].index_select(0, idx)
        c.batch = len(indices)
        self.next_pos = self.next_pos.index_select(0, idx)
        if self.key_valid is not None:
            kv = self.key_valid.index_select(0, idx)
            self.key_valid = None if bool(kv.all()) else kv
        self._trim()

    def take_row(self, j: int) -> KVCache:
        """Row j's keys/values as a one-row cache without padding (for a follow-up's prefix
        reuse). A batch of one without padding hands over its cache itself."""
        n = int(self.next_pos[j])
        if self.size == 1 and self.key_valid is None:
            return self.cache
        c = self.cache
        out = _unfilled_like(c, 1, n)
        for layer in range(c.num_layers):
            for new_store, old_store in ((out.k, c.k), (out.v, c.v)):
                buf = _zeros_layer(out)
                buf[0, :, :n] = old_store[layer][j, :, c.length - n:c.length]
                new_store.append(buf)
        return out

    # -- decoding --------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, tokens: list[int]) -> torch.Tensor:
        """Feed one token per row (batch order) -> (B, vocab) float32 logits of the next token."""
        group = self._decode_group(tokens)
        h = self.model.forward_hidden(group.embeds, group.positions, self.cache, group.mask)
        self.next_pos += 1
        return self.model.logits(h[:, -1])

    @torch.inference_mode()
    def step_with(self, tokens: list[int], others: list[Group], want_logits: list[bool]) -> torch.Tensor:
        """step() and `others` (newcomers' prefill chunks, each (1, C_i, hidden) into its own cache)
        in one decoder pass (engine/fused_step.py) -> (B + k, vocab) float32 logits: the B rows',
        then for each other with want_logits (k of them, in order) the logits after its last position."""
        group = self._decode_group(tokens)
        h_rows, *h_others = forward_groups(self.model, [group, *others])  # (B, 1, hidden), (1, C_i, hidden)
        self.next_pos += 1
        last = [h_rows[:, -1]] + [h[:, -1] for h, want in zip(h_others, want_logits) if want]
        return self.model.logits(torch.cat(last))  # one lm_head call for every row that needs logits

    def _decode_group(self, tokens: list[int]) -> Group:
        """The rows' next tokens as a decoder group: embeds (B, 1, hidden) at next_pos, the pad mask
        grown by the new slot."""
        dev = self.next_pos.device
        embeds = self.model.model.embed_tokens(torch.tensor(tokens, device=dev))[:, None]  # (B, 1, hidden)
        self._grow_mask()
        mask = build_attention_mask(1, self.cache.length, self.key_valid, dev)
        return Group(embeds, self.next_pos[:, None], self.cache, mask)

    def advance(self) -> None:
        """Make room for one more token per row without computing it (every row's new slot is
        then written by rewrite_row)."""
        self.cache.reserve(self.cache.length + 1)
        self.cache.length += 1
        self._grow_mask()
        self.next_pos += 1

    def rewrite_row(self, j: int, row_cache: KVCache) -> None:
        """Overwrite row j's real slots with a one-row cache of its whole sequence (the
        Phi-3.5-vision switch to long RoPE re-prefills a row alone, spec §7.4)."""
        n, c = row_cache.length, self.cache
        assert n == int(self.next_pos[j]), "the rewritten sequence must be the row's whole sequence"
        for layer in range(c.num_layers):
            c.k[layer][j, :, c.length - n:c.length] = row_cache.k[layer][0, :, :n]
            c.v[layer][j, :, c.length - n:c.length] = row_cache.v[layer][0, :, :n]

    # -- internals -------------------------------------------------------------------------------
    def _grow_mask(self) -> None:
        if self.key_valid is not None:
            new = torch.ones(self.size, 1, dtype=torch.bool, device=self.key_valid.device)
            self.key_valid = torch.cat([self.key_valid, new], dim=1)

    def _trim(self) -> None:
        """Cut leading slots that are padding in every row (after long rows left)."""
        if self.key_valid is None:
            used = self.cache.length - int(self.next_pos.max())
        else:
            used = int(self.key_valid.any(dim=0).int().argmax())
        if used < TRIM_SLOTS:
            return
        c, keep = self.cache, self.cache.length - used
        trimmed = _unfilled_like(c, c.batch, keep)
        for layer in range(c.num_layers):  # one layer at a time: peak = cache + one layer
            for new_store, old_store in ((trimmed.k, c.k), (trimmed.v, c.v)):
                buf = _zeros_layer(trimmed)
                buf[:, :, :keep] = old_store[layer][:, :, used:c.length]
                new_store.append(buf)
                old_store[layer] = None
        self.cache = trimmed
        if self.key_valid is not None:
            kv = self.key_valid[:, used:]
            self.key_valid = None if bool(kv.all()) else kv


def _unfilled_like(like: KVCache, batch: int, length: int) -> KVCache:
    """A cache of `batch` rows, `length` slots filled, room to grow, no buffers yet: the caller
    appends each layer's (batch, KVH, capacity, D) buffer (_zeros_layer) as it copies into it."""
    out = KVCache(like.num_layers, batch, like.heads, like.head_dim, like.dtype, like.device, like.max_len)
    grow = KVCache.GROW_CHUNK
    out.capacity = min(like.max_len, -(-(length + 1) // grow) * grow)
    out.length = length
    return out


def _zeros_layer(cache: KVCache) -> torch.Tensor:
    # Zeros, not empty: decode_attention reads whole buffers and needs finite unused slots.
    return torch.zeros(cache.batch, cache.heads, cache.capacity, cache.head_dim, dtype=cache.dtype, device=cache.device)
