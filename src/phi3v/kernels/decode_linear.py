"""nn.Linear whose few-token calls (decode, batched decode) go to the native bf16 kernel when built.

Same parameters and state-dict names as nn.Linear, so checkpoints load and the quantizer (which
looks for nn.Linear) treats it as one.  For (rows <= NATIVE_ROWS, K) inputs with a bf16 weight on
the CPU, the operator phi3v::gemv_bf16 (kernels.ops, over kernels.native.gemv_bf16) streams the
weight once (for one token about 2.4x the bandwidth oneDNN's bf16 GEMM reaches on AVX-512 CPUs
without AMX); every other call is F.linear.  Both accumulate
the bf16 products in fp32; results agree to bf16 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import native, ops

# Rows the native kernel takes (its maximum); it beats the bf16 GEMM up to there (K = 3072,
# N = 16384 from DRAM on Zen 4: 1 row ~2.4x, 8 rows ~1.3x).
NATIVE_ROWS = native.MAX_ROWS


class DecodeLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (w.dtype == torch.bfloat16 and w.device.type == "cpu" and x.numel() <= NATIVE_ROWS * x.shape[-1]
                and w.is_contiguous() and x.dtype in (torch.bfloat16, torch.float32) and native.available()):
            y = ops.gemv_bf16(w, x.reshape(-1, x.shape[-1]))  # torch.ops.phi3v.gemv_bf16 (profiler: by name)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, w, self.bias)
