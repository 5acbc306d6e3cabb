"""The settings an eval compares: weights (bf16 / int8 / int4 / fp32) x num_crops x prompt template.

    parse_variants("bf16,int8,int4")                 -> bf16, int8, int4
    parse_variants("bf16,int4", num_crops="4,16")    -> bf16/c4, bf16/c16, int4/c4, int4/c16
    parse_variants("bf16", prompts=[T1, T2])         -> bf16/p1, bf16/p2

The first variant is the reference the others' agreement is measured against.

What variants may share while one run loads them one after another (runner.py):
- preprocessed pixels (HD transform, normalisation): always; they depend on the image and num_crops
  only, and the pixel cache is keyed by both;
- CLIP image features: between variants with the same compute dtype (bf16, int8 and int4 all compute
  in bfloat16). Quantization here is weight-only on the decoder's linear layers, so the vision tower
  is the same module with the same weights; the feature cache is keyed by pixel content, so
  num_crops 4 and 16 never mix. fp32 has its own features.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import Phi3VError
from .prompts import check_template

# weights name -> (compute dtype, quantize argument of phi3v.load)
WEIGHTS = {"bf16": ("bfloat16", None), "fp32": ("float32", None), "fp16": ("float16", None),
           "int8": ("bfloat16", "int8"), "int4": ("bfloat16", "int4")}


@dataclass(frozen=True)
class Variant:
    name: str  # "int8", "int8/c16", "bf16/p2": unique, no "|"
    weights: str  # a WEIGHTS key, or int4:GROUP (the int4 group size)
    num_crops: int | None = None  # None: the model's default
    prompt: str | None = None  # a template with {question} (prompts.py); None: per-metric default

    @property
    def dtype(self) -> str:
        return WEIGHTS[self.weights.split(":")[0]][0]

    @property
    def quantize(self) -> str | None:
        """phi3v.load's quantize=: "int8", "int4", or "int4:GROUP" as written."""
        return self.weights if WEIGHTS[self.weights.split(":")[0]][1] else None

    @property
    def feature_group(self) -> str:
        """Variants with the same group may reuse each other's image features (see the module doc)."""
        return self.dtype

    def settings(self) -> dict:
        return {"weights": self.weights, "dtype": self.dtype, "quantize": self.quantize,
                "num_crops": self.num_crops, "prompt": self.prompt}


def _split(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",")]
    if not all(items):
        raise Phi3VError(f"{what}: expected a comma-separated list, got {text!r}")
    if len(set(items)) != len(items):
        raise Phi3VError(f"{what}: {text!r} names a setting twice")
    return items


def parse_variants(weights: str | None = None, num_crops: str | None = None,
                   prompts: list[str] | None = None) -> list[Variant]:
    names = _split(weights, "--variants") if weights else ["bf16"]
    for n in names:
        base, _, group = n.partition(":")
        if base not in WEIGHTS or (group and (base != "int4" or not group.isdigit())):
            raise Phi3VError(f"--variants: unknown setting {n!r}; known: {', '.join(WEIGHTS)} "
                             "(and int4:GROUP, e.g. int4:64)")
    crops: list[int | None] = [None]
    if num_crops:
        crops = []
        for c in _split(num_crops, "--num-crops"):
            if not c.isdigit() or not 1 <= int(c) <= 64:
                raise Phi3VError(f"--num-crops: expected whole numbers 1..64, got {c!r}")
            crops.append(int(c))
    templates: list[str | None] = [check_template(t) for t in prompts] if prompts else [None]
    variants = []
    for w in names:
        for c in crops:
            for k, t in enumerate(templates, start=1):
                name = w + (f"/c{c}" if len(crops) > 1 else "") + (f"/p{k}" if len(templates) > 1 else "")
                variants.append(Variant(name, w, c, t))
    return variants
