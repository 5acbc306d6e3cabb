"""Rough micro-benchmark of the int8 GEMMs W8A8 can use, against the bf16 GEMM (ratios, not timings).

    .venv/bin/python scripts/w8a8_kernels.py [--threads 1] [--repeats 5]
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 .venv/bin/python scripts/w8a8_kernels.py   # as on a CPU without AMX

Shapes: CLIP-L layers at one crop (577 rows) and Phi-3 decoder layers at a 512-token prefill.
Columns (median ms, and bf16 time / that time):
  bf16        F.linear on bf16 (oneDNN; AMX-BF16 where present; reorders the weight every call)
  bf16 packed torch.ops.mkldnn._linear_pointwise on a weight packed once (what engine/clip_packed.py
              does for the bf16 vision tower): the fair bf16 baseline where that path runs
  onednn      torch.ops.onednn.qlinear_pointwise, u8 activations (zero point 128), prepacked weight
  int_mm      torch._int_mm (s8 x s8 -> s32)
  quantize    the per-token activation quantization (quant.w8a8_kernel.quantize_rows) alone
  w8a8 layer  quant.w8a8_kernel.linear_w8a8 with the kernel it chooses here: quantize + GEMM + scaling
The machine is shared: run it when the load is low and read the ratios as rough.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from phi3v.quant.layers import quantize_int8  # noqa: E402
from phi3v.quant.w8a8_kernel import choose_kernel, cpu_int8_features, linear_w8a8, pack_weight, quantize_rows  # noqa: E402

SHAPES = [("clip qkv/out 577x1024x1024", 577, 1024, 1024), ("clip fc1 577x1024x4096", 577, 1024, 4096),
          ("clip fc2 577x4096x1024", 577, 4096, 1024), ("dec qkv 512x3072x9216", 512, 3072, 9216),
          ("dec gate_up 512x3072x16384", 512, 3072, 16384), ("dec down 512x8192x3072", 512, 8192, 3072)]


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), load {os.getloadavg()[0]:.1f}, "
          f"int8 CPU features: {', '.join(cpu_int8_features()) or 'none'}, "
          f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '(unset)')}, W8A8 kernel: {choose_kernel()[1]}")
    gen = torch.Generator().manual_seed(0)
    for name, M, K, N in SHAPES:
        x = torch.randn(M, K, generator=gen).to(torch.bfloat16)
        w = torch.randn(N, K, generator=gen) / K**0.5
        wb = w.to(torch.bfloat16)
        qw, sw = quantize_int8(w)
        u8, _ = quantize_rows(x)
        s8 = (u8.to(torch.int16) - 128).to(torch.int8)
        packed = pack_weight(qw, sw)
        t = {"bf16": median_ms(lambda: F.linear(x, wb), args.repeats)}
        if hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
            wp = torch.ops.mkldnn._reorder_linear_weight(wb, M)
            t["bf16 packed"] = median_ms(lambda: torch.ops.mkldnn._linear_pointwise(x, wp, None, "none", [], ""),
                                         args.repeats)
        if packed.kernel == "onednn":
            t["onednn"] = median_ms(lambda: torch.ops.onednn.qlinear_pointwise(
                u8, 1.0, 128, packed.packed, packed.scales, packed.zero_points, None, 1.0, 0, torch.bfloat16,
                "none", [], ""), args.repeats)
        t["int_mm"] = median_ms(lambda: torch._int_mm(s8, qw.t()), args.repeats)
        t["quantize"] = median_ms(lambda: quantize_rows(x), args.repeats)
        t["w8a8 layer"] = median_ms(lambda: linear_w8a8(x, packed), args.repeats)
        base = t["bf16"]
        vs_packed = f" | w8a8 layer vs bf16 packed {t['bf16 packed'] / t['w8a8 layer']:.2f}x" if "bf16 packed" in t else ""
        print(f"{name:<28}" + " | ".join(f"{k} {v:.2f} ms ({base / v:.2f}x)" for k, v in t.items()) + vs_packed,
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
