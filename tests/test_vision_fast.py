"""The CLIP tower on oneDNN pre-packed weights (engine/clip_packed.py) equals the plain formulation.

Tiny vision config (hidden 32 / 64, 577 tokens per crop), random weights in memory. float32: within
1e-5 of the largest value, layer by layer and for the whole tower; bf16: within bf16 rounding of the
plain bf16 path. The pack is made on its own for bf16 CPU towers and only then; PHI3V_VISION_PACKED=0,
packed_weights=False and quantized layers keep the plain path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import phi3v
from phi3v.engine import clip_packed
from phi3v.engine.config import Phi3VConfig
from phi3v.engine.vision import ClipVisionModel
from phi3v.testing import tiny_config

pytestmark = pytest.mark.skipif(not clip_packed.available(), reason="this torch build has no oneDNN")


def tower(dtype=torch.float32, hidden=64, heads=4, layers=3, seed=0) -> ClipVisionModel:
    """A tiny ClipVisionModel (layers - 1 used) with random weights, biases and norms."""
    raw = tiny_config(vision_hidden=hidden, vision_heads=heads, vision_layers=layers, vision_intermediate=4 * hidden)
    model = ClipVisionModel(Phi3VConfig.from_dicts(raw).vision)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("norm1.weight") or name.endswith("norm2.weight") else 0.0
            p.copy_(base + torch.randn(p.shape, generator=gen) * (0.3 if "norm" in name else 0.1))
    return model.to(dtype).eval()


def pixels(n: int, dtype=torch.float32, seed=1) -> torch.Tensor:
    return torch.randn(n, 3, 336, 336, generator=torch.Generator().manual_seed(seed)).to(dtype)


def close(a: torch.Tensor, b: torch.Tensor, rel: float) -> None:
    a, b = a.float(), b.float()
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err <= rel * b.abs().max().item(), f"max error {err} vs largest {b.abs().max().item()}"


def plain_layer(layer, x):
    """ClipLayer as the reference writes it: separate q/k/v, heads transposed, residual adds."""
    N, T, C = x.shape
    attn, H = layer.self_attn, layer.self_attn.heads
    h = layer.layer_norm1(x)
    q, k, v = (m(h).view(N, T, H, C // H).transpose(1, 2) for m in (attn.q_proj, attn.k_proj, attn.v_proj))
    weights = torch.softmax(q @ k.transpose(-1, -2) / (C // H) ** 0.5, dim=-1)
    x = x + attn.out_proj((weights @ v).transpose(1, 2).reshape(N, T, C))
    h = layer.mlp.fc1(layer.layer_norm2(x))
    return x + layer.mlp.fc2(h * torch.sigmoid(1.702 * h))


@pytest.mark.parametrize("hidden,heads", [(32, 2), (64, 4)])
def test_packed_layer_equals_plain_formulation_fp32(hidden, heads):
    model = tower(hidden=hidden, heads=heads)
    x = model.embed(pixels(2))  # (2, 577, C)
    layer = model.encoder.layers[0]
    with torch.inference_mode():
        want = plain_layer(layer, x)
        assert model.pack()
        assert layer.packed is not None
        close(layer(x), want, 1e-5)


def test_packed_tower_equals_plain_tower_fp32():
    model = tower()
    with torch.inference_mode():
        x = pixels(3)
        want = model(x)
        assert model.encoder.layers[0].packed is None  # fp32: never packed on its own
        assert model.pack()
        got = model(x)
    assert got.shape == want.shape == (3, 576, 64)
    close(got, want, 1e-5)


def test_bf16_tower_packs_itself_and_stays_within_bf16_rounding():
    model = tower(torch.bfloat16)
    x = pixels(2, torch.bfloat16)
    with torch.inference_mode():
        model.unpack()
        want = model(x)  # plain bf16
        model._pack_tried = False
        got = model(x)
        assert all(layer.packed is not None for layer in model.encoder.layers)
        reference = tower(torch.float32)(x.float())
    close(got, want, 0.05)
    # The packed bf16 tower is at least as close to fp32 as the plain bf16 one (fewer roundings).
    err = lambda y: (y.float() - reference).abs().mean().item()  # noqa: E731
    assert err(got) <= 1.1 * err(want)


def test_switches_keep_the_plain_path(monkeypatch):
    monkeypatch.setenv(clip_packed.ENV, "0")
    model = tower(torch.bfloat16)
    with torch.inference_mode():
        model(pixels(1, torch.bfloat16))
    assert model.encoder.layers[0].packed is None
    monkeypatch.delenv(clip_packed.ENV)
    model = tower(torch.bfloat16)
    model.packed_weights = False
    with torch.inference_mode():
        model(pixels(1, torch.bfloat16))
    assert model.encoder.layers[0].packed is None


def test_grad_mode_uses_the_plain_path():
    model = tower()
    x = model.embed(pixels(1)).detach()
    layer = model.encoder.layers[0]
    with torch.no_grad():
        want = layer(x)
    assert model.pack()
    out = layer(x.requires_grad_())
    assert out.grad_fn is not None  # autograd went through nn.Linear, not the pack
    close(out.detach(), want, 1e-6)


def test_quantized_layers_are_not_packed():
    from phi3v.quant.layers import QuantConfig, quantize_linear

    model = tower()
    mlp = model.encoder.layers[1].mlp
    mlp.fc1 = quantize_linear(mlp.fc1, QuantConfig.parse("int8"))
    assert not model.pack()
    assert model.encoder.layers[0].packed is None


def test_loaded_bf16_model_features_and_pieces(tiny_model_dir):
    """A bf16 load packs at the first image; layered pieces (ImageEncoding.step(layers=1)) give the
    same features as whole calls on the packed tower."""
    model = phi3v.load(str(tiny_model_dir), device="cpu", dtype="bfloat16", progress=False,
                       image_cache_mb=0, prefix_cache=False)
    embedding = model.module.model.vision_embed_tokens
    clip = embedding.img_processor.vision_model
    image = (np.random.RandomState(3).rand(200, 420, 3) * 255).astype(np.uint8)
    prompt = model.prepare(prompt="What is it?", images=[image], num_crops=2)
    pv, sizes = prompt.images.pixel_values.to(torch.bfloat16), prompt.images.image_sizes
    whole = embedding(pv, sizes)
    assert clip.encoder.layers[0].packed is not None
    encoding = embedding.encoding(pv, sizes, chunk=1)
    while not encoding.done:
        encoding.step(layers=1)
    for a, b in zip(encoding.features, whole):
        close(a, b, 1e-2)
    clip.unpack()
    plain = embedding(pv, sizes)
    for a, b in zip(whole, plain):
        close(a, b, 0.05)


def test_low_memory_keeps_the_plain_path(tiny_model_dir):
    """low_memory pages the tower's mapped weights out between images: anonymous packs would stay."""
    model = phi3v.load(str(tiny_model_dir), device="cpu", dtype="bfloat16", progress=False,
                       image_cache_mb=0, prefix_cache=False, low_memory=True)
    image = (np.random.RandomState(4).rand(120, 160, 3) * 255).astype(np.uint8)
    model.ask("What is it?", [image], max_new_tokens=1)
    clip = model.module.model.vision_embed_tokens.img_processor.vision_model
    assert clip.encoder.layers[0].packed is None


def test_a_pack_of_another_dtype_is_not_used():
    """model.to(dtype) after a pack: the layers run plain instead of feeding the old pack."""
    model = tower(torch.bfloat16)
    assert model.pack()
    model.float()
    x = pixels(1)
    with torch.inference_mode():
        got = model(x)
        model.unpack()
        want = model(x)
    close(got, want, 1e-6)
