"""Long-prompt prefill, one pass vs chunks: seconds and the memory the prefill adds (run by hand).

    python scripts/bench_long_prefill.py --model DIR [--tokens 8192] [--chunks 0,512,2048] [--dtype bfloat16]

Each setting runs in its own process (so its peak RSS is its own): load the model, touch every
weight with a 16-token prefill, then prefill `--tokens` random text tokens into a fresh KV cache,
either in one pass (chunk 0: engine.generate.prefill, what a plain request does) or with
engine.chunked_prefill.prefill_chunked.  Printed per setting: prefill seconds, tokens/s, and peak
RSS above the warmed-up model (the KV cache, about 0.375 MiB per token at full size in bf16, plus
the temporaries chunking bounds).  The logits of the chunked runs are compared with one pass's.
Without --model it uses phi3v bench's random full-size checkpoint (written by `phi3v bench`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def one_setting(model_dir: str, tokens: int, chunk: int, dtype: str, threads: int | None, out: str) -> None:
    import torch

    import phi3v
    from phi3v.bench.memory import peak_rss_gib, rss_gib
    from phi3v.bench.workloads import text_ids
    from phi3v.engine.chunked_prefill import prefill_chunked
    from phi3v.engine.generate import prefill

    if threads:
        torch.set_num_threads(threads)
    module = phi3v.load(model_dir, device="cpu", dtype=dtype, progress=False).module
    prefill(module, module.embed(torch.tensor(text_ids(16))), 0, module.new_cache())  # every weight touched
    base = rss_gib()
    embeds = module.embed(torch.tensor(text_ids(tokens)))
    cache = module.new_cache()
    start = time.perf_counter()
    logits = prefill(module, embeds, 0, cache) if chunk == 0 else prefill_chunked(module, embeds, 0, cache, chunk)
    took = time.perf_counter() - start
    result = {"chunk": chunk, "tokens": tokens, "seconds": took, "tok_s": tokens / took,
              "peak_above_model_gib": peak_rss_gib() - base, "kv_cache_gib": cache.nbytes() / 2**30,
              "logits": logits.tolist()}
    Path(out).write_text(json.dumps(result), encoding="utf-8")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench_long_prefill.py")
    p.add_argument("--model", default=None)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--chunks", default="0,512,2048", help="0 = one pass")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.model is None:
        from phi3v.bench.runner import RANDOM_NAME, default_data_dir

        args.model = str(default_data_dir() / RANDOM_NAME)
    if args._child:
        chunk, out = args._child.split(":", 1)
        one_setting(args.model, args.tokens, int(chunk), args.dtype, args.threads, out)
        return 0
    import tempfile

    import torch

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for chunk in [int(c) for c in args.chunks.split(",")]:
            out = os.path.join(tmp, f"{chunk}.json")
            cmd = [sys.executable, __file__, "--model", args.model, "--tokens", str(args.tokens), "--dtype", args.dtype,
                   "--_child", f"{chunk}:{out}"] + (["--threads", str(args.threads)] if args.threads else [])
            if subprocess.run(cmd).returncode != 0:
                print(f"chunk {chunk}: failed", file=sys.stderr)
                continue
            results.append(json.loads(Path(out).read_text(encoding="utf-8")))
    ref = next((torch.tensor(r["logits"]) for r in results if r["chunk"] == 0), None)
    print("| chunk | prefill s | tok/s | peak RSS above the model GiB | KV cache GiB | max logit diff vs one pass |")
    print("|---|---|---|---|---|---|")
    for r in results:
        diff = "-" if ref is None or r["chunk"] == 0 else f"{(torch.tensor(r['logits']) - ref).abs().max().item():.3g}"
        print(f"| {r['chunk'] or 'one pass'} | {r['seconds']:.1f} | {r['tok_s']:.1f} | {r['peak_above_model_gib']:.2f} "
              f"| {r['kv_cache_gib']:.2f} | {diff} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
