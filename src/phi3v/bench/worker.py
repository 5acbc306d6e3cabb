"""One benchmark variant in its own process:

    python -m phi3v.bench.worker --engine phi3v --model DIR --dtype bfloat16 [--quantize int4]
                                 [--quick] [--no-vision] --out result.json
    python -m phi3v.bench.worker --engine openvino --model DIR --ir IR_DIR ...   (bench/openvino_convert.py)

Writes {"variant", "engine", "load_s", "rss_after_load_gib", "peak_rss_gib", "metrics": {...}}, and for
OpenVINO "runtime": what it ran (precisions, KV cache; bench/openvino_engine.runtime_info).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

from .memory import peak_rss_gib, rss_gib
from .workloads import Plan, bench_image, image_messages, run_plan, text_ids


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m phi3v.bench.worker")
    p.add_argument("--engine", choices=("phi3v", "transformers", "openvino"), required=True)
    p.add_argument("--ir", default=None, help="OpenVINO IR folder (--engine openvino)")
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quantize", default=None)
    p.add_argument("--variant", required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--heavy-repeats", type=int, default=None)
    p.add_argument("--decode-tokens", type=int, default=None)
    p.add_argument("--no-vision", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    plan = Plan.quick() if args.quick else Plan()
    for name in ("repeats", "heavy_repeats", "decode_tokens"):
        if getattr(args, name) is not None:
            setattr(plan, name, getattr(args, name))
    plan.vision = not args.no_vision

    from .engines import PhiEngine, TransformersEngine

    if args.engine == "openvino":
        from .openvino_engine import OpenVINOEngine

        engine = OpenVINOEngine(args.model, args.ir, threads=args.threads)
    elif args.engine == "phi3v":
        engine = PhiEngine(args.model, args.dtype, args.quantize)
    else:
        engine = TransformersEngine(args.model, args.dtype)
    rss_before = rss_gib()
    start = time.perf_counter()
    engine.load()
    load_s = time.perf_counter() - start
    after_load = rss_gib()
    # Touch every weight once (memory-mapped pages count in RSS only when read): the load goal
    # "peak RSS <= 1.1 x weight bytes" is about this number, before any large activation exists.
    engine.prefill(text_ids(16))
    if plan.vision:
        engine.encode_crops(torch.zeros(1, 3, 336, 336))
    warm = rss_gib()
    e2e = None
    if plan.vision:  # end to end: load + one image request at num_crops 16, before anything else
        engine.first_token(image_messages(bench_image()), 16)
        e2e = peak_rss_gib()
    print(f"[{args.variant}] loaded in {load_s:.2f}s, RSS {after_load:.2f} GiB, {warm:.2f} GiB with every "
          "weight touched", file=sys.stderr, flush=True)
    metrics = run_plan(engine, plan, log=lambda m: print(f"[{args.variant}]{m}", file=sys.stderr, flush=True))
    result = {
        "variant": args.variant, "engine": args.engine, "dtype": args.dtype, "quantize": args.quantize,
        "model": args.model, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "load_s": load_s, "rss_before_load_gib": rss_before, "rss_after_load_gib": after_load, "rss_weights_touched_gib": warm,
        "peak_rss_e2e_gib": e2e,
        "peak_rss_gib": peak_rss_gib(), "metrics": metrics, "plan": vars(plan),
    }
    if hasattr(engine, "runtime_info"):
        result["runtime"] = engine.runtime_info()
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
