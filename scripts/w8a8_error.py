"""How far W8A8 logits drift from float32, next to the weight-only int8 and int4 schemes.

    .venv/bin/python scripts/w8a8_error.py                       # the tiny golden model(s) in tests/golden
    .venv/bin/python scripts/w8a8_error.py --keep first,last     # W8A8 with sensitive layers left float
    .venv/bin/python scripts/w8a8_error.py --medium              # also a random 8-layer Phi-3.5-vision-style model
    .venv/bin/python scripts/w8a8_error.py --greedy 20           # + greedy agreement on `phi3v eval`'s sample set
    .venv/bin/python scripts/w8a8_error.py --model DIR           # also a full-size checkpoint (e.g. the random
                                                                 # one `phi3v bench` writes: ~16 GiB for fp32)

For each model and each prompt (a text prompt of random token ids, and an image prompt: a random
image at num_crops 4, so the vision tower's drift is in it), the logits of every position are
compared with the float32 model's:
  rel    max |logits - fp32| / max |fp32|        (the measure tests/test_quantize.py bounds)
  rms    rms(logits - fp32) / rms(fp32)
  top1   share of positions whose argmax equals fp32's
With --greedy N, the first N records of the `phi3v eval` sample set (phi3v.eval.sample: charts,
documents, shapes; num_crops 4) are answered greedily (16 tokens) by fp32 and every scheme:
  same   share of answers whose tokens equal fp32's exactly
  prefix mean share of the 16 tokens before the first one that differs from fp32's
Schemes run in bf16 (what a user loads); `--keep` takes quant.w8a8_layer.FLOAT_RULES names and
adds rows "w8a8+RULES".  Random weights make top-1 margins small, so agreement here is a lower
bound of what trained weights give.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import phi3v  # noqa: E402
from phi3v.quant import w8a8_layer  # noqa: E402
from phi3v.quant.layers import QuantConfig  # noqa: E402

GOLDEN_MODELS = ROOT / "tests" / "golden" / "models"


def prompts(model, text_tokens: int) -> dict[str, tuple]:
    """name -> (input ids, pixel_values or None, image_sizes or None)."""
    gen = torch.Generator().manual_seed(7)
    text = torch.randint(0, 32000, (text_tokens,), generator=gen).tolist()
    image = np.random.default_rng(0).integers(0, 255, (336, 500, 3), dtype=np.uint8)
    p = model.prepare(prompt="Describe the image in detail.", images=[image], num_crops=4)
    return {"text": (text, None, None),
            "image": (p.input_ids, p.images.pixel_values, p.images.image_sizes)}


def logits_of(model, case) -> torch.Tensor:
    ids, pixels, sizes = case
    with torch.inference_mode():
        return model.logits(ids, pixels, sizes).float()


def compare(got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    diff = got - ref
    return {"rel": diff.abs().max().item() / ref.abs().max().item(),
            "rms": diff.pow(2).mean().sqrt().item() / ref.pow(2).mean().sqrt().item(),
            "top1": (got.argmax(-1) == ref.argmax(-1)).float().mean().item()}


def sample_records(count: int) -> list:
    """The first `count` records of the `phi3v eval` sample set, written to a temporary folder."""
    import tempfile

    from phi3v.eval.records import read_native
    from phi3v.eval.sample import make_sample

    return read_native(make_sample(Path(tempfile.mkdtemp()) / "sample"))[:count]


def greedy_answers(model, records, tokens: int = 16) -> list[list[int]]:
    return [model.ask(r.question, images=list(r.sources), max_new_tokens=tokens, num_crops=4).token_ids
            for r in records]


def agreement(got: list[list[int]], ref: list[list[int]]) -> tuple[float, float]:
    """(share of answers equal to ref's, mean share of tokens before the first difference)."""
    same = sum(g == r for g, r in zip(got, ref)) / len(ref)
    prefix = 0.0
    for g, r in zip(got, ref):
        n = next((i for i, (a, b) in enumerate(zip(g, r)) if a != b), min(len(g), len(r)))
        prefix += n / max(len(r), 1)
    return same, prefix / len(ref)


def measure(folder: Path, schemes: list[tuple[str, str, tuple[str, ...]]], text_tokens: int,
            records: list | None = None) -> None:
    start = time.perf_counter()
    ref_model = phi3v.load(str(folder), device="cpu", dtype="float32", progress=False)
    cases = prompts(ref_model, text_tokens)
    refs = {name: logits_of(ref_model, case) for name, case in cases.items()}
    ref_answers = greedy_answers(ref_model, records) if records else None
    del ref_model
    print(f"\n{folder.name}: positions " + ", ".join(f"{n} {r.shape[0]}" for n, r in refs.items())
          + f" (fp32 reference {time.perf_counter() - start:.0f}s)")
    print(f"{'scheme':<22}" + "".join(f"{n + ' rel':>11}{n + ' rms':>11}{n + ' top1':>12}" for n in refs)
          + (f"{'greedy same':>13}{'prefix':>8}  ({len(records)} sample records)" if records else ""))
    for label, scheme, keep in schemes:
        if keep:
            scheme = QuantConfig("w8a8", vision=True, keep_float=keep)
        model = phi3v.load(str(folder), device="cpu", dtype="bfloat16", quantize=scheme, progress=False)
        row = f"{label:<22}"
        for name, case in cases.items():
            m = compare(logits_of(model, case), refs[name])
            row += f"{m['rel']:>11.4f}{m['rms']:>11.4f}{m['top1']:>12.3f}"
        if records:
            same, prefix = agreement(greedy_answers(model, records), ref_answers)
            row += f"{same:>13.3f}{prefix:>8.3f}"
        print(row, flush=True)
        del model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", default=[], help="also this checkpoint folder (repeatable)")
    p.add_argument("--keep", action="append", default=[],
                   help=f"comma-separated rules from {', '.join(w8a8_layer.FLOAT_RULES)} (repeatable)")
    p.add_argument("--text-tokens", type=int, default=160)
    p.add_argument("--greedy", type=int, default=0, metavar="N",
                   help="also greedy agreement on the first N records of the phi3v eval sample set")
    p.add_argument("--no-golden", action="store_true", help="skip the tiny golden models")
    p.add_argument("--medium", action="store_true",
                   help="also a random medium checkpoint (8 decoder layers of 512, 4 CLIP layers of 256)")
    args = p.parse_args(argv)
    schemes = [("bf16", None, ()), ("int8", "int8", ()), ("int4", "int4", ()),
               ("w8a8", "w8a8", ())]
    for rules in args.keep:
        keep = tuple(r for r in rules.split(",") if r)
        unknown = [r for r in keep if r not in w8a8_layer.FLOAT_RULES]
        if unknown:
            p.error(f"unknown --keep rule(s) {unknown}; choose from {', '.join(w8a8_layer.FLOAT_RULES)}")
        schemes.append((f"w8a8+{'+'.join(keep)}", "w8a8", keep))
    from phi3v.quant.w8a8_kernel import choose_kernel, cpu_int8_features

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, W8A8 kernel: {choose_kernel()[1]}, "
          f"int8 CPU features: {', '.join(cpu_int8_features()) or 'none'}")
    folders = [] if args.no_golden else sorted(d for d in GOLDEN_MODELS.iterdir() if (d / "config.json").is_file())
    folders += [Path(m) for m in args.model]
    if args.medium:
        import tempfile

        from phi3v.testing import make_tiny_checkpoint

        folders.append(make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "medium-phi35v", style="phi35v",
                                            hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8,
                                            vision_hidden=256, vision_layers=4, vision_heads=4,
                                            vision_intermediate=1024, num_crops=4))
    records = sample_records(args.greedy) if args.greedy > 0 else None
    for folder in folders:
        measure(folder, schemes, args.text_tokens, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
