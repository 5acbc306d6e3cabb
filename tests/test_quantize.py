"""Weight-only int8 / int4 quantization (phi3v.quant.layers, phi3v.quant.checkpoint, `phi3v quantize`).

Accuracy is measured against the float32 model on the golden tiny checkpoint (random weights,
so top-1 margins are small and the bounds are loose but far from chance = 1/32064):
  int8  logits max abs error <= 5% of max |logit|,  top-1 agreement >= 85%   (measured 2%, 94%)
  int4  logits max abs error <= 40% of max |logit|, top-1 agreement >= 50%   (measured 25%, 63%)
A quantized checkpoint must give bit-identical logits to quantizing the float checkpoint at load.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import phi3v
from phi3v.errors import CheckpointError, Phi3VError
from phi3v.quant.checkpoint import quantize_checkpoint, save_quantized
from phi3v.quant.layers import (CONFIG_KEY, PREFILL_ROWS, QuantConfig, WeightOnlyInt4Linear, WeightOnlyInt8Linear,
                            dequantize_int4, dequantize_int8, pack_nibbles, quantize_int4, quantize_int8,
                            quantize_linear, unpack_nibbles)

GOLDEN = Path(__file__).parent / "golden" / "models" / "tiny-phi3v"
BOUNDS = {"int8": (0.05, 0.85), "int4": (0.40, 0.50)}  # (max rel logit error, min top-1 agreement)


@pytest.fixture(scope="module")
def prompt_ids():
    gen = torch.Generator().manual_seed(7)
    return torch.randint(0, 32000, (160,), generator=gen).tolist()


@pytest.fixture(scope="module")
def reference_logits(prompt_ids):
    model = phi3v.load(str(GOLDEN), device="cpu", dtype="float32", progress=False)
    return model.logits(prompt_ids)


def _load(path, **kw):
    return phi3v.load(str(path), device="cpu", progress=False, **kw)


# -- the math -------------------------------------------------------------------------------------

def test_int8_error_is_at_most_half_a_step():
    w = torch.randn(64, 96) * 0.05
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (64,)
    err = (dequantize_int8(q, s) - w).abs()
    assert bool((err <= s[:, None] / 2 + 1e-7).all())
    assert int(q.abs().max()) == 127  # each row's largest weight uses the full range


def test_int4_error_is_at_most_half_a_step_and_nibbles_round_trip():
    w = torch.randn(32, 256) * 0.05
    q, s, z = quantize_int4(w, 64)
    assert q.shape == (32, 128) and q.dtype == torch.uint8 and s.shape == z.shape == (32, 4)
    levels = unpack_nibbles(q)
    assert int(levels.max()) <= 15 and torch.equal(pack_nibbles(levels), q)
    err = (dequantize_int4(q, s, z) - w).abs().view(32, 4, 64)
    step = s.float()[..., None]
    assert bool((err <= step / 2 + step * 0.02).all())  # + bf16 rounding of scale and zero


def test_bad_schemes_are_rejected():
    with pytest.raises(Phi3VError, match="unknown quantization"):
        QuantConfig.parse("int3")
    with pytest.raises(Phi3VError, match="power of two"):
        QuantConfig.parse("int4:100")
    with pytest.raises(Phi3VError, match="no group size"):
        QuantConfig("int8", 64)
    assert QuantConfig.parse("int4").group_size == 128
    assert QuantConfig.parse("int4:32").to_json() == {"scheme": "int4", "group_size": 32, "vision": False}


# -- the layers -------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["int8", "int4:64"])
@pytest.mark.parametrize("rows", [1, 5, max(PREFILL_ROWS.values())])  # kernel path, dequantize + GEMM path
def test_layer_multiplies_with_its_dequantized_weight(scheme, rows):
    torch.manual_seed(0)
    lin = nn.Linear(256, 192, bias=True)
    layer = quantize_linear(lin, QuantConfig.parse(scheme))
    assert isinstance(layer, WeightOnlyInt8Linear if scheme == "int8" else WeightOnlyInt4Linear)
    p = layer.portable()
    w = dequantize_int8(p["qweight"], p["scales"]) if scheme == "int8" else \
        dequantize_int4(p["qweight"], p["scales"], p["zeros"])
    x = torch.randn(rows, 256)
    want = x @ w.T + lin.bias
    got = layer(x)
    assert got.shape == (rows, 192) and got.dtype == torch.float32
    # activations go through bf16 in the CPU kernels: ~2^-8 relative per product
    assert (got - want).abs().max().item() < 0.02 * want.abs().max().item()
    # and the quantized weight is close to the float one
    assert (w - lin.weight).abs().max().item() < 0.1 * lin.weight.abs().max().item()
    assert layer(x.view(rows, 1, 256)).shape == (rows, 1, 192)


def test_portable_form_survives_the_cpu_kernel_layout():
    lin = nn.Linear(128, 128, bias=False)
    q, s, z = quantize_int4(lin.weight.detach(), 32)
    layer = quantize_linear(lin, QuantConfig("int4", 32))
    assert layer.layout == "cpu"  # repacked for torch's CPU int4 kernel
    assert torch.equal(layer.portable()["qweight"], q)


# -- whole model: accuracy vs float32 -------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantized_logits_close_to_float32(scheme, dtype, prompt_ids, reference_logits):
    model = _load(GOLDEN, dtype=dtype, quantize=scheme)
    layers = [m for m in model.module.modules() if isinstance(m, (WeightOnlyInt8Linear, WeightOnlyInt4Linear))]
    assert len(layers) == 4 * model.config.text.num_hidden_layers  # qkv, o, gate_up, down per layer
    assert isinstance(model.module.lm_head, nn.Linear)  # lm_head and vision stay float
    assert not any(isinstance(m, (WeightOnlyInt8Linear, WeightOnlyInt4Linear))
                   for m in model.module.model.vision_embed_tokens.modules())
    logits = model.logits(prompt_ids)
    max_err, min_agree = BOUNDS[scheme]
    rel = (logits - reference_logits).abs().max().item() / reference_logits.abs().max().item()
    agree = (logits.argmax(-1) == reference_logits.argmax(-1)).float().mean().item()
    assert rel <= max_err, f"{scheme}/{dtype}: relative logit error {rel:.3f}"
    assert agree >= min_agree, f"{scheme}/{dtype}: top-1 agreement {agree:.3f}"


def test_cached_decode_agrees_with_uncached_forward():
    """Decode (one row: the int4 kernel) and the full forward of >= PREFILL_ROWS tokens (dequantize
    + GEMM) agree."""
    from phi3v.engine.generate import GenerationState, generate_ids
    from phi3v.options import GenerationOptions

    model = _load(GOLDEN, dtype="float32", quantize="int4")
    prompt = torch.randint(0, 32000, (PREFILL_ROWS["int4"] + 10,), generator=torch.Generator().manual_seed(3))
    seen = []
    state = GenerationState(prompt, [], model.module.new_cache())
    tokens = list(generate_ids(model.module, state, GenerationOptions(max_new_tokens=6), frozenset(),
                               logits_hook=lambda step, lg: seen.append(lg.clone())))
    full = model.logits(prompt.tolist() + tokens[:-1])[prompt.numel() - 1:]
    for step, lg in enumerate(seen):
        assert (lg - full[step]).abs().max().item() < 0.02 * full[step].abs().max().item()


def test_vision_quantization_on_request(prompt_ids):
    model = _load(GOLDEN, dtype="float32", quantize=QuantConfig("int8", vision=True))
    vision = model.module.model.vision_embed_tokens
    assert isinstance(vision.img_projection[0], nn.Linear)  # the projector stays float
    assert isinstance(vision.img_processor.vision_model.encoder.layers[0].mlp.fc1, WeightOnlyInt8Linear)
    ref = _load(GOLDEN, dtype="float32")
    pixels = torch.randn(1, 2, 3, 336, 336)
    sizes = torch.tensor([[336, 336]])
    got, want = model.image_embeddings(pixels, sizes)[0], ref.image_embeddings(pixels, sizes)[0]
    assert (got - want).abs().max().item() < 0.1 * want.abs().max().item()


# -- checkpoints ----------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantize_cli_checkpoint_loads_directly_with_identical_logits(tmp_path, scheme, prompt_ids):
    from phi3v.cli.quantize import main

    out = tmp_path / f"tiny-{scheme}"
    assert main([str(GOLDEN), str(out), "--scheme", scheme, "--quiet"]) == 0
    raw = json.loads((out / "config.json").read_text())
    assert raw[CONFIG_KEY]["scheme"] == scheme
    assert (out / "tokenizer.json").is_file()
    from safetensors import safe_open

    names = set(safe_open(str(out / "model.safetensors"), "pt").keys())
    assert "model.layers.0.self_attn.qkv_proj.qweight" in names
    assert "model.layers.0.self_attn.qkv_proj.weight" not in names
    assert "lm_head.weight" in names

    for dtype in ("float32", "bfloat16"):
        from_disk = _load(out, dtype=dtype)  # no quantize argument: the config says it
        at_load = _load(GOLDEN, dtype=dtype, quantize=scheme)
        assert from_disk.module.quantization == at_load.module.quantization
        assert torch.equal(from_disk.logits(prompt_ids), at_load.logits(prompt_ids))
    same = _load(out, dtype="float32", quantize=scheme)  # asking for what it is: fine
    assert same.module.quantization.scheme == scheme


def test_save_quantized_round_trip_and_sharding(tmp_path, prompt_ids):
    model = _load(GOLDEN, dtype="bfloat16", quantize="int4")
    out = save_quantized(model, tmp_path / "saved", shard_bytes=4 * 2**20)
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*-of-*.safetensors"))) >= 2
    again = _load(out, dtype="bfloat16")
    assert torch.equal(again.logits(prompt_ids), model.logits(prompt_ids))


def test_checkpoint_errors(tmp_path):
    out = quantize_checkpoint(GOLDEN, tmp_path / "q4", "int4")
    with pytest.raises(CheckpointError, match="already quantized as int4"):
        _load(out, quantize="int8")
    with pytest.raises(CheckpointError, match="already quantized"):
        quantize_checkpoint(out, tmp_path / "again", "int8")
    with pytest.raises(Phi3VError, match="not empty"):
        quantize_checkpoint(GOLDEN, out, "int8")
    # groups wider than the model's inputs (128): refused before the output folder is made
    with pytest.raises(Phi3VError, match=r"input width 128 of model\.layers\.0\..* group size 256.*int4:128"):
        quantize_checkpoint(GOLDEN, tmp_path / "wide", "int4:256")
    assert not (tmp_path / "wide").exists()
    # a checkpoint whose scheme does not match its tensors fails with the tensor named
    raw = json.loads((out / "config.json").read_text())
    raw[CONFIG_KEY] = {"scheme": "int4", "group_size": 64}
    (out / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"qkv_proj\.scales"):
        _load(out)
    raw[CONFIG_KEY] = {"scheme": "int2"}
    (out / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="phi3v_quantization"):
        _load(out)
