"""Weight-only quantization of linear layers: int8 per output channel, int4 per group.

Math (W is a float weight (N, K): N outputs, K inputs):
  int8  q = round(W / s) in [-127, 127], s = max|W[n, :]| / 127 per row n     -> W ~ q * s
  int4  per row and group of G inputs: lo, hi = min, max of the group,
        s = (hi - lo) / 15, z = lo + 8 * s (both rounded to bf16 first, then
        q = round((W - z) / s + 8) in [0, 15])                                -> W ~ (q - 8) * s + z
        This "(q - 8) * scale + zero" form is the one torch's int4 kernels take.

Layers (`WeightOnlyInt8Linear`, `WeightOnlyInt4Linear`) keep the portable form as tensors named
`qweight`, `scales` (and `zeros` for int4), which is also what a quantized checkpoint stores:
  int8  qweight int8 (N, K)            scales (N,)
  int4  qweight uint8 (N, K/2): byte j of a row holds input 2j in its low nibble, 2j+1 in its high
        scales, zeros (N, K/G)
`prepare()` turns them into the layout of the fastest kernel on the layer's device (done once,
after loading): CPU int4 with phi3v's native kernels -> the portable form as it is; CPU int4
without them -> torch's _weight_int4pack_mm_for_cpu layout; CUDA int4 -> tinygemm's
_weight_int4pack_mm layout.  `portable()` gives the checkpoint form back.

Kernels (activations (M, K)):
  CPU, native (phi3v.kernels.native, AVX-512 BF16 or AVX2), M <= native.MAX_ROWS: gemv_int8 (fp32
             activations) and gemv_int4 (bf16 activations); these stream the weight at memory speed
             (int4 with AMX tiles: M <= native.int4_max_rows() = 64, the same numerics)
  int8 CPU   else torch._weight_int8pack_mm with bf16 activations (its fp32 path is a slow scalar
             loop, so fp32 inputs are rounded to bf16 for the kernel and the result cast back)
  int4 CPU   else torch.ops.aten._weight_int4pack_mm_for_cpu (bf16)
  int4 CUDA  torch.ops.aten._weight_int4pack_mm (bf16, tinygemm)
  else       dequantize to the activation dtype and F.linear (exact same math, no speed gain)
For prefill-sized inputs (M >= PREFILL_ROWS[scheme]) on CPU the weight is dequantized to bf16 once per
call (natively in one pass when available) and multiplied with the bf16 GEMM (oneDNN), which beats
the weight-only kernels there.

"w8a8" stores what int8 stores; its layer (w8a8_layer.W8A8Linear) also quantizes the activations of
calls with 9+ rows and multiplies int8 x int8 (w8a8_kernel.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import native, ops
from ..errors import CheckpointError, Phi3VError
from .w8a8_layer import FLOAT_RULES, W8A8Linear, keeps_float

SCHEMES = ("int8", "int4", "w8a8")  # w8a8: quant.w8a8_layer (int8 activations for prefill and vision)
CONFIG_KEY = "phi3v_quantization"  # config.json key of a quantized checkpoint
DEFAULT_GROUP_SIZE = 128
# Rows (tokens) at and above which CPU layers dequantize the weight to bf16 once per call and use the
# bf16 GEMM; below, the weight-only kernels are faster (measured crossovers on AVX-512 without AMX,
# whole int8 model: torch's int8 kernel 1.10 s vs dequantize + GEMM 1.26 s at 20 rows, 1.77 vs 1.45 s
# at 32; int4 with torch's kernel ~256 rows).  int4 with the native kernels dequantizes from 9 rows.
PREFILL_ROWS = {"int8": 24, "int4": 256}

# Linear layers of the decoder that get quantized (names inside model.layers.N).
DECODER_LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
# vision=True quantizes the CLIP encoder layers; the projector (4% of the vision weights) stays float
# because the vision code reads its weight dtype.
_VISION_ENCODER = "model.vision_embed_tokens.img_processor.vision_model.encoder."


# ---------------------------------------------------------------------------------------------
# scheme description (what config.json records)


@dataclass(frozen=True)
class QuantConfig:
    """Which layers are quantized and how; `to_json()` is stored under config.json[CONFIG_KEY]."""

    scheme: str  # "int8" | "int4" | "w8a8"
    group_size: int | None = None  # int4: inputs per (scale, zero) pair; None for int8
    vision: bool = False  # also quantize the CLIP encoder layers
    keep_float: tuple[str, ...] = ()  # w8a8: layers left float, rule names of w8a8_layer.FLOAT_RULES

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise Phi3VError(f"unknown quantization {self.scheme!r}; choose one of {', '.join(SCHEMES)}")
        if self.scheme == "int4":
            g = DEFAULT_GROUP_SIZE if self.group_size is None else self.group_size
            if not isinstance(g, int) or g < 16 or g & (g - 1):
                raise Phi3VError(f"int4 group size must be a power of two >= 16, got {self.group_size!r}")
            object.__setattr__(self, "group_size", g)
        elif self.group_size is not None:
            raise Phi3VError(f"{self.scheme} quantization is per output channel: it takes no group size")
        keep = tuple(self.keep_float)
        if keep and self.scheme != "w8a8":
            raise Phi3VError(f"keep_float is a w8a8 setting; {self.scheme} takes none")
        unknown = [r for r in keep if r not in FLOAT_RULES]
        if unknown:
            raise Phi3VError(f"unknown w8a8 float layer rule(s) {unknown}; choose from {', '.join(FLOAT_RULES)}")
        object.__setattr__(self, "keep_float", keep)

    @classmethod
    def parse(cls, value) -> "QuantConfig | None":
        """None | "int8" | "int4" | "int4:64" (group size) | "w8a8" | "w8a8:first,last" (layers left
        float, w8a8_layer.FLOAT_RULES) | a QuantConfig | a config dict.
        "w8a8" always includes the CLIP encoder (the vision tower is half of its point)."""
        if value is None or isinstance(value, QuantConfig):
            return value
        if isinstance(value, dict):
            return cls.from_json(value)
        text = str(value).strip().lower()
        scheme, _, group = text.partition(":")
        if scheme == "w8a8":
            return cls(scheme, vision=True, keep_float=tuple(r.strip() for r in group.split(",") if r.strip()))
        if group:
            if not group.isdigit():
                raise Phi3VError(f"bad quantization {value!r}: expected int4:GROUP_SIZE, e.g. int4:128")
            return cls(scheme, int(group))
        return cls(scheme)

    @classmethod
    def from_json(cls, d: dict) -> "QuantConfig":
        if not isinstance(d, dict) or "scheme" not in d:
            raise CheckpointError(f"config.json {CONFIG_KEY} must be an object with a 'scheme', got {d!r}")
        try:
            return cls(d["scheme"], d.get("group_size"), bool(d.get("vision", False)), tuple(d.get("keep_float", ())))
        except Phi3VError as err:
            raise CheckpointError(f"config.json {CONFIG_KEY}: {err}") from err

    def to_json(self) -> dict:
        d = {"scheme": self.scheme}
        if self.group_size is not None:
            d["group_size"] = self.group_size
        d["vision"] = self.vision
        if self.keep_float:
            d["keep_float"] = list(self.keep_float)
        return d

    def label(self) -> str:
        if self.scheme == "int4":
            return f"int4 (group {self.group_size})"
        return f"w8a8 ({', '.join(self.keep_float)} float)" if self.keep_float else self.scheme


def checkpoint_quantization(raw_config: dict) -> QuantConfig | None:
    """The scheme a checkpoint's config.json records, or None for a float checkpoint."""
    entry = raw_config.get(CONFIG_KEY)
    return None if entry is None else QuantConfig.from_json(entry)


def target_linear_names(module: nn.Module, qc: QuantConfig) -> list[str]:
    """Full names of the nn.Linear layers `qc` quantizes (decoder layers; CLIP encoder if asked).
    The lm_head and the embeddings stay in float: the engine reads lm_head.weight for its dtype.
    w8a8 also leaves the layers its keep_float rules name in float (quant.w8a8_layer.keeps_float)."""
    names = []
    for name, sub in module.named_modules():
        if not isinstance(sub, nn.Linear) or (qc.scheme == "w8a8" and keeps_float(name, module, qc.keep_float)):
            continue
        if name.startswith("model.layers.") and name.split(".", 3)[3] in DECODER_LINEARS:
            names.append(name)
        elif qc.vision and name.startswith(_VISION_ENCODER):
            names.append(name)
    return names


# ---------------------------------------------------------------------------------------------
# the math


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float -> qweight int8 (N, K), scales float32 (N,), symmetric per row."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (N, K) float -> qweight uint8 (N, K/2) (portable nibbles), scales, zeros bf16 (N, K/G)."""
    N, K = w.shape
    if K % group_size:
        raise Phi3VError(f"int4: input width {K} is not a multiple of the group size {group_size}")
    wg = w.float().view(N, K // group_size, group_size)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    scales = ((hi - lo) / 15.0).clamp(min=1e-8).to(torch.bfloat16)
    zeros = (lo + 8.0 * scales.float()).to(torch.bfloat16)  # value of q = 8
    # q from the bf16-rounded scale/zero, so dequantization reproduces the nearest level.
    q = torch.round((wg - zeros.float()[..., None]) / scales.float()[..., None] + 8.0).clamp_(0, 15)
    return pack_nibbles(q.view(N, K).to(torch.uint8)), scales, zeros


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) values 0..15 -> (N, K/2) uint8: even input in the low nibble, odd in the high."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) uint8 values 0..15 (inverse of pack_nibbles)."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).view(packed.shape[0], -1)


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (qweight.to(dtype) * scales.to(dtype)[:, None])


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Portable int4 tensors -> (N, K) weight in `dtype` (computed in fp32)."""
    q = unpack_nibbles(qweight).float()
    N, K = q.shape
    g = K // scales.shape[1]
    w = (q.view(N, -1, g) - 8.0) * scales.float()[..., None] + zeros.float()[..., None]
    return w.view(N, K).to(dtype)


# ---------------------------------------------------------------------------------------------
# CPU int4 kernel layout: blocks of 64 output rows; for each input k, 32 bytes where byte j holds
# row j (low nibble) and row j + 32 (high nibble) of the block.  Derived from the kernel's own
# packing routine, which `_cpu_int4_pack` calls; `_cpu_int4_unpack` is checked against it.

_CPU_BLOCK_N = 64


def _cpu_int4_pack(portable: torch.Tensor) -> torch.Tensor:
    q = unpack_nibbles(portable).to(torch.int32)  # (N, K) 0..15
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)


def _cpu_int4_unpack(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """Inverse of _cpu_int4_pack (N a multiple of 64) -> the portable (N, K/2) form.  Checked by
    repacking the first block, so a torch that changes its layout fails loudly, not silently."""
    portable = _cpu_int4_unpack_fast(packed, N, K)
    first = _CPU_BLOCK_N * K // 2  # bytes of the first 64-row block
    if not torch.equal(_cpu_int4_pack(portable[:_CPU_BLOCK_N]).reshape(-1), packed.reshape(-1)[:first]):
        raise Phi3VError("this torch version packs CPU int4 weights differently; save from the float "
                         "checkpoint with `phi3v quantize` instead")
    return portable


def _cpu_int4_unpack_fast(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """(N, K/2) CPU kernel layout -> portable (N, K/2), no check."""
    blocks = packed.reshape(N // _CPU_BLOCK_N, K, _CPU_BLOCK_N // 2)  # (N/64, K, 32)
    q = torch.cat((blocks & 15, blocks >> 4), dim=2)  # (N/64, K, 64): rows j, then j + 32
    return pack_nibbles(q.permute(0, 2, 1).reshape(N, K))


# ---------------------------------------------------------------------------------------------
# layers


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


class WeightOnlyInt8Linear(nn.Module):
    """y = x W^T (+ b) with W stored as int8 per-row-scaled (see module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, device=None,
                 dtype=torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None
        self._kernel_scales = None  # scales in the kernel's dtype (bf16 on CPU)
        self._native_scales = None  # float32 scales for phi3v.kernels.native (CPU with the native kernels)

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "WeightOnlyInt8Linear":
        return cls.from_weight(linear.weight.detach(), linear.bias, dtype=linear.weight.dtype)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                    dtype=torch.bfloat16) -> "WeightOnlyInt8Linear":
        """Quantize a float weight (N, K); `dtype` = the model's float dtype (scales, bias)."""
        N, K = weight.shape
        layer = cls(K, N, bias is not None, device=weight.device, dtype=dtype)
        q, s = quantize_int8(weight)
        layer.qweight, layer.scales = q, s.to(dtype)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=False)
        return layer.prepare()

    def prepare(self) -> "WeightOnlyInt8Linear":
        on_cpu = self.qweight.device.type == "cpu"
        self._kernel_scales = self.scales.to(torch.bfloat16) if on_cpu else None
        self._native_scales = self.scales.float().contiguous() if on_cpu and native.available() else None
        return self

    def portable(self) -> dict[str, torch.Tensor]:
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.bias is not None:
            out["bias"] = self.bias.detach()
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        y = self._cpu_forward(x2) if self._kernel_scales is not None else None
        if y is None:  # x W^T = (x q^T) * s per output column: no dequantized copy needed
            y = F.linear(x2, self.qweight.to(x.dtype)) * self.scales.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape, self.out_features)

    def _cpu_forward(self, x2: torch.Tensor) -> torch.Tensor:
        """(M, K) -> (M, N) in x2's dtype with the fastest CPU kernel for M rows."""
        M = x2.shape[0]
        # The native int8 kernel wins for one row (decode: ~1.5x torch's); for 2+ rows torch's
        # _weight_int8pack_mm is faster on AVX-512 BF16 (measured: 8 rows 0.43 s vs 0.70 s per forward).
        if self._native_scales is not None and M == 1:
            return ops.gemv_int8(self.qweight, self._native_scales, x2)  # phi3v::gemv_int8
        if M < PREFILL_ROWS["int8"]:
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), self.qweight, self._kernel_scales)
            return y.to(x2.dtype)
        w = None if self._native_scales is None else native.dequant_int8_bf16(self.qweight, self._native_scales)
        if w is None:
            w = self.qweight.to(torch.bfloat16).mul_(self._kernel_scales[:, None])
        return F.linear(x2.to(torch.bfloat16), w).to(x2.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class WeightOnlyInt4Linear(nn.Module):
    """y = x W^T (+ b) with W stored as group-wise asymmetric int4 (see module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, group_size: int = DEFAULT_GROUP_SIZE,
                 device=None, dtype=torch.bfloat16):
        super().__init__()
        if in_features % group_size:
            raise Phi3VError(f"int4: input width {in_features} is not a multiple of the group size {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.empty(out_features, groups, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None
        self.layout = "portable"  # "portable" | "native" | "cpu" | "cuda": what qweight holds now
        self._scales_zeros = None  # (K/G, N, 2) bf16 for the kernels

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int = DEFAULT_GROUP_SIZE) -> "WeightOnlyInt4Linear":
        return cls.from_weight(linear.weight.detach(), linear.bias, group_size=group_size, dtype=linear.weight.dtype)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                    group_size: int = DEFAULT_GROUP_SIZE, dtype=torch.bfloat16) -> "WeightOnlyInt4Linear":
        """Quantize a float weight (N, K); `dtype` = the model's float dtype (scales, zeros, bias)."""
        N, K = weight.shape
        layer = cls(K, N, bias is not None, group_size=group_size, device=weight.device, dtype=dtype)
        q, s, z = quantize_int4(weight, group_size)
        layer.qweight, layer.scales, layer.zeros = q, s.to(dtype), z.to(dtype)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=False)
        return layer.prepare()

    def prepare(self) -> "WeightOnlyInt4Linear":
        """Repack qweight (portable) for the kernel of its device; keeps scales/zeros as they are."""
        if self.layout != "portable":
            return self
        dev = self.qweight.device
        if dev.type == "cpu" and native.int4_group_ok(self.group_size):
            # The native kernels read the portable form and bf16 scales/zeros (no copy when the
            # model is bf16).
            self.scales, self.zeros = self.scales.to(torch.bfloat16).contiguous(), self.zeros.to(torch.bfloat16).contiguous()
            self.layout = "native"
            return self
        sz = torch.stack((self.scales, self.zeros), dim=-1).to(torch.bfloat16)  # (N, K/G, 2)
        sz = sz.transpose(0, 1).contiguous()  # (K/G, N, 2)
        if dev.type == "cpu" and self.out_features % _CPU_BLOCK_N == 0:
            self.qweight, self._scales_zeros, self.layout = _cpu_int4_pack(self.qweight), sz, "cpu"
        elif dev.type == "cuda" and _cuda_int4_ok(dev, self.in_features, self.out_features):
            # tinygemm wants the high nibble first: byte = q[2j] << 4 | q[2j+1].
            q = unpack_nibbles(self.qweight)
            hi_first = (q[:, 0::2] << 4) | q[:, 1::2]
            self.qweight = torch.ops.aten._convert_weight_to_int4pack(hi_first.contiguous(), 8)
            self._scales_zeros, self.layout = sz, "cuda"
        return self

    def portable(self) -> dict[str, torch.Tensor]:
        if self.layout == "cpu":
            q = _cpu_int4_unpack(self.qweight, self.out_features, self.in_features)
        elif self.layout == "cuda":
            raise Phi3VError("saving an int4 model that lives on CUDA is not supported: quantize the float "
                             "checkpoint with `phi3v quantize` (CPU) instead")
        else:
            q = self.qweight
        out = {"qweight": q, "scales": self.scales, "zeros": self.zeros}
        if self.bias is not None:
            out["bias"] = self.bias.detach()
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        M = x2.shape[0]
        if self.layout == "native":
            y = self._native_forward(x2)
        elif self.layout == "cpu" and M < PREFILL_ROWS["int4"]:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16).contiguous(), self.qweight,
                                                          self.group_size, self._scales_zeros).to(x.dtype)
        elif self.layout == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), self.qweight,
                                                  self.group_size, self._scales_zeros).to(x.dtype)
        else:
            y = F.linear(x2.to(self._float_dtype(x)), self.dequantized(self._float_dtype(x))).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape, self.out_features)

    def _native_forward(self, x2: torch.Tensor) -> torch.Tensor:
        """(M, K) -> (M, N) in x2's dtype: the native kernel for few rows (1-8; 1-64 where AMX tiles
        take 2-64 rows), else dequantize + GEMM."""
        if x2.shape[0] <= native.int4_max_rows():
            return ops.gemv_int4(self.qweight, self.scales, self.zeros, x2, self.group_size)  # phi3v::gemv_int4
        w = native.dequant_int4_bf16(self.qweight, self.scales, self.zeros, self.group_size)
        if w is None:
            w = self.dequantized(torch.bfloat16)
        return F.linear(x2.to(torch.bfloat16), w).to(x2.dtype)

    def _float_dtype(self, x: torch.Tensor) -> torch.dtype:
        # Prefill on CPU: bf16 GEMM (fast path); elsewhere keep the activation dtype.
        return torch.bfloat16 if self.layout in ("cpu", "native") else x.dtype

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        """The (N, K) weight this layer multiplies with, in `dtype`."""
        N, K, G = self.out_features, self.in_features, self.group_size
        if self.layout != "cpu":
            return dequantize_int4(self.qweight, self.scales, self.zeros, dtype)
        # Straight from the kernel layout (N/64, K, 32): rows j | j + 32 of each 64-row block.
        blocks = self.qweight.view(N // _CPU_BLOCK_N, K, _CPU_BLOCK_N // 2)
        q = torch.empty(N // _CPU_BLOCK_N, _CPU_BLOCK_N, K, dtype=dtype)
        q[:, : _CPU_BLOCK_N // 2] = (blocks & 15).transpose(1, 2)
        q[:, _CPU_BLOCK_N // 2 :] = (blocks >> 4).transpose(1, 2)
        q = q.view(N, K // G, G)
        # (q - 8) * s + z  ==  q * s + (z - 8 s)
        offset = (self.zeros.float() - 8.0 * self.scales.float()).to(dtype)
        return q.mul_(self.scales.to(dtype)[..., None]).add_(offset[..., None]).view(N, K)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, layout={self.layout}")


def _cuda_int4_ok(device: torch.device, K: int, N: int) -> bool:
    """tinygemm needs compute capability >= 8.0, K a multiple of 8 * 16 (inner k tiles 8), N of 8."""
    try:
        major, _ = torch.cuda.get_device_capability(device)
    except Exception:  # noqa: BLE001 - no CUDA runtime: use the dequantizing path
        return False
    return major >= 8 and K % 128 == 0 and N % 8 == 0


# ---------------------------------------------------------------------------------------------
# swapping layers


def new_quantized_linear(qc: QuantConfig, in_features: int, out_features: int, bias: bool, *, device=None,
                         dtype=torch.bfloat16) -> nn.Module:
    """An empty quantized layer (portable layout) for loading a quantized checkpoint into."""
    if qc.scheme == "int8":
        return WeightOnlyInt8Linear(in_features, out_features, bias, device=device, dtype=dtype)
    if qc.scheme == "w8a8":
        return W8A8Linear(in_features, out_features, bias, device=device, dtype=dtype)
    return WeightOnlyInt4Linear(in_features, out_features, bias, group_size=qc.group_size, device=device,
                                dtype=dtype)


def quantize_linear(linear: nn.Linear, qc: QuantConfig) -> nn.Module:
    return quantize_weight(linear.weight.detach(), linear.bias, qc, dtype=linear.weight.dtype)


def quantize_weight(weight: torch.Tensor, bias: torch.Tensor | None, qc: QuantConfig, *,
                    dtype=torch.bfloat16) -> nn.Module:
    """A ready quantized layer from a float weight (N, K) and optional bias (N,)."""
    if qc.scheme == "int8":
        return WeightOnlyInt8Linear.from_weight(weight, bias, dtype=dtype)
    if qc.scheme == "w8a8":
        return W8A8Linear.from_quantized(*quantize_int8(weight), bias, dtype=dtype)
    return WeightOnlyInt4Linear.from_weight(weight, bias, group_size=qc.group_size, dtype=dtype)


def portable_tensors(weight: torch.Tensor, bias: torch.Tensor | None, qc: QuantConfig) -> dict[str, torch.Tensor]:
    """Checkpoint tensors (suffix -> tensor) of one quantized layer, from its float weight.
    int8 (and w8a8) scales are kept in float32 so loading in any float dtype rounds them only once."""
    if qc.scheme in ("int8", "w8a8"):
        q, s = quantize_int8(weight)
        out = {"qweight": q, "scales": s}
    else:
        q, s, z = quantize_int4(weight, qc.group_size)
        out = {"qweight": q, "scales": s, "zeros": z}
    if bias is not None:
        out["bias"] = bias
    return out


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def quantize_model(module: nn.Module, scheme) -> nn.Module:
    """Replace the target nn.Linear layers of a loaded Phi3VForCausalLM in place (one at a time,
    so the float weight of each is freed before the next is quantized). Returns `module`."""
    qc = QuantConfig.parse(scheme)
    for name in target_linear_names(module, qc):
        set_submodule(module, name, quantize_linear(module.get_submodule(name), qc))
    module.quantization = qc
    return module


def quantized_layers(module: nn.Module):
    """(name, layer) of every quantized layer of `module`."""
    for name, sub in module.named_modules():
        if isinstance(sub, (WeightOnlyInt8Linear, WeightOnlyInt4Linear, W8A8Linear)):
            yield name, sub
