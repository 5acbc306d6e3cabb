"""W8A8Linear: int8 weights, and int8 activations for calls with many rows (prefill, the vision tower).

Stored like the weight-only int8 layer (quant.layers.WeightOnlyInt8Linear), so checkpoints have
the same tensors: qweight int8 (N, K), scales (N,) per output channel (+ bias).  The layer chooses
its path per call by the number of rows M of its input (tokens, or crops x 577 patches in CLIP):

  M <  W8A8_MIN_ROWS  weight-only int8, exactly as the `int8` scheme computes it: the native one-row
                      kernel (phi3v::gemv_int8, fp32 activations) for decode, torch's
                      _weight_int8pack_mm (bf16 activations) for 2-8 rows.  Decode keeps int8's
                      smaller drift (no activation rounding).  (A decoder pass that carries a
                      newcomer's prefill chunk with the decoding rows has 9+ rows: it is W8A8 for
                      all of them; per-token scales and exact integer sums keep each row's result
                      independent of the others in it.)
  M >= W8A8_MIN_ROWS  W8A8: activations quantized per token at run time, the int8 GEMM
                      (quant.w8a8_kernel: oneDNN's VNNI/AMX kernel where the CPU has one).

The threshold is 9 = one more than the rows the native decode kernels take (kernels.native
.MAX_ROWS = 8, a decode batch); the server's prefill chunks (32) and every vision call are above.
Memory: on the oneDNN kernel the weight is held twice (the plain int8 for decode, the packed one
for prefill): ~2x the int8 weight bytes of the layers this scheme quantizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import native, ops
from .w8a8_kernel import PackedWeight, linear_w8a8, pack_weight

W8A8_MIN_ROWS = native.MAX_ROWS + 1

# Layers a W8A8 load can leave in float besides what no scheme quantizes (lm_head, embeddings, the
# vision projector): QuantConfig("w8a8", vision=True, keep_float=(rules)) or quantize="w8a8:first,last".
# The default keeps none: on random weights (scripts/w8a8_error.py) no layer is more sensitive than
# another, so each rule only buys back drift in proportion to the work it leaves in float
# (docs/performance.md, W8A8); trained weights with outlier layers can use them.
FLOAT_RULES = {
    "first": "decoder layer 0",
    "last": "the last decoder layer",
    "down_proj": "every decoder layer's mlp.down_proj",
    "vision_fc2": "every CLIP layer's mlp.fc2",
}
_DECODER = "model.layers."
_CLIP = "model.vision_embed_tokens.img_processor.vision_model.encoder.layers."


def keeps_float(name: str, module: nn.Module, rules: tuple[str, ...]) -> bool:
    """Whether linear `name` of the model `module` stays float under W8A8 with these FLOAT_RULES."""
    if not rules:
        return False
    if name.startswith(_DECODER):
        index, _, rest = name[len(_DECODER):].partition(".")
        last = len(module.model.layers) - 1
        return (("first" in rules and index == "0") or ("last" in rules and index == str(last))
                or ("down_proj" in rules and rest == "mlp.down_proj"))
    return "vision_fc2" in rules and name.startswith(_CLIP) and name.endswith(".mlp.fc2")


class W8A8Linear(nn.Module):
    """y = x W^T (+ b), W int8 per output channel; int8 activations from W8A8_MIN_ROWS rows."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, device=None,
                 dtype=torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None
        self._packed: PackedWeight | None = None  # the W8A8 kernel's weight (prepare())
        self._kernel_scales = None  # bf16 scales for _weight_int8pack_mm (CPU)
        self._native_scales = None  # fp32 scales for the native one-row kernel (CPU, when built)

    @classmethod
    def from_quantized(cls, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None, *,
                       dtype=torch.bfloat16) -> "W8A8Linear":
        """A ready layer from quant.layers.quantize_int8's output; `dtype` = the model's float dtype."""
        N, K = qweight.shape
        layer = cls(K, N, bias is not None, device=qweight.device, dtype=dtype)
        layer.qweight, layer.scales = qweight, scales.to(dtype)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=False)
        return layer.prepare()

    def prepare(self) -> "W8A8Linear":
        on_cpu = self.qweight.device.type == "cpu"
        self._packed = pack_weight(self.qweight, self.scales)
        self._kernel_scales = self.scales.to(torch.bfloat16) if on_cpu else None
        self._native_scales = self.scales.float().contiguous() if on_cpu and native.available() else None
        return self

    def portable(self) -> dict[str, torch.Tensor]:
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.bias is not None:
            out["bias"] = self.bias.detach()
        return out

    @property
    def kernel(self) -> str:
        """The W8A8 kernel this layer's prefill calls use ("onednn" | "int_mm" | "torch")."""
        return self._packed.kernel if self._packed is not None else ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] >= W8A8_MIN_ROWS:
            y = linear_w8a8(x2, self._packed, self.bias)
        else:
            y = self._weight_only(x2)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        return y.view(*shape, self.out_features)

    def _weight_only(self, x2: torch.Tensor) -> torch.Tensor:
        """(M, K), M < W8A8_MIN_ROWS -> (M, N): the `int8` scheme's few-row paths."""
        if self._native_scales is not None and x2.shape[0] == 1:
            return ops.gemv_int8(self.qweight, self._native_scales, x2)  # phi3v::gemv_int8
        if self._kernel_scales is not None:
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), self.qweight, self._kernel_scales)
            return y.to(x2.dtype)
        return F.linear(x2, self.qweight.to(x2.dtype)) * self.scales.to(x2.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"kernel={self.kernel}")
