"""The same engine on CUDA in bfloat16 (skipped where no CUDA device exists; these tests are
counted only where they run). Compared with the float32 CPU run of the same tiny checkpoint."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import phi3v

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _png(seed=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def cuda_model(tiny_model_dir):
    return phi3v.load(str(tiny_model_dir), device="cuda", dtype="bfloat16", progress=False)


def test_auto_picks_cuda_in_bfloat16(tiny_model_dir):
    model = phi3v.load(str(tiny_model_dir), device="auto", progress=False)
    assert model.device.type == "cuda" and model.dtype == torch.bfloat16


def test_cuda_bf16_logits_follow_cpu_fp32(cuda_model, tiny_model):
    prepared = tiny_model.prepare(prompt="Describe.", images=[_png()])
    args = (prepared.input_ids, prepared.images.pixel_values, prepared.images.image_sizes)
    ref = tiny_model.logits(*args, last=8)
    got = cuda_model.logits(*args, last=8)
    assert got.device.type == "cpu" and got.dtype == torch.float32
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert rel < 0.05, rel
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75


def test_cuda_generation_streams_and_batches(cuda_model):
    stream = cuda_model.stream("Tell me about this.", images=[_png(1)], max_new_tokens=8)
    text = "".join(stream)
    assert text == stream.completion.text and stream.completion.usage.completion_tokens >= 1
    single = [cuda_model.ask(p, max_new_tokens=6, num_crops=1).usage.completion_tokens for p in ("Hi", "Hello there")]
    batch = cuda_model.generate_batch([cuda_model.prepare(prompt=p) for p in ("Hi", "Hello there")],
                                      phi3v.GenerationOptions(max_new_tokens=6))
    assert [c.usage.completion_tokens for c in batch] == single
