"""Throughput of the local batch runner against the same records one by one through the API.

    python scripts/bench_batch.py                      # tiny random checkpoint, 24 JPEGs
    python scripts/bench_batch.py --model DIR --records 64 --batch-size 8 --runs 5

Both paths run the same records (images written to disk as JPEG, so decoding is part of the
work, as in a real job) with greedy decoding:

  one by one:  for each record, `model.ask(prompt, images=[path], ...)`, sequentially;
  batch:       `phi3v.batch.runner.run_batch(folder, model, task=..., batch_size=B, workers=W)`:
               preprocessing threads work ahead of the model, batches go to
               `model.generate_batch` when the engine has it.

Each path runs `--runs` times after one warm-up record; records/s is the median over the runs.
The model is loaded with its image-feature and prefix caches off, so repeated runs over the same
images cost what the first one did.
The texts of the two paths are compared (greedy: they must match for batch size 1; with a
batched engine small numeric differences may flip a token on a random model, so a mismatch
count is reported rather than raised).  Prints one line per path and the ratio; `--json` adds
one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_records(folder: Path, n: int, width: int, height: int, seed: int = 0) -> list[Path]:
    """n smooth random JPEGs (gradients + noise: compressible like photos, not pure noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    paths = []
    for k in range(n):
        base = (np.sin(xx / (17 + k)) + np.cos(yy / (23 + 2 * k)) + 2) * 60
        pixels = np.stack([base, base[::-1], base[:, ::-1]], -1) + rng.normal(0, 8, (height, width, 3))
        path = folder / f"rec{k:04d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def one_by_one(model, paths, prompt, options) -> tuple[float, dict]:
    start = time.perf_counter()
    texts = {p.name: model.ask(prompt, images=[p], **options).text for p in paths}
    return time.perf_counter() - start, texts


def batched(model, folder, task, options, batch_size, workers) -> tuple[float, dict]:
    from phi3v.batch.runner import run_batch

    start = time.perf_counter()
    job = run_batch(folder, model, task=task, batch_size=batch_size, workers=workers, **options)
    texts = {r["id"]: r["text"] for r in job}
    elapsed = time.perf_counter() - start
    errors = [r for r in texts.values() if r is None]
    if errors:
        raise SystemExit(f"{len(errors)} batch records failed")
    return elapsed, texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder (default: a fresh tiny random checkpoint)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--records", type=int, default=24)
    ap.add_argument("--size", default="640x480", help="image WIDTHxHEIGHT (default 640x480)")
    ap.add_argument("--num-crops", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--task", default="describe")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="also print one JSON object")
    args = ap.parse_args()

    import torch

    import phi3v
    from phi3v.tasks import task_prompt

    width, height = (int(v) for v in args.size.lower().split("x"))
    with tempfile.TemporaryDirectory(prefix="phi3v-bench-batch-") as tmp:
        tmp = Path(tmp)
        model_dir = args.model
        if model_dir is None:
            from phi3v.testing import make_tiny_checkpoint

            model_dir = make_tiny_checkpoint(tmp / "tiny", num_crops=args.num_crops)
        # Caches off: every run must encode every image again (the feature cache would otherwise
        # serve repeated runs from memory), and nothing carries over between records.
        model = phi3v.load(str(model_dir), device=args.device, dtype=args.dtype, progress=False,
                           image_cache_mb=0, prefix_cache=False)
        folder = tmp / "records"
        folder.mkdir()
        paths = write_records(folder, args.records, width, height)
        prompt = task_prompt(args.task)
        options = {"max_new_tokens": args.max_new_tokens, "num_crops": args.num_crops}
        model.ask(prompt, images=[paths[0]], **options)  # warm-up: allocator, kernels, caches

        single_s, batch_s = [], []
        mismatches = 0
        for _ in range(args.runs):  # interleaved, so drifting machine load hits both alike
            s, ref = one_by_one(model, paths, prompt, options)
            single_s.append(s)
            b, got = batched(model, folder, args.task, options, args.batch_size, args.workers)
            batch_s.append(b)
            mismatches = sum(ref[k] != got[k] for k in ref)

    single_rps = args.records / statistics.median(single_s)
    batch_rps = args.records / statistics.median(batch_s)
    engine_batched = hasattr(model, "generate_batch")
    print(f"model {model_dir} on {args.device} ({args.dtype}), torch threads {torch.get_num_threads()}, "
          f"{args.records} records {width}x{height} JPEG, num_crops {args.num_crops}, "
          f"max_new_tokens {args.max_new_tokens}, median of {args.runs} runs")
    print(f"one by one (model.ask):  {single_rps:8.2f} records/s")
    print(f"batch runner (bs {args.batch_size}, {args.workers} workers, "
          f"generate_batch {'yes' if engine_batched else 'no'}): {batch_rps:8.2f} records/s")
    print(f"ratio batch / one by one: {batch_rps / single_rps:.2f}x   "
          f"(greedy texts differing: {mismatches} of {args.records})")
    if args.json:
        print(json.dumps({"records": args.records, "one_by_one_rps": single_rps,
                          "batch_rps": batch_rps, "ratio": batch_rps / single_rps,
                          "batch_size": args.batch_size, "workers": args.workers,
                          "generate_batch": engine_batched, "mismatches": mismatches,
                          "one_by_one_s": single_s, "batch_s": batch_s}))


if __name__ == "__main__":
    main()
