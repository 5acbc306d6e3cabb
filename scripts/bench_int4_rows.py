"""int4 products for 1-64 input rows at full-size Phi-3 shapes: the kernel gemv_int4 uses now (AMX
tiles for 2-64 rows where the CPU has them), the streaming AVX-512/AVX2 kernel it used before
(1-8 rows), and dequantize + bf16 GEMM (what the layer did from 9 rows), with the one-row effective
bandwidth against a measured memory-read bound.  Run by hand on a quiet machine; numbers are rough
when others share the CPU (the load average is printed).

    python scripts/bench_int4_rows.py [--threads 2] [--rows 1,2,4,8,16,32,64] [--pool-mib 1024]

Weights: random, quantized with group 128 like the model; several copies rotate so that one
pass reads more than `--pool-mib` MiB (over the last-level cache: decode reads 2 GB per token).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from phi3v.bench.runner import read_bandwidth_gbs
from phi3v.kernels import native
from phi3v.quant.layers import quantize_int4

SHAPES = {"qkv": (9216, 3072), "gate_up": (16384, 3072), "down": (3072, 8192)}  # name -> (N, K)


STAT = statistics.median  # --stat min: the fastest call (less sensitive to other processes)


def median_call_s(fn, copies: list, repeats: int) -> float:
    """Median (or --stat) seconds per call, each call on the next weight copy (weights from memory)."""
    for c in copies[:2]:
        fn(*c)
    times = []
    for i in range(repeats):
        c = copies[i % len(copies)]
        start = time.perf_counter()
        fn(*c)
        times.append(time.perf_counter() - start)
    return STAT(times)


def streaming_kernel(q, s, z, x, group):
    """The streaming kernel (the one-row path; 2-8 rows before the AMX kernel): AMX switched off."""
    saved = native.AMX_MIN_ROWS
    native.AMX_MIN_ROWS = native.AMX_MAX_ROWS + 1
    try:
        return native.gemv_int4(q, s, z, x, group)
    finally:
        native.AMX_MIN_ROWS = saved


def dequant_gemm(q, s, z, x, group):
    w = native.dequant_int4_bf16(q, s, z, group)
    return F.linear(x, w)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,2,4,8,16,32,64")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--pool-mib", type=int, default=1024, help="packed weight bytes rotated through per shape")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--stat", choices=("median", "min"), default="median",
                    help="per-call time statistic (min on a machine others share)")
    args = ap.parse_args()
    global STAT
    STAT = statistics.median if args.stat == "median" else min
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    if not native.available():
        raise SystemExit(f"native kernels unavailable: {native.why_unavailable()}")
    print(f"build {native.isa()}, {args.threads} threads, {args.stat} of {args.repeats} calls, load average {os.getloadavg()} (rough when > 0.5)")
    bound = read_bandwidth_gbs(args.threads)
    print(f"memory read bound (random data, 1 GiB): {bound:.1f} GB/s")
    gen = torch.Generator().manual_seed(0)
    for name in args.shapes.split(","):
        N, K = SHAPES[name]
        q, s, z = quantize_int4(torch.randn(N, K, generator=gen), args.group)
        weight_bytes = q.numel() + 2 * s.numel() * 2  # packed nibbles + bf16 scales and zeros
        n_copies = max(2, args.pool_mib * 2**20 // weight_bytes)
        copies = [(q.clone(), s.clone(), z.clone()) for _ in range(n_copies)]
        print(f"\n{name}: N={N} K={K} group {args.group}, {weight_bytes / 1e6:.1f} MB per matrix, {n_copies} copies")
        print(f"{'rows':>4} {'new ms':>8} {'stream ms':>9} {'deq+gemm ms':>11} {'new rows/s vs 1':>15} "
              f"{'best old':>9} {'new vs best old':>15}")
        t1 = None
        for M in rows:
            x = torch.randn(M, K, generator=gen).to(torch.bfloat16)
            new = median_call_s(lambda q, s, z: native.gemv_int4(q, s, z, x, args.group), copies, args.repeats)
            stream = median_call_s(lambda q, s, z: streaming_kernel(q, s, z, x, args.group), copies,
                                   args.repeats) if M <= native.MAX_ROWS else float("nan")
            deq = median_call_s(lambda q, s, z: dequant_gemm(q, s, z, x, args.group), copies, args.repeats)
            t1 = new if M == 1 else t1
            old = stream if M <= native.MAX_ROWS else deq  # what the layer used before
            ratio = f"{M * t1 / new:.2f}x" if t1 else "-"
            print(f"{M:>4} {new * 1e3:8.3f} {stream * 1e3:9.3f} {deq * 1e3:11.3f} {ratio:>15} "
                  f"{old * 1e3:9.3f} {old / new:14.2f}x")
            if M == 1:
                gbs = weight_bytes / new / 1e9
                print(f"     one row: {gbs:.1f} GB/s of packed weights + scales = {100 * gbs / bound:.0f}% of "
                      f"the {bound:.1f} GB/s bound")
        del copies
    print(f"\nload average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
