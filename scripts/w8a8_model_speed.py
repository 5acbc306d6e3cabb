"""Rough model-level check of W8A8 against bf16 and int8: prefill and the vision tower, same weights.

    .venv/bin/python scripts/w8a8_model_speed.py [--threads 1] [--dir /tmp/phi3v-wide]
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 .venv/bin/python scripts/w8a8_model_speed.py   # as without AMX

A random checkpoint with the real widths but few layers (decoder hidden 3072 / MLP 8192, 2
layers; CLIP-L width 1024 / 4096, 3 layers of which 2 run), written once (~0.9 GB) into --dir:
full-size layer shapes at a fraction of the full model's time and memory.  Medians of 3:
  prefill  model.logits of 512 random tokens (last position only: no full lm_head)
  vision   the CLIP tower on 5 crops (num_crops 4: 2,885 rows per product)
The full-size numbers are the lead's `phi3v bench` run (variant phi3v-w8a8); this is a sanity check.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import phi3v  # noqa: E402
from phi3v.testing import make_tiny_checkpoint  # noqa: E402


def median_s(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dir", default="/tmp/phi3v-wide", help="where the random checkpoint is (written once)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = Path(args.dir)
    if not (folder / "config.json").is_file():
        make_tiny_checkpoint(folder, hidden_size=3072, intermediate_size=8192, num_layers=2, num_heads=32,
                             vision_hidden=1024, vision_layers=3, vision_heads=16, vision_intermediate=4096,
                             num_crops=4)
    ids = torch.randint(0, 32000, (512,), generator=torch.Generator().manual_seed(0)).tolist()
    crops = torch.randn(5, 3, 336, 336, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    print(f"{args.threads} thread(s), load {os.getloadavg()[0]:.1f}, "
          f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '(unset)')}")
    base = None
    for scheme in (None, "int8", "w8a8"):
        model = phi3v.load(str(folder), device="cpu", dtype="bfloat16", quantize=scheme, progress=False)
        tower = model.module.model.vision_embed_tokens
        with torch.inference_mode():
            prefill = median_s(lambda: model.logits(ids, last=1))
            vision = median_s(lambda: tower.encode_crops(crops))
        base = base or (prefill, vision)
        print(f"{scheme or 'bf16':<5} prefill 512 tokens {prefill:.3f} s ({base[0] / prefill:.2f}x)   "
              f"vision 5 crops {vision:.3f} s ({base[1] / vision:.2f}x)", flush=True)
        del model, tower
    return 0


if __name__ == "__main__":
    sys.exit(main())
