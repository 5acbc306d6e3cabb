"""W8A8: int8 weights and per-token int8 activations (phi3v.quant.w8a8_kernel, w8a8_layer).

Accuracy against the float32 model on the golden tiny checkpoint (random weights, so top-1 margins
are small), for a text prompt and an image prompt (the CLIP tower runs W8A8 too):
  logits max abs error <= 6% of max |logit|, top-1 agreement >= 85%
  (measured with scripts/w8a8_error.py: 3.0% / 4.0% and 92% / 92%; int8 weight-only 2.0% / 2.3%, 92% / 94%)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import phi3v
from phi3v.errors import Phi3VError
from phi3v.quant import w8a8_kernel, w8a8_native
from phi3v.quant.layers import CONFIG_KEY, QuantConfig, WeightOnlyInt8Linear, quantize_int8, quantize_linear
from phi3v.quant.w8a8_kernel import KERNELS, PackedWeight, linear_w8a8, pack_weight, quantize_rows, quantize_rows_torch
from phi3v.quant.w8a8_layer import W8A8_MIN_ROWS, W8A8Linear

GOLDEN = Path(__file__).parent / "golden" / "models" / "tiny-phi3v"
MAX_REL_ERROR, MIN_TOP1 = 0.06, 0.85


def _load(path, **kw):
    return phi3v.load(str(path), device="cpu", progress=False, **kw)


def _packed(kernel: str, qweight: torch.Tensor, scales: torch.Tensor) -> PackedWeight:
    """The weight for one named kernel (what pack_weight builds for the kernel it chooses)."""
    if kernel == "onednn":
        if not w8a8_kernel._onednn_ok():
            pytest.skip("this torch has no oneDNN int8 linear")
        return PackedWeight(kernel, qweight, scales.float(), torch.ops.onednn.qlinear_prepack(qweight, None),
                            torch.zeros(qweight.shape[0], dtype=torch.int64))
    return PackedWeight(kernel, qweight, scales.float())


def _expected(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The scheme's product written out: x's int8 rows (quantize_rows_torch, checked on its own
    above), exact integer sums, both scales, in float64."""
    u8, sx = quantize_rows_torch(x)
    qx = u8.to(torch.int64) - 128
    return (qx @ qweight.to(torch.int64).t()).double() * sx.double() * scales.double()


# -- the math --------------------------------------------------------------------------------------

def test_rows_quantize_to_their_own_scale():
    x = torch.randn(12, 40)
    x[3] *= 1000.0  # an outlier token does not change the other rows' scales
    x[5] = 0.0  # an all-zero row gives zeros, not NaN
    before = x.clone()
    u8, sx = quantize_rows(x)
    assert torch.equal(x, before)  # the input is read, never written (q/k/v share it)
    assert u8.dtype == torch.uint8 and sx.shape == (12, 1)
    q = u8.to(torch.int16) - 128
    assert bool((q[5] == 0).all()) and torch.isfinite(sx).all()
    assert torch.equal(sx, sx.to(torch.bfloat16).float())  # a bf16 value (the output is scaled in bf16)
    for r in (0, 3):
        # sx is max|x| / 127 rounded up to bf16 (at most ~1.2% larger): the largest |q| is 125-127
        assert 125 <= int(q[r].abs().max()) <= 127
        assert (q[r].float() * sx[r] - x[r]).abs().max().item() <= sx[r].item() / 2 * 1.001
    assert sx[3].item() > 500 * sx[0].item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_c_quantizer_gives_the_torch_bytes(dtype):
    if not w8a8_native.prepare():
        pytest.skip("no C compiler / not x86-64 Linux: the torch quantizer is the only one")
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(70, 300, generator=gen) * torch.rand(70, 1, generator=gen) * 20).to(dtype)
    x[0] = 0.0
    x[1, 7] = -3000.0
    x[2, ::2] = 0.5  # exact halves after scaling exercise round-half-even
    got, want = w8a8_native.quantize_rows(x), quantize_rows_torch(x)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_c_epilogue_scales_rows_and_adds_the_bias(dtype):
    if not w8a8_native.prepare():
        pytest.skip("no C compiler / not x86-64 Linux: torch does the epilogue")
    gen = torch.Generator().manual_seed(5)
    y, b = torch.randn(33, 70, generator=gen).to(dtype), torch.randn(70, generator=gen).to(dtype)
    sx = torch.rand(33, 1, generator=gen).to(torch.bfloat16).float()
    for bias in (None, b):
        got = y.clone()
        assert w8a8_native.scale_rows(got, sx, bias)
        want = y.double() * sx.double() + (0 if bias is None else bias.double())
        ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-23  # one rounding to y's dtype
        assert ((got.double() - want).abs() <= want.abs() * ulp + 1e-6).all()
    assert not w8a8_native.scale_rows(y.t().contiguous().t(), sx)  # not contiguous: the caller uses torch


def test_without_native_code_torch_does_the_same(monkeypatch):
    monkeypatch.setenv("PHI3V_NATIVE", "0")
    w8a8_native.reset_for_tests()
    try:
        assert not w8a8_native.prepare()
        x = torch.randn(10, 64)
        assert w8a8_native.quantize_rows(x) is None
        assert torch.equal(quantize_rows(x)[0], quantize_rows_torch(x)[0])
        q, s = quantize_int8(torch.randn(24, 64) * 0.05)
        bias = torch.randn(24)
        for kernel in KERNELS:  # the torch epilogue (oneDNN's output scaled and biased in torch)
            got = linear_w8a8(x, _packed(kernel, q, s), bias)
            want = _expected(x, q, s) + bias.double()
            assert (got.double() - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    finally:
        monkeypatch.delenv("PHI3V_NATIVE")
        w8a8_native.reset_for_tests()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_kernel_computes_the_scheme(kernel, dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(37, 96, generator=gen).to(dtype)
    q, s = quantize_int8(torch.randn(80, 96, generator=gen) * 0.05)
    bias = torch.randn(80, generator=gen)
    got = linear_w8a8(x, _packed(kernel, q, s), bias.to(dtype))
    assert got.dtype == dtype and got.shape == (37, 80)
    want = _expected(x, q, s) + bias.double()
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # output rounding only: the integer sums are exact
    assert (got.double() - want).abs().max().item() <= tol * want.abs().max().item()


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_rows_result_does_not_depend_on_the_other_rows(kernel):
    """Per-token scales and exact integer sums: a prefill chunk, the whole prompt, or a fused
    decode + prefill pass give each row the same bits."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(40, 128, generator=gen).to(torch.bfloat16)
    q, s = quantize_int8(torch.randn(64, 128, generator=gen) * 0.05)
    weight, bias = _packed(kernel, q, s), torch.randn(64, generator=gen).to(torch.bfloat16)
    whole = linear_w8a8(x, weight, bias)
    assert torch.equal(linear_w8a8(x[5:17], weight, bias), whole[5:17])
    assert torch.equal(linear_w8a8(x[30:], weight, bias), whole[30:])


def test_w8a8_product_is_close_to_the_float_product():
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(64, 256, generator=gen), torch.randn(128, 256, generator=gen) * 0.05
    y = linear_w8a8(x, pack_weight(*quantize_int8(w)))
    ref = x @ w.t()
    assert (y - ref).pow(2).mean().sqrt().item() < 0.02 * ref.pow(2).mean().sqrt().item()


def test_forced_kernel_and_bad_names(monkeypatch):
    monkeypatch.setenv("PHI3V_W8A8_KERNEL", "int_mm")
    assert w8a8_kernel.choose_kernel()[0] == "int_mm"
    assert pack_weight(*quantize_int8(torch.randn(16, 32))).kernel == "int_mm"
    monkeypatch.setenv("PHI3V_W8A8_KERNEL", "bogus")
    with pytest.raises(Phi3VError, match="PHI3V_W8A8_KERNEL='bogus' is not one of onednn, int_mm, torch"):
        w8a8_kernel.choose_kernel()


def test_the_cpu_features_decide_the_default_kernel(monkeypatch):
    monkeypatch.delenv("PHI3V_W8A8_KERNEL", raising=False)
    monkeypatch.setattr(w8a8_kernel, "_choice", None)
    monkeypatch.setattr(w8a8_kernel, "cpu_int8_features", lambda: ())
    assert w8a8_kernel.choose_kernel()[0] == "int_mm"  # never assumes VNNI/AMX
    monkeypatch.setattr(w8a8_kernel, "_choice", None)
    monkeypatch.setattr(w8a8_kernel, "cpu_int8_features", lambda: ("avx512_vnni",))
    monkeypatch.setattr(w8a8_kernel, "_onednn_ok", lambda: True)
    assert w8a8_kernel.choose_kernel() == ("onednn", "oneDNN int8 matmul (avx512_vnni)")
    monkeypatch.setattr(w8a8_kernel, "_choice", None)  # the next caller decides again


# -- the layer ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_chooses_its_path_by_rows(dtype):
    gen = torch.Generator().manual_seed(3)
    lin = nn.Linear(128, 96, bias=True).to(dtype)
    w8a8 = quantize_linear(lin, QuantConfig.parse("w8a8"))
    int8 = quantize_linear(lin, QuantConfig.parse("int8"))
    assert isinstance(w8a8, W8A8Linear) and isinstance(int8, WeightOnlyInt8Linear)
    for rows in (1, W8A8_MIN_ROWS - 1):  # decode: exactly the int8 scheme's kernels
        x = torch.randn(rows, 128, generator=gen).to(dtype)
        assert torch.equal(w8a8(x), int8(x))
    x = torch.randn(2, W8A8_MIN_ROWS, 128, generator=gen).to(dtype)  # prefill: activations quantized
    want = (_expected(x.reshape(-1, 128), w8a8.qweight, w8a8.scales.float()) + lin.bias.double()).view(2, -1, 96)
    got = w8a8(x)
    assert got.shape == (2, W8A8_MIN_ROWS, 96)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert (got.double() - want).abs().max().item() <= tol * want.abs().max().item()


# -- the model ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cases():
    """(text ids, image prompt ids, pixels, sizes) and their float32 logits."""
    ref = _load(GOLDEN, dtype="float32")
    text = torch.randint(0, 32000, (160,), generator=torch.Generator().manual_seed(7)).tolist()
    image = np.random.default_rng(0).integers(0, 255, (336, 500, 3), dtype=np.uint8)
    p = ref.prepare(prompt="Describe the image.", images=[image], num_crops=4)
    prompts = {"text": (text, None, None), "image": (p.input_ids, p.images.pixel_values, p.images.image_sizes)}
    return {name: (case, ref.logits(*case)) for name, case in prompts.items()}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_w8a8_logits_close_to_float32(dtype, cases):
    model = _load(GOLDEN, dtype=dtype, quantize="w8a8")
    layers = [m for m in model.module.modules() if isinstance(m, W8A8Linear)]
    text, vision = model.config.text, model.config.vision
    assert len(layers) == 4 * text.num_hidden_layers + 6 * len(
        model.module.model.vision_embed_tokens.img_processor.vision_model.encoder.layers)
    assert isinstance(model.module.lm_head, nn.Linear)  # lm_head and projector stay float
    assert isinstance(model.module.model.vision_embed_tokens.img_projection[0], nn.Linear)
    assert vision is not None
    for name, (case, ref) in cases.items():
        logits = model.logits(*case)
        rel = (logits - ref).abs().max().item() / ref.abs().max().item()
        top1 = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
        assert rel <= MAX_REL_ERROR, f"{name}/{dtype}: relative logit error {rel:.3f}"
        assert top1 >= MIN_TOP1, f"{name}/{dtype}: top-1 agreement {top1:.3f}"


def test_w8a8_is_never_the_default(tiny_model):
    assert getattr(tiny_model.module, "quantization", None) is None
    assert not any(isinstance(m, W8A8Linear) for m in tiny_model.module.modules())


def test_generation_with_an_image_prefill_and_decode():
    model = _load(GOLDEN, dtype="bfloat16", quantize="w8a8")
    image = np.random.default_rng(1).integers(0, 255, (200, 300, 3), dtype=np.uint8)
    c = model.ask("What is this?", images=[image], max_new_tokens=6, num_crops=2)
    assert c.usage.completion_tokens == 6 and c.usage.image_tokens > 0


def test_quantize_cli_writes_a_w8a8_checkpoint(tmp_path, cases, capsys):
    from phi3v.cli.quantize import main

    out = tmp_path / "tiny-w8a8"
    assert main([str(GOLDEN), str(out), "--scheme", "w8a8", "--quiet"]) == 0
    assert json.loads((out / "config.json").read_text())[CONFIG_KEY] == {"scheme": "w8a8", "vision": True}
    from_disk = _load(out, dtype="bfloat16")  # the config says w8a8
    at_load = _load(GOLDEN, dtype="bfloat16", quantize="w8a8")
    assert from_disk.module.quantization == at_load.module.quantization
    case, _ = cases["image"]
    assert torch.equal(from_disk.logits(*case), at_load.logits(*case))
    assert main([str(GOLDEN), str(tmp_path / "x"), "--scheme", "w8a8", "--group-size", "64", "--quiet"]) != 0
    assert "--group-size applies to int4 only (w8a8 is per output channel)" in capsys.readouterr().err


def test_w8a8_takes_no_group_size():
    with pytest.raises(Phi3VError, match="no group size"):
        QuantConfig("w8a8", 64)
    with pytest.raises(Phi3VError, match="unknown w8a8 float layer rule"):
        QuantConfig.parse("w8a8:64")
    assert QuantConfig.parse("w8a8").to_json() == {"scheme": "w8a8", "vision": True}


def test_sensitive_layers_can_stay_float(tmp_path):
    qc = QuantConfig.parse("w8a8:last,down_proj")
    assert qc.keep_float == ("last", "down_proj") and qc.label() == "w8a8 (last, down_proj float)"
    assert QuantConfig.from_json(qc.to_json()) == qc
    model = _load(GOLDEN, dtype="bfloat16", quantize=qc)
    layers = model.module.model.layers
    last = len(layers) - 1
    for i, layer in enumerate(layers):
        assert isinstance(layer.mlp.down_proj, nn.Linear)
        assert isinstance(layer.self_attn.qkv_proj, nn.Linear if i == last else W8A8Linear)
    clip = model.module.model.vision_embed_tokens.img_processor.vision_model.encoder.layers[0]
    assert isinstance(clip.mlp.fc2, W8A8Linear)
    from phi3v.quant.checkpoint import quantize_checkpoint

    out = quantize_checkpoint(GOLDEN, tmp_path / "kept", qc)
    assert json.loads((out / "config.json").read_text())[CONFIG_KEY]["keep_float"] == ["last", "down_proj"]
    assert _load(out, dtype="bfloat16").module.quantization == qc
    with pytest.raises(Phi3VError, match="unknown w8a8 float layer rule"):
        QuantConfig.parse("w8a8:middle")
    with pytest.raises(Phi3VError, match="keep_float is a w8a8 setting"):
        QuantConfig("int8", keep_float=("first",))
