"""The timed workloads, the same for every engine.  Each returns one sample per call.

Metric names end in `_s` (seconds, lower is better) or `_tok_s` (tokens per second, higher is
better); report.py uses the suffix to orient the ratios.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

QUESTION = "Describe this image in detail."
FOLLOWUP = "What colours are the largest shapes?"


@dataclass
class Plan:
    """What to run; `quick()` is the development setting."""

    repeats: int = 3  # samples of the cheap metrics (decode, preprocessing, prefill)
    heavy_repeats: int = 3  # samples of the expensive ones (vision 17 crops, TTFT, follow-up)
    crops: tuple[int, ...] = (1, 5, 17)
    ttft_num_crops: tuple[int, ...] = (4, 16)
    prefill_tokens: int = 512
    decode_tokens: int = 128
    short_prompt: int = 32
    long_context: int = 2048
    followup_answer_tokens: int = 16
    vision: bool = True  # vision and TTFT metrics (skipped for variants that do not change them)

    @classmethod
    def quick(cls) -> "Plan":
        return cls(repeats=1, heavy_repeats=1, crops=(1, 5), ttft_num_crops=(4,), prefill_tokens=128,
                   decode_tokens=16, long_context=512, followup_answer_tokens=4)


def bench_image(side: int = 1000) -> Image.Image:
    """A square synthetic picture (shapes and noise): num_crops 4 -> 2x2 + global = 5 crops,
    num_crops 16 -> 4x4 + global = 17 crops."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:side, 0:side]
    img = np.stack([(x * 255 // side), (y * 255 // side), ((x + y) * 127 // side)], axis=-1).astype(np.float32)
    img[(x - side * 0.3) ** 2 + (y - side * 0.4) ** 2 < (side * 0.15) ** 2] = (220, 40, 40)
    img[int(side * 0.6):int(side * 0.85), int(side * 0.5):int(side * 0.9)] = (30, 60, 200)
    img += rng.normal(0, 8, img.shape)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def text_ids(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(100, 32000, (n - 1,), generator=g).tolist()


def image_messages(image) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _rate(times: list[float]) -> float:
    """Tokens per second between the first and the last token (the first includes the prefill)."""
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")


def run_plan(engine, plan: Plan, log=print) -> dict[str, list[float]]:
    """Every metric's samples, in the order they are run."""
    from ..engine.image import preprocess

    out: dict[str, list[float]] = {}

    def record(name: str, repeats: int, sample) -> None:
        for i in range(repeats):
            value = sample()
            out.setdefault(name, []).append(value)
            log(f"  {name} [{i + 1}/{repeats}] {value:.4g}")

    image = bench_image()
    if plan.vision:
        for nc in plan.ttft_num_crops:
            record(f"preprocess_nc{nc}_s", plan.repeats, lambda nc=nc: _timed(lambda: preprocess([image], nc)))
        gen = torch.Generator().manual_seed(1)
        for n in plan.crops:
            crops = torch.randn(n, 3, 336, 336, generator=gen)
            engine.encode_crops(crops[:1])  # warm-up (first-call allocations)
            record(f"vision_{n}crops_s", plan.heavy_repeats if n > 5 else plan.repeats,
                   lambda crops=crops: _timed(lambda: engine.encode_crops(crops)))
        for nc in plan.ttft_num_crops:
            record(f"ttft_1img_nc{nc}_s", plan.heavy_repeats, lambda nc=nc: engine.first_token(image_messages(image), nc))
    ids = text_ids(plan.prefill_tokens)
    engine.prefill(ids[:16])  # warm-up
    record(f"prefill_{plan.prefill_tokens}_tok_s", plan.repeats,
           lambda: plan.prefill_tokens / _timed(lambda: engine.prefill(ids)))
    short = text_ids(plan.short_prompt, seed=1)
    record("decode_short_tok_s", plan.repeats, lambda: _rate(engine.decode_times(short, plan.decode_tokens)))
    record(f"decode_ctx{plan.long_context}_tok_s", plan.repeats,
           lambda: _rate(engine.decode_times(short[:8], plan.decode_tokens, context=plan.long_context)))
    if plan.vision:
        record("followup_ttft_nc4_s", plan.heavy_repeats,
               lambda: engine.followup_first_token(image_messages(image), FOLLOWUP, 4, plan.followup_answer_tokens))
    return out
