"""The int8 x int8 GEMM of the W8A8 scheme: y = (x quantized per token) (W quantized per channel)^T.

Math (x (M, K) activations, W (N, K) weights):
  weights      qw = round(W / sw) in [-127, 127], sw[n] = max|W[n, :]| / 127  (quant.layers.quantize_int8)
  activations  qx = round(x / sx) in [-127, 127], sx[m] = max|x[m, :]| / 127 rounded up to a bf16
               value, computed per call ("dynamic per-token"), stored as u8 = qx + 128 (zero point
               128, the same for every row)
  y[m, n] = sx[m] * sw[n] * sum_k qx[m, k] qw[n, k]      (exact int32 sum, then one float scaling)

Kernels, best first (`choose_kernel()`; PHI3V_W8A8_KERNEL=onednn|int_mm|torch forces one):
  onednn  torch.ops.onednn.qlinear_pointwise (oneDNN's int8 matmul, the op torch's x86 inductor
          quantizer emits) over a weight prepacked once (qlinear_prepack).  It uses VNNI
          (VPDPBUSD, u8 x s8) or AMX-INT8 tiles.  Activations are handed over as u8 with zero point
          128: with s8 activations oneDNN falls back to its reference kernel on CPUs without AMX
          (measured: 228 ms for a 64x256x256 product under ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16).
          Its activation scale is one number per call, so it gets 1.0 and the per-token scale is
          applied to the output afterwards (one pass over (M, N)).
          Used when the CPU has int8 dot products (/proc/cpuinfo: avx512_vnni, avx_vnni or amx_int8).
  int_mm  torch._int_mm (s8 x s8 -> s32, any CPU; exact): the portable integer path.
  torch   the same math in float (qx and qw as floats, F.linear): any device, and the reference the
          tests compare the other two with.

Activations are quantized by the C loop of quant.w8a8_native where it is built (one read per row;
~7x torch's five-pass version, identical bytes), else by quantize_rows_torch.

Micro-benchmark (scripts/w8a8_kernels.py, 1 thread, shared 2-core machine at load ~4.5: rough;
CLIP-L layers at 577 rows, decoder layers at 512 rows), bf16 GEMM time / time:
  this CPU (amx_int8 and amx_bf16: oneDNN uses AMX for both)   GEMM alone 1.8-2.3x, whole W8A8 layer
                                                               (quantize + GEMM + epilogue) 1.5-2.0x
  AMX masked (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16: VNNI vs     GEMM alone 6.2-9.9x, whole layer 4.6-8.2x
  AVX-512 BF16, as on a CPU without AMX)
  torch._int_mm 0.6-1.7x (AMX machine); fbgemm's quantized::linear_dynamic (per-tensor activation
  scale, deprecated quantized tensors) 0.2-1.1x in an earlier run: not used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import Phi3VError
from . import w8a8_native

KERNELS = ("onednn", "int_mm", "torch")
INT8_DOT_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")  # any one: the CPU multiplies int8 natively
ZERO_POINT = 128  # u8 activations = int8 value + 128


def cpu_int8_features() -> tuple[str, ...]:
    """The int8 dot-product features /proc/cpuinfo lists (empty when none or not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return tuple(f for f in INT8_DOT_FLAGS if f in flags)
    return ()


def _onednn_ok() -> bool:
    try:
        return hasattr(torch.ops.onednn, "qlinear_pointwise") and hasattr(torch.ops.onednn, "qlinear_prepack") \
            and torch.backends.mkldnn.is_available()
    except (AttributeError, RuntimeError):
        return False


_choice: tuple[str, str] | None = None


def choose_kernel() -> tuple[str, str]:
    """(kernel name, why) for CPU tensors: PHI3V_W8A8_KERNEL when set, else oneDNN where the CPU has
    int8 dot products and torch has the op, else torch._int_mm.  Decided once per process."""
    global _choice
    forced = os.environ.get("PHI3V_W8A8_KERNEL", "").strip().lower()
    if forced:
        if forced not in KERNELS:
            raise Phi3VError(f"PHI3V_W8A8_KERNEL={forced!r} is not one of {', '.join(KERNELS)}")
        if forced == "onednn" and not _onednn_ok():
            raise Phi3VError("PHI3V_W8A8_KERNEL=onednn: this torch build has no oneDNN int8 linear")
        return forced, "forced by PHI3V_W8A8_KERNEL"
    if _choice is None:
        features = cpu_int8_features()
        if features and _onednn_ok():
            _choice = ("onednn", f"oneDNN int8 matmul ({', '.join(features)})")
        else:
            why = "no int8 dot products in /proc/cpuinfo" if not features else "no oneDNN int8 linear in torch"
            _choice = ("int_mm", f"torch._int_mm ({why})")
    return _choice


@dataclass
class PackedWeight:
    """A W8A8 layer's weight in the form its kernel reads (built once, after loading)."""

    kernel: str  # one of KERNELS
    qweight: torch.Tensor  # (N, K) int8, the portable form (the torch kernel and int_mm read it)
    scales: torch.Tensor  # (N,) float32 per-channel weight scales
    packed: torch.Tensor | None = None  # oneDNN's blocked weight (onednn only)
    zero_points: torch.Tensor | None = None  # (N,) int64 zeros: symmetric weights (onednn only)


def pack_weight(qweight: torch.Tensor, scales: torch.Tensor) -> PackedWeight:
    """qweight (N, K) int8, scales (N,) -> the PackedWeight for qweight's device."""
    scales = scales.float().contiguous()
    if qweight.device.type != "cpu":
        return PackedWeight("torch", qweight, scales)
    kernel, _ = choose_kernel()
    w8a8_native.prepare()  # the C activation quantizer is built while loading, not in the first request
    if kernel == "onednn":
        packed = torch.ops.onednn.qlinear_prepack(qweight.contiguous(), None)
        zeros = torch.zeros(qweight.shape[0], dtype=torch.int64)
        return PackedWeight(kernel, qweight, scales, packed, zeros)
    return PackedWeight(kernel, qweight, scales)


# ---------------------------------------------------------------------------------------------
# activations


def quantize_rows(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 (M, K) float -> (u8 (M, K) = round(x / sx) + 128, sx (M, 1) float32), symmetric per row:
    the C quantizer (quant.w8a8_native) where it is built, else quantize_rows_torch (same bytes)."""
    got = w8a8_native.quantize_rows(x2)
    return got if got is not None else quantize_rows_torch(x2)


def quantize_rows_torch(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows in torch ops.

    sx is max|x[m, :]| / 127 rounded *up* to a bfloat16 value: the output can then be scaled in
    bf16 without rounding sx (a vectorized same-dtype multiply; a bf16 x fp32 in-place multiply is
    ~4x slower on CPU), and |x| / sx <= 127 still holds, so no clamp is needed before the cast.
    Every op here is same-dtype (mixed bf16/fp32 elementwise ops take torch's slow path)."""
    amax = x2.abs().amax(dim=1, keepdim=True).float()  # (M, 1); exact for bf16 inputs
    sx = (amax.clamp_(min=1e-30) / 127.0)
    sx = (sx * (1.0 + 2.0**-7)).to(torch.bfloat16).float()  # >= the exact scale, a bf16 value
    xf = x2.float()
    scaled = xf.mul_(1.0 / sx) if xf.data_ptr() != x2.data_ptr() else xf * (1.0 / sx)  # never write x2
    return scaled.round_().add_(ZERO_POINT).to(torch.uint8), sx


# ---------------------------------------------------------------------------------------------
# the product


def linear_w8a8(x2: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x2 (M, K) float -> (M, N) in x2's dtype: activations quantized per token, int8 GEMM, scaled."""
    u8, sx = quantize_rows(x2)
    out_dtype = x2.dtype
    if weight.kernel == "onednn":
        # x_scale 1.0 and zero point 128: oneDNN returns sum_k qx qw * sw[n]; sx[m] applied below.
        y = torch.ops.onednn.qlinear_pointwise(u8, 1.0, ZERO_POINT, weight.packed, weight.scales,
                                               weight.zero_points, None, 1.0, 0, out_dtype, "none", [], "")
        if w8a8_native.scale_rows(y, sx, bias):  # y * sx (+ bias) in place, one pass
            return y
        sxo = sx.to(out_dtype)  # sx is a bf16 value: exact in either dtype
        if bias is None:
            return y.mul_(sxo)
        # y * sx + bias in one pass, rounded once (mul_ then add_ is two passes; ~3x slower measured)
        return torch.addcmul(bias if bias.dtype == out_dtype else bias.to(out_dtype), y, sxo, out=y)
    elif weight.kernel == "int_mm":
        acc = torch._int_mm(_signed(u8), weight.qweight.t())  # (M, N) int32, exact
        y = (acc.float().mul_(sx).mul_(weight.scales)).to(out_dtype)
    else:
        acc = F.linear(_signed(u8).float(), weight.qweight.float())
        y = (acc.mul_(sx).mul_(weight.scales)).to(out_dtype)
    if bias is not None:
        y = y.add_(bias if bias.dtype == y.dtype else bias.to(y.dtype))
    return y


def _signed(u8: torch.Tensor) -> torch.Tensor:
    """u8 activations (value + 128) -> the int8 values."""
    return (u8.to(torch.int16) - ZERO_POINT).to(torch.int8)
