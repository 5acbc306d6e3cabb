"""CLIP encoder layers on oneDNN pre-packed weights: the CPU fast path of vision.py's ClipLayer.

Why: a plain bf16 `F.linear` on the CPU hands oneDNN a plain (out, in) weight that it reorders into
its blocked layout on every call; packing once and calling `mkldnn._linear_pointwise` skips that
(AVX512-BF16 without AMX: a layer's four products 1.18x faster at 577 rows, 1.06x at 2,885;
docs/performance.md). Per layer the pack also:
- fuses q/k/v into one (3C, C) product (one GEMM instead of three; the checkpoint keeps its names,
  the module its q_proj/k_proj/v_proj parameters: the pack is a copy held beside them),
- adds the residual inside out_proj's and fc2's products (oneDNN's binary post-op: no separate
  add pass, one rounding to bf16 instead of two),
- runs quick_gelu inside fc1's product: quick_gelu(z) = z * sigmoid(1.702 z) = swish(1.702 z) / 1.702,
  and oneDNN's swish post-op (x * sigmoid(x)) is fused, so fc1 is packed with its weight and bias
  times 1.702 and fc2 with its weight divided by 1.702 (scaled in float32, one rounding to the
  layer's dtype); the three elementwise passes over the (N, T, 4C) activations are gone,
- hands SDPA (N, heads, T, head_dim) views of the fused (N, T, 3C) product and reads its output,
  which torch's CPU flash attention lays out as (N, T, heads, head_dim), without a copy.

LayerNorm and SDPA are the same ops as the plain path. In fp32 the results equal the
plain formulation up to float rounding (tests/test_vision_fast.py); in bf16 they differ by the
roundings the fusions save. Off with PHI3V_VISION_PACKED=0 (or `ClipVisionModel.packed_weights =
False`), e.g. to compare (scripts/bench_vision.py).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

ENV = "PHI3V_VISION_PACKED"
QUICK_GELU = 1.702  # quick_gelu(z) = z * sigmoid(QUICK_GELU * z)
# quick_gelu as fc1's swish post-op (True), or a pass of its own after fc1 (for comparisons:
# scripts/bench_vision.py --paths packed,packed-unfused); read when a layer is packed.
FUSE_QUICK_GELU = True


def available() -> bool:
    """Whether this torch build has the oneDNN linear ops the pack needs (CPU builds with mkldnn)."""
    mkldnn = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_linear_pointwise")
            and hasattr(mkldnn, "_reorder_linear_weight"))


def enabled_by_env() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _pack(weight: torch.Tensor, tokens: int) -> torch.Tensor:
    """(out, in) weight -> oneDNN's blocked copy for products of about `tokens` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), tokens)


class PackedLayer:
    """One ClipLayer's four products, packed. Built by `of(layer)`; called as `packed(layer, x)`."""

    __slots__ = ("qkv", "qkv_bias", "out", "out_bias", "fc1", "fc1_bias", "fc2", "fc2_bias", "fused_gelu")

    @classmethod
    def of(cls, layer: nn.Module, tokens: int) -> "PackedLayer | None":
        """A pack of `layer` (a vision.ClipLayer) or None when its products are not plain nn.Linear
        (quantized layers) or not on the CPU."""
        attn, mlp = layer.self_attn, layer.mlp
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, mlp.fc1, mlp.fc2)
        if any(type(m) is not nn.Linear or m.bias is None or m.weight.device.type != "cpu" for m in linears):
            return None
        with torch.no_grad():
            p = cls()
            p.qkv = _pack(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]), tokens)
            p.qkv_bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])  # (3C,)
            p.out, p.out_bias = _pack(attn.out_proj.weight, tokens), attn.out_proj.bias.detach()
            dtype, p.fused_gelu = mlp.fc1.weight.dtype, FUSE_QUICK_GELU
            scale = QUICK_GELU if p.fused_gelu else 1.0
            p.fc1 = _pack((mlp.fc1.weight.float() * scale).to(dtype), tokens)
            p.fc1_bias = (mlp.fc1.bias.float() * scale).to(dtype)
            p.fc2, p.fc2_bias = _pack((mlp.fc2.weight.float() / scale).to(dtype), tokens), mlp.fc2.bias.detach()
        return p

    def fits(self, x: torch.Tensor) -> bool:
        """Whether x is what the pack was made for (the module may have moved or changed dtype since)."""
        return x.device.type == "cpu" and x.dtype == self.qkv_bias.dtype

    def __call__(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x (N, T, C) -> the layer's output (N, T, C), as ClipLayer.forward computes it."""
        linear = torch.ops.mkldnn._linear_pointwise
        N, T, C = x.shape
        heads = layer.self_attn.heads
        qkv = linear(layer.layer_norm1(x), self.qkv, self.qkv_bias, "none", [], "")  # (N, T, 3C)
        # (N, T, 3, heads, hd) -> three (N, heads, T, hd) strided views: no copies before SDPA.
        q, k, v = qkv.view(N, T, 3, heads, C // heads).permute(2, 0, 3, 1, 4).unbind(0)
        att = F.scaled_dot_product_attention(q, k, v)  # (N, heads, T, hd), stored (N, T, heads, hd)
        att = att.transpose(1, 2).reshape(N, T, C)  # a view when stored that way, else one copy
        x = linear.binary(att, x, self.out, self.out_bias, "add")  # out_proj(att) + x
        if self.fused_gelu:
            h = linear(layer.layer_norm2(x), self.fc1, self.fc1_bias, "swish", [], "")  # 1.702 quick_gelu(fc1), (N, T, 4C)
        else:
            h = linear(layer.layer_norm2(x), self.fc1, self.fc1_bias, "none", [], "")
            h = h.mul_(torch.sigmoid_(QUICK_GELU * h))  # quick_gelu, in place: one temporary
        return linear.binary(h, x, self.fc2, self.fc2_bias, "add")  # fc2(h) + x, fc2 pre-divided by 1.702
