"""Memory behaviour that the benchmark's figures rely on: paging the vision tower out between
images (low_memory) and KV-cache growth that never holds two whole caches."""

from __future__ import annotations

import numpy as np
import torch

import phi3v
from phi3v.engine.decoder import KVCache
from phi3v.kernels.page_out import page_out, safetensors_mappings


def picture(seed: int) -> np.ndarray:
    return (np.random.RandomState(seed).rand(80, 120, 3) * 255).astype(np.uint8)


def test_low_memory_pages_out_the_vision_tower_and_features_stay_identical(tiny_model_dir, monkeypatch):
    # bf16 = the tiny checkpoint's stored dtype: its tensors are zero-copy file mappings
    model = phi3v.load(str(tiny_model_dir), device="cpu", dtype="bfloat16", progress=False, low_memory=True,
                       image_cache_mb=0, prefix_cache=False)
    assert model.low_memory
    vision = list(model.module.model.vision_embed_tokens.parameters())
    mapped = safetensors_mappings()
    assert mapped and any(lo <= p.data_ptr() < hi for p in vision for lo, hi in mapped)
    released = []
    import phi3v.engine.image_features as api

    monkeypatch.setattr(api, "page_out", lambda tensors: released.append(page_out(tensors)) or released[-1])
    prepared = model.prepare(prompt="What is this?", images=[picture(1)])
    first = model._image_features([prepared])[0][0].clone()
    assert released and released[-1] > 0  # whole pages of the mapped vision weights were advised
    again = model._image_features([prepared])[0][0]  # pages come back from the page cache
    assert torch.equal(first, again)
    monkeypatch.setenv("PHI3V_VISION_PACKED", "0")  # the plain path low_memory runs (packs differ by rounding)
    cold = phi3v.load(str(tiny_model_dir), device="cpu", dtype="bfloat16", progress=False, low_memory=False,
                      image_cache_mb=0)
    assert not cold.low_memory
    assert torch.equal(cold._image_features([cold.prepare(prompt="What is this?", images=[picture(1)])])[0][0],
                       first)


def test_page_out_leaves_anonymous_memory_alone():
    t = torch.randn(1 << 16)  # 256 KiB of ordinary heap memory
    keep = t.clone()
    assert page_out([t]) == 0
    assert torch.equal(t, keep)


def test_quantized_models_default_to_low_memory(tiny_model_dir):
    model = phi3v.load(str(tiny_model_dir), device="cpu", dtype="float32", progress=False, quantize="int8")
    assert model.low_memory
    assert not phi3v.load(str(tiny_model_dir), device="cpu", dtype="float32", progress=False).low_memory


def test_kv_cache_grows_by_a_quarter_one_layer_at_a_time_keeping_its_contents():
    cache = KVCache(num_layers=3, batch=1, heads=2, head_dim=4, dtype=torch.float32, device="cpu", max_len=10_000)
    cache.reserve(1000)
    assert cache.capacity == 1024  # rounded up to GROW_CHUNK
    for i in range(3):
        cache.k[i][:, :, :1000] = torch.full((1, 2, 1000, 4), float(i))
        cache.v[i][:, :, :1000] = torch.full((1, 2, 1000, 4), float(-i))
    cache.length = 1000
    old_k0 = cache.k[0]
    cache.reserve(1025)
    assert cache.capacity == 1280  # 1024 * 1.25, not 2048
    assert cache.k[0] is not old_k0 and cache.k[0].shape[2] == 1280
    for i in range(3):
        assert bool((cache.k[i][:, :, :1000] == i).all()) and bool((cache.v[i][:, :, :1000] == -i).all())
        assert bool((cache.k[i][:, :, 1000:] == 0).all())  # unused slots are finite zeros
    cache.reserve(9_990)
    assert cache.capacity == 10_000  # capped at max_len
