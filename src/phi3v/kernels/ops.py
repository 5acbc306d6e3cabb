"""The native kernels as torch operators: torch.ops.phi3v.{gemv_bf16, gemv_int8, gemv_int4, decode_attention}.

Why: a ctypes call is invisible to torch.  As `torch.library.custom_op`s the kernels show by name in
torch.profiler (`phi3v::gemv_bf16`, ...), and torch.compile traces through them (each has a fake
implementation that gives the output's shape and dtype without computing anything).

Each operator runs the native kernel (phi3v.kernels.native) when it is built and takes the input,
else a torch fallback with the same numerics (bf16-rounded activations, fp32 accumulation), so the
operators always return a result:

  gemv_bf16(w (N, K) bf16, x (M, K))                                  -> (M, N) in x's dtype
  gemv_int8(qweight (N, K) int8, scales (N,) fp32, x (M, K))          -> (M, N) in x's dtype
  gemv_int4(qweight (N, K/2) uint8 portable nibbles, scales, zeros (N, K/G) bf16, x (M, K), G)
                                                                      -> (M, N) in x's dtype
  decode_attention(q (B, H, 1, D), k_buf, v_buf (B, KVH, cap, D), length, key_valid (B, >=length) bool | None)
                                                                      -> (B, H, 1, D) in q's dtype

The layers call these only where the native kernel is the faster path (few rows, bf16 weights);
the fallbacks make the operators usable on their own (tests, torch.compile on a machine without a
compiler).  Importing this module registers the operators (engine.loader does it at load time).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import native


@torch.library.custom_op("phi3v::gemv_bf16", mutates_args=())
def gemv_bf16(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    y = native.gemv_bf16(w, x)
    if y is None:  # fallback: x rounded to bf16 like the kernel reads it, fp32 accumulation
        y = F.linear(x.to(torch.bfloat16).float(), w.float()).to(x.dtype)
    return y


@gemv_bf16.register_fake
def _(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


@torch.library.custom_op("phi3v::gemv_int8", mutates_args=())
def gemv_int8(qweight: torch.Tensor, scales: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    y = native.gemv_int8(qweight, scales, x)
    if y is None:  # x q^T scaled per output column (the kernel reads x in fp32)
        y = (F.linear(x.float(), qweight.float()) * scales.float()).to(x.dtype)
    return y


@gemv_int8.register_fake
def _(qweight: torch.Tensor, scales: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], qweight.shape[0])


def _dequant_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Portable nibbles (N, K/2) (even input in the low nibble) -> (N, K) fp32 weight:
    (q - 8) * scale + zero per group of K/G inputs."""
    q = torch.stack((qweight & 15, qweight >> 4), dim=-1).view(qweight.shape[0], -1).float()  # (N, K)
    N, K = q.shape
    g = K // scales.shape[1]
    return ((q.view(N, -1, g) - 8.0) * scales.float()[..., None] + zeros.float()[..., None]).view(N, K)


@torch.library.custom_op("phi3v::gemv_int4", mutates_args=())
def gemv_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, x: torch.Tensor,
              group_size: int) -> torch.Tensor:
    y = native.gemv_int4(qweight, scales, zeros, x, group_size)
    if y is None:
        y = F.linear(x.to(torch.bfloat16).float(), _dequant_int4(qweight, scales, zeros)).to(x.dtype)
    return y


@gemv_int4.register_fake
def _(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, x: torch.Tensor,
      group_size: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], qweight.shape[0])


@torch.library.custom_op("phi3v::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, length: int,
                     key_valid: torch.Tensor | None = None) -> torch.Tensor:
    out = native.decode_attention(q, k_buf, v_buf, length, key_valid)
    if out is None:
        out = decode_attention_torch(q, k_buf, v_buf, length, key_valid)
    return out


@decode_attention.register_fake
def _(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, length: int,
      key_valid: torch.Tensor | None = None) -> torch.Tensor:
    return torch.empty_like(q)


def decode_attention_torch(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, length: int,
                           key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """The same attention in torch: one query per row over slots [0, length) of whole cache buffers,
    softmax in fp32, scale 1/sqrt(D); slots past `length` (and slots key_valid hides) get 0."""
    B, H, _, D = q.shape
    kvh = k_buf.shape[1]
    qg = q.reshape(B, kvh, H // kvh, D)  # query heads grouped under their key/value head
    scores = torch.matmul(qg, k_buf.transpose(-1, -2)).float()  # (B, KVH, H/KVH, capacity)
    scores[..., length:] = float("-inf")
    if key_valid is not None:
        hidden = ~key_valid[:, :length].bool()  # (B, length)
        scores[..., :length] = scores[..., :length].masked_fill(hidden[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores * D**-0.5, dim=-1).to(v_buf.dtype)
    return torch.matmul(probs, v_buf).reshape(B, H, 1, D)  # (B, KVH, H/KVH, D) -> (B, H, 1, D)


def warm_up() -> None:
    """Dispatch one operator once on tiny tensors. torch's first call of any custom operator loads
    its dispatch machinery (sympy among it, ~1 s); phi3v.load() pays that, not the first request."""
    with torch.inference_mode():
        gemv_bf16(torch.zeros(1, 8, dtype=torch.bfloat16), torch.zeros(1, 8, dtype=torch.bfloat16))
