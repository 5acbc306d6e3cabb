"""Phi-3-mini decoder pieces: RMSNorm, LongRoPE, attention with a KV cache, gated MLP (spec §6-7).

Module and parameter names follow the checkpoint (`self_attn.qkv_proj`, `mlp.gate_up_proj`, ...) so
weights load without renaming. Shapes: B batch, L new tokens, S cached + new tokens, H heads, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import native, ops
from .config import TextConfig
from ..kernels.decode_linear import DecodeLinear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Reference numerics: normalise in fp32, cast back to the activation dtype, then scale.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class LongRoPE(nn.Module):
    """LongRoPE ("su") rotary tables. The short/long factor set is chosen per row from that row's
    largest position in the call: long iff TextConfig.uses_long_rope(max(position) + 1), which is
    the reference rule for a single sequence (spec §7.3)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        d = cfg.head_dim
        # The tables are computed on the CPU in fp32 like the reference, whatever the default device:
        # a module built on the meta device (engine.model.meta_module) has them ready, and loading
        # only moves them (they are not in the checkpoint).
        cpu = torch.device("cpu")
        exponent = torch.arange(0, d, 2, dtype=torch.int64, device=cpu).float() / d  # (D/2,)
        base = cfg.rope_theta**exponent
        short = torch.tensor(cfg.rope_short_factor or [1.0] * (d // 2), dtype=torch.float32, device=cpu)
        long = torch.tensor(cfg.rope_long_factor or [1.0] * (d // 2), dtype=torch.float32, device=cpu)
        self.register_buffer("inv_freq_short", 1.0 / (short * base), persistent=False)
        self.register_buffer("inv_freq_long", 1.0 / (long * base), persistent=False)
        self.uses_long_rope = cfg.uses_long_rope  # seq_len -> bool, the config's 4096 rule
        self.has_long = cfg.rope_long_factor is not None
        self.mscale = cfg.rope_mscale

    def forward(self, positions: torch.Tensor, dtype: torch.dtype,
                seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, L) int64 -> cos, sin (B, 1, L, D) in `dtype`, mscale included.
        seq_len: the length the sequence has once the whole call sequence is in (a prompt
        prefilled in chunks: its full length, so an early chunk is rotated with the factors of the
        whole prompt, as one pass would); None = this call's largest position + 1, per row."""
        inv = self.inv_freq_short.expand(positions.shape[0], -1)  # (B, D/2)
        if self.has_long:
            # One host sync for the B (<= a few) row lengths, then the rule per row.
            lengths = [seq_len] * positions.shape[0] if seq_len is not None else (positions.amax(dim=1) + 1).tolist()
            long_rows = [self.uses_long_rope(n) for n in lengths]
            if any(long_rows):
                use_long = torch.tensor(long_rows, device=positions.device)  # (B,)
                inv = torch.where(use_long[:, None], self.inv_freq_long, self.inv_freq_short)
        angles = positions.float()[:, :, None] * inv[:, None, :]  # (B, L, D/2) fp32
        emb = torch.cat((angles, angles), dim=-1)
        cos = (emb.cos() * self.mscale).to(dtype)[:, None]
        sin = (emb.sin() * self.mscale).to(dtype)[:, None]
        return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half layout: x = [x1 | x2] -> x*cos + [-x2 | x1]*sin.  x (B, H, L, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Per-layer key/value buffers (B, H, capacity, D), grown in chunks as the sequence needs them.

    Never sized for the whole 128k context up front (that would be ~48 GiB for the real model);
    capacity grows geometrically (x1.25) so a long generation re-allocates only O(log n) times.
    Keys are stored after rotation, as the reference does.
    """

    GROW_CHUNK = 256

    def __init__(self, num_layers: int, batch: int, heads: int, head_dim: int, dtype, device, max_len: int):
        self.num_layers, self.batch, self.heads, self.head_dim = num_layers, batch, heads, head_dim
        self.dtype, self.device, self.max_len = dtype, torch.device(device), max_len
        self.length = 0  # filled slots (same for every row; rows are left-padded when batched)
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    def reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        if needed > self.max_len:
            raise ValueError(f"sequence of {needed} tokens exceeds the context of {self.max_len}")
        # Grow by a quarter (amortised O(1) copies per token) rather than doubling: at 2.5k tokens the
        # real model's cache is ~1 GiB, and growing it one layer at a time below means the peak is
        # the new cache plus one old layer, not old + new.
        new_cap = max(needed, self.capacity + self.capacity // 4)
        new_cap = min(self.max_len, -(-new_cap // self.GROW_CHUNK) * self.GROW_CHUNK)
        shape = (self.batch, self.heads, new_cap, self.head_dim)
        for store in (self.k, self.v):
            for i in range(self.num_layers):
                # Zeros, not empty: decode_attention reads whole buffers and needs finite unused slots.
                new = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if i < len(store):
                    new[:, :, : self.length] = store[i][:, :, : self.length]
                    store[i] = new
                else:
                    store.append(new)
        self.capacity = new_cap

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, L, D) at slots [start, start+L); return the views of slots [0, start+L)."""
        end = start + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def decode_attention(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, length: int) -> torch.Tensor:
    """Attention of one new token over the first `length` slots of a KV cache.

    q (B, H, 1, D); k_buf, v_buf the cache's whole buffers (B, KVH, capacity, D), whose slots past
    `length` hold zeros or stale finite values. Computed as two matrix-vector products over the
    contiguous buffers (scores = q K^T, out = p V) with the softmax in fp32 like the reference's
    eager attention; slots past `length` get probability 0. Slicing the buffers to `length` first
    would make CPU matmul copy the strided views every step, and SDPA's CPU kernels are built for
    many queries: this is ~5x faster for one query over 2k keys. Returns (B, H, 1, D).
    """
    if _native_attention_ok(q, k_buf, v_buf):  # the native kernel as phi3v::decode_attention: ~7-20x faster
        return ops.decode_attention(q, k_buf, v_buf, length)
    return ops.decode_attention_torch(q, k_buf, v_buf, length)


def _native_attention_ok(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor) -> bool:
    """Whether the native one-query attention takes these (bf16 CPU tensors, contiguous buffers)."""
    return (q.dtype == torch.bfloat16 and k_buf.dtype == torch.bfloat16 and q.device.type == "cpu"
            and k_buf.is_contiguous() and v_buf.is_contiguous() and native.available())


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.qkv_proj = DecodeLinear(cfg.hidden_size, q + 2 * kv, bias=False)  # rows: Q | K | V
        self.o_proj = DecodeLinear(q, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None, layer: int, start: int, mask):
        """x (B, L, hidden) -> (B, L, hidden): projections around attend()."""
        return self.o_proj(self.attend(self.qkv_proj(x), cos, sin, cache, layer, start, mask))

    def attend(self, qkv, cos, sin, cache: KVCache | None, layer: int, start: int, mask) -> torch.Tensor:
        """The per-sequence part between the projections: qkv (B, L, q + 2kv) projected rows ->
        rotate, write the cache, attend -> (B, L, q) for o_proj. engine/fused_step.py calls it per
        group of rows whose projections ran together."""
        B, L, _ = qkv.shape
        q_w, kv_w = self.heads * self.head_dim, self.kv_heads * self.head_dim
        q = qkv[..., :q_w].view(B, L, self.heads, self.head_dim).transpose(1, 2)  # (B, H, L, D)
        k = qkv[..., q_w : q_w + kv_w].view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)
        v = qkv[..., q_w + kv_w :].view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v, start)
            if L == 1 and mask is None:  # decode: one new token attending to everything cached
                out = decode_attention(q, cache.k[layer], cache.v[layer], start + 1)
                return out.reshape(B, 1, q_w)
            if L == 1 and mask.dtype == torch.bool and mask.shape[1:3] == (1, 1) \
                    and _native_attention_ok(q, cache.k[layer], cache.v[layer]):
                # batched decode: the mask (B, 1, 1, S) only hides each row's left padding
                out = ops.decode_attention(q, cache.k[layer], cache.v[layer], start + 1, mask[:, 0, 0])
                return out.reshape(B, 1, q_w)
        if self.kv_heads != self.heads:
            rep = self.heads // self.kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if mask is None:
            # No padding and either a fresh prompt (plain causal) or a single new token (sees everything).
            out = F.scaled_dot_product_attention(q, k, v, is_causal=(L > 1))
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(B, L, q_w)


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_up_proj = DecodeLinear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)  # rows: gate | up
        self.down_proj = DecodeLinear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h, cos, sin, cache, layer, start, mask):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, cache, layer, start, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


def build_attention_mask(
    q_len: int, start: int, key_valid: torch.Tensor | None, device
) -> torch.Tensor | None:
    """Boolean mask (B|1, 1, q_len, start+q_len), True = may attend.

    Needed only when new tokens follow cached ones (q_len > 1 and start > 0) or when rows carry
    padding (`key_valid` (B, start+q_len) False at padded slots). Returns None when plain causal
    attention (or a single token attending to everything) is exact.
    """
    if key_valid is None and (start == 0 or q_len == 1):
        return None
    total = start + q_len
    q_pos = torch.arange(start, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]  # (1, 1, q_len, total)
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :total]
        # A padded query slot would attend to nothing (NaN rows); let every slot see itself.
        mask = mask | (k_pos == q_pos)[None, None]
    return mask
