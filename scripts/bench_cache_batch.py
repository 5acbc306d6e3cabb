"""Benchmark the caches and batched decoding.

  python scripts/bench_cache_batch.py                      # a tiny random checkpoint (seconds)
  python scripts/bench_cache_batch.py --model DIR --num-crops 1 --new-tokens 8 --repeats 1

1. Follow-up time to first token in a chat about one image: cold (caches cleared, so the image is
   encoded and the whole conversation prefilled) vs warm (right after the first turn: features
   from the image cache, the earlier turns' keys/values from the retained KV cache).
   first_token_s counts everything from the request (prepare included) to the first token.
2. Decode tokens per second for batches of 1, 4, 8 text prompts (all rows' tokens / wall time
   from the first token to the last).

Prints the medians over --repeats runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import numpy as np


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder (default: a tiny random one in a temp dir)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: the model's default)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-crops", type=int, default=None)
    ap.add_argument("--answer-tokens", type=int, default=32, help="length of the first turn's answer")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens per row in the batch benchmark")
    ap.add_argument("--rows", default="1,4,8")
    ap.add_argument("--skip-followup", action="store_true")
    ap.add_argument("--skip-batch", action="store_true")
    return ap.parse_args(argv)


def picture(seed=0, h=480, w=640) -> np.ndarray:
    rng = np.random.RandomState(seed)
    base = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def followup(model, args) -> dict:
    import phi3v

    img = picture()
    turn1 = [{"role": "user", "content": [{"type": "image", "image": img},
                                          {"type": "text", "text": "What is in this picture?"}]}]
    cold, warm, reused = [], [], []
    for _ in range(args.repeats):
        model.clear_caches()
        answer = model.chat(turn1, max_new_tokens=args.answer_tokens, num_crops=args.num_crops)
        turn2 = turn1 + [{"role": "assistant", "content": answer.text},
                         {"role": "user", "content": "What colours do you see?"}]
        prepared = model.prepare(messages=turn2, num_crops=args.num_crops)
        stream = model.generate_stream(prepared, phi3v.GenerationOptions(max_new_tokens=1))
        stream.text()
        warm.append(stream.completion.timings.first_token_s)  # includes prepared.preprocess_s
        reused.append(stream.reused_tokens)
        model.clear_caches()
        c = model.chat(turn2, max_new_tokens=1, num_crops=args.num_crops)
        cold.append(c.timings.first_token_s)
        prompt_tokens = c.usage.prompt_tokens
    return {"cold_ttft_s": statistics.median(cold), "warm_ttft_s": statistics.median(warm),
            "speedup": statistics.median(cold) / statistics.median(warm),
            "prompt_tokens": prompt_tokens, "reused_tokens": statistics.median(reused)}


def batch_decode(model, args) -> dict:
    import phi3v

    topics = ["rivers", "mountains", "cities", "forests", "oceans", "deserts", "islands", "valleys"]
    rates = {}
    for n in (int(x) for x in args.rows.split(",")):
        prepared = [model.prepare(prompt=f"Write a long story about {topics[i % 8]} and the people there.")
                    for i in range(n)]
        opts = phi3v.GenerationOptions(max_new_tokens=args.new_tokens)
        model.generate_batch(prepared, phi3v.GenerationOptions(max_new_tokens=2))  # warm-up
        runs = []
        for _ in range(args.repeats):
            stream = model.generate_batch_stream(prepared, opts)
            t_first = None
            for _row, _delta in stream:
                if t_first is None:
                    t_first = time.perf_counter()
            t_end = time.perf_counter()
            tokens = sum(max(0, c.usage.completion_tokens - 1) for c in stream.completions)
            runs.append(tokens / max(t_end - (t_first or t_end), 1e-9))
        rates[n] = statistics.median(runs)
    return rates


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    import phi3v

    torch.manual_seed(0)
    model_dir = args.model
    if model_dir is None:
        from phi3v.testing import make_tiny_checkpoint

        model_dir = make_tiny_checkpoint(tempfile.mkdtemp(prefix="bench-tiny-"), num_crops=4)
    t0 = time.perf_counter()
    model = phi3v.load(str(model_dir), device=args.device, dtype=args.dtype, progress=False)
    print(f"model {model_dir} on {model.device} {model.dtype}, loaded in {time.perf_counter() - t0:.1f}s, "
          f"torch threads {torch.get_num_threads()}", flush=True)
    if not args.skip_followup:
        f = followup(model, args)
        print(f"follow-up TTFT (median of {args.repeats}): cold {f['cold_ttft_s'] * 1000:.1f} ms, "
              f"warm {f['warm_ttft_s'] * 1000:.1f} ms, speedup {f['speedup']:.1f}x "
              f"(prompt {f['prompt_tokens']} tokens, {f['reused_tokens']:.0f} reused)", flush=True)
    if not args.skip_batch:
        rates = batch_decode(model, args)
        one = rates.get(1)
        for n, r in rates.items():
            rel = f", {r / one:.2f}x of 1 row" if one else ""
            print(f"batched decode, {n} rows: {r:.1f} tokens/s{rel}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
