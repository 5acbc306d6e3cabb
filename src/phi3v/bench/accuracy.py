"""Logit error and top-1 agreement of bf16 / int8 / int4 against float32 on one checkpoint.

    python -m phi3v.bench.accuracy --model DIR [--tokens 128] [--out accuracy.json]

One model in memory at a time: the float32 reference logits are computed first and kept (L x vocab
floats), then each variant is loaded, compared and dropped.  Reported per variant:
  max_abs_err / max|ref|   worst logit error relative to the largest reference logit
  rms_err / rms(ref)       typical error
  top1_agreement           fraction of positions whose argmax equals float32's
  top1_agreement_confident the same over positions where float32's top-1/top-2 margin > 1.0
"""

from __future__ import annotations

import argparse
import gc
import json
import sys

import torch

VARIANTS = (("bf16", "bfloat16", None), ("int8", "bfloat16", "int8"), ("int4", "bfloat16", "int4"),
            ("int8-fp32", "float32", "int8"), ("int4-fp32", "float32", "int4"))


def compare(logits: torch.Tensor, ref: torch.Tensor) -> dict:
    top2 = ref.topk(2, dim=-1).values
    confident = (top2[:, 0] - top2[:, 1]) > 1.0
    agree = logits.argmax(-1) == ref.argmax(-1)
    return {
        "max_abs_err_rel": (logits - ref).abs().max().item() / ref.abs().max().item(),
        "rms_err_rel": ((logits - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item(),
        "top1_agreement": agree.float().mean().item(),
        "top1_agreement_confident": agree[confident].float().mean().item() if confident.any() else None,
        "confident_positions": int(confident.sum()),
    }


def measure(model_dir: str, tokens: int = 128, variants=VARIANTS, log=print) -> dict:
    import phi3v

    gen = torch.Generator().manual_seed(0)
    ids = [1] + torch.randint(100, 32000, (tokens - 1,), generator=gen).tolist()
    ref_model = phi3v.load(model_dir, device="cpu", dtype="float32", progress=False)
    ref = ref_model.logits(ids)
    del ref_model
    gc.collect()
    out = {"model": model_dir, "tokens": tokens, "variants": {}}
    for name, dtype, scheme in variants:
        model = phi3v.load(model_dir, device="cpu", dtype=dtype, progress=False, quantize=scheme)
        out["variants"][name] = compare(model.logits(ids), ref)
        log(f"{name}: {out['variants'][name]}")
        del model
        gc.collect()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m phi3v.bench.accuracy")
    p.add_argument("--model", required=True)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--variants", default=",".join(v[0] for v in VARIANTS))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    wanted = [v for v in VARIANTS if v[0] in args.variants.split(",")]
    result = measure(args.model, args.tokens, wanted, log=lambda m: print(m, file=sys.stderr, flush=True))
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
