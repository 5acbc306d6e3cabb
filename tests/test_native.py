"""The native decode kernels (phi3v.kernels.native) against float32 references, their fallbacks, and the
layers that use them.  Tolerances: inputs are bf16 and products are exact in fp32, so a float32
result differs from the reference only by accumulation order (~K * 2^-24 of the sum of |terms|);
a bf16 result adds one rounding (2^-8 relative)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from phi3v.kernels import native
from phi3v.kernels.decode_linear import DecodeLinear
from phi3v.quant.layers import (QuantConfig, WeightOnlyInt4Linear, WeightOnlyInt8Linear, dequantize_int4,
                            quantize_int4, quantize_int8, quantize_linear)

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: "
                                                                 f"{native.why_unavailable()}")
BF16_REL = 2.0**-8


@pytest.fixture(params=list(native.ISAS))
def isa(request, monkeypatch):
    """Run a kernel test once per build this CPU can execute (AVX-512 BF16 machines run both)."""
    monkeypatch.setenv("PHI3V_NATIVE_ISA", request.param)
    native.reset_for_tests()
    if not native.available():
        native.reset_for_tests()
        monkeypatch.delenv("PHI3V_NATIVE_ISA")
        pytest.skip(f"{request.param}: {native.why_unavailable() or 'not available here'}")
    if native.isa() != request.param:  # avx512amx where Linux refuses the tile state: avx512bf16 runs
        native.reset_for_tests()
        monkeypatch.delenv("PHI3V_NATIVE_ISA")
        pytest.skip(f"{request.param}: fell back to {native.isa()}")
    yield request.param
    monkeypatch.delenv("PHI3V_NATIVE_ISA")
    native.reset_for_tests()


def _check(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """got (M, N) vs x @ w.T in float64; bound from the sum of |terms| per output."""
    want = x.double() @ w.double().T
    scale = x.double().abs() @ w.double().abs().T
    tol = (BF16_REL if got.dtype == torch.bfloat16 else 0.0) * want.abs() + 1e-5 * scale + 1e-30
    err = (got.double() - want).abs()
    assert bool((err <= tol).all()), f"max error {err.max().item():.3g} (tolerance {tol.max().item():.3g})"


@needs_native
@pytest.mark.parametrize("rows", range(1, native.MAX_ROWS + 1))
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_gemv_bf16_matches_float64(rows, out_dtype, isa):
    g = torch.Generator().manual_seed(rows)
    N, K = 53, 320  # N not a multiple of the kernel's row blocks
    w = torch.randn(N, K, generator=g).to(torch.bfloat16)
    x = torch.randn(rows, K, generator=g).to(torch.bfloat16).to(out_dtype)
    got = native.gemv_bf16(w, x)
    assert got.shape == (rows, N) and got.dtype == out_dtype
    _check(got, x.to(torch.bfloat16), w)


@needs_native
@pytest.mark.parametrize("rows", [1, 2, 5, 8])
def test_gemv_int8_matches_float64(rows, isa):
    g = torch.Generator().manual_seed(10 + rows)
    N, K = 37, 272
    q, s = quantize_int8(torch.randn(N, K, generator=g))
    x = torch.randn(rows, K, generator=g)
    got = native.gemv_int8(q, s.contiguous(), x)
    assert got.dtype == torch.float32
    _check(got, x, q.double() * s.double()[:, None])
    xb = x.to(torch.bfloat16)
    got_bf16 = native.gemv_int8(q, s.contiguous(), xb)
    assert got_bf16.dtype == torch.bfloat16
    _check(got_bf16, xb, q.double() * s.double()[:, None])


@needs_native
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8])  # 5-8: two passes over each block of weight rows
@pytest.mark.parametrize("group", [64, 128])
def test_gemv_int4_matches_float64(rows, group, isa):
    g = torch.Generator().manual_seed(20 + rows + group)
    N, K = 45, 384
    q, s, z = quantize_int4(torch.randn(N, K, generator=g), group)
    w = dequantize_int4(q, s, z)  # the weight the layer stands for, float32
    x = torch.randn(rows, K, generator=g).to(torch.bfloat16)
    got = native.gemv_int4(q, s, z, x, group)
    assert got.shape == (rows, N) and got.dtype == torch.bfloat16
    _check(got, x, w)
    # float32 activations are rounded to bf16 for the kernel; the result comes back in float32
    got32 = native.gemv_int4(q, s, z, x.float(), group)
    assert got32.dtype == torch.float32
    # the 128 + q form loses a few bits to cancellation: allow 1e-4 of the |terms| sum
    want = x.double() @ w.double().T
    scale = x.double().abs() @ w.double().abs().T
    assert bool(((got32.double() - want).abs() <= 1e-4 * scale).all())


@needs_native
@pytest.mark.parametrize("rows", [2, 7, 9, 16, 17, 40, 64])  # AMX tiles: 16 inputs per tile, a partial last one
@pytest.mark.parametrize("group", [64, 192])
def test_gemv_int4_many_rows_matches_float64(rows, group, isa):
    """The AMX build takes 2-64 rows (int4_amx.h); the others take 1-8 and return None beyond."""
    g = torch.Generator().manual_seed(40 + rows + group)
    N, K = 45, 576  # N not a multiple of the 16-row weight blocks; K/G = 9 or 3 groups
    q, s, z = quantize_int4(torch.randn(N, K, generator=g), group)
    w = dequantize_int4(q, s, z)
    x = torch.randn(rows, K, generator=g).to(torch.bfloat16)
    got = native.gemv_int4(q, s, z, x, group)
    if rows > native.int4_max_rows():
        assert got is None and isa != "avx512amx"
        return
    assert got.shape == (rows, N) and got.dtype == torch.bfloat16
    _check(got, x, w)
    got32 = native.gemv_int4(q, s, z, x.float(), group)
    assert got32.dtype == torch.float32
    want = x.double() @ w.double().T
    scale = x.double().abs() @ w.double().abs().T
    assert bool(((got32.double() - want).abs() <= 1e-4 * scale).all())


def test_amx_build_is_chosen_only_where_the_cpu_has_it(monkeypatch):
    """avx512amx needs the AMX flags in /proc/cpuinfo; without them the AVX-512 BF16 build is chosen."""
    avx512 = native.ISAS["avx512bf16"][2]
    monkeypatch.setattr(native, "_cpu_flags", lambda: set(avx512))
    assert native._choose_isa() == ("avx512bf16", "")
    monkeypatch.setattr(native, "_cpu_flags", lambda: set(avx512) | {"amx_tile", "amx_bf16"})
    assert native._choose_isa() == ("avx512amx", "")


def test_amx_build_failure_falls_back_to_avx512bf16(monkeypatch, tmp_path):
    """A compiler that rejects the AMX flags costs the AMX kernel only, silently."""
    if native._choose_isa()[0] != "avx512amx":
        pytest.skip("this CPU has no AMX tiles")
    source, flags, cpu = native.ISAS["avx512amx"]
    monkeypatch.setitem(native.ISAS, "avx512amx", (source, flags + ["-mno-such-flag"], cpu))
    monkeypatch.setenv("PHI3V_CACHE_DIR", str(tmp_path))
    native.reset_for_tests()
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert native.available()
        assert native.isa() == "avx512bf16" and native.int4_max_rows() == native.MAX_ROWS
    finally:
        monkeypatch.undo()
        native.reset_for_tests()


@needs_native
@pytest.mark.parametrize("length", [1, 17, 300])
@pytest.mark.parametrize("head_dim", [96, 16, 40])  # Phi-3's, the tiny models', one with a tail
def test_decode_attention_matches_float64(length, head_dim, isa):
    from phi3v.engine.decoder import decode_attention

    g = torch.Generator().manual_seed(length + head_dim)
    B, H, KVH, cap = 2, 4, 2, 320  # grouped heads: query heads 0,1 read key/value head 0
    q = torch.randn(B, H, 1, head_dim, generator=g).to(torch.bfloat16)
    k = torch.randn(B, KVH, cap, head_dim, generator=g).to(torch.bfloat16)
    v = torch.randn(B, KVH, cap, head_dim, generator=g).to(torch.bfloat16)
    got = native.decode_attention(q, k, v, length)
    assert got.shape == (B, H, 1, head_dim) and got.dtype == torch.bfloat16
    kk = k[:, :, :length].double().repeat_interleave(H // KVH, dim=1)
    vv = v[:, :, :length].double().repeat_interleave(H // KVH, dim=1)
    want = torch.softmax(q.double() @ kk.transpose(-1, -2) * head_dim**-0.5, dim=-1) @ vv
    # float32 scores/softmax/sums, one bf16 rounding of the output
    assert (got.double() - want).abs().max().item() <= BF16_REL * want.abs().max().item() + 1e-6
    # the model's entry point picks it for bf16 and agrees with its torch path
    assert torch.equal(decode_attention(q, k, v, length), got)
    torch_path = decode_attention(q.float(), k.float(), v.float(), length)
    assert (torch_path.double() - want).abs().max().item() < 1e-5


@needs_native
def test_dequantize_kernels_round_once_to_bf16(isa):
    g = torch.Generator().manual_seed(5)
    q4, s4, z4 = quantize_int4(torch.randn(24, 256, generator=g), 128)
    want4 = dequantize_int4(q4, s4, z4)
    got4 = native.dequant_int4_bf16(q4, s4, z4, 128)
    assert got4.dtype == torch.bfloat16 and got4.shape == (24, 256)
    assert bool(((got4.float() - want4).abs() <= BF16_REL * want4.abs() + 1e-6).all())
    q8, s8 = quantize_int8(torch.randn(24, 256, generator=g))
    want8 = q8.float() * s8[:, None]
    got8 = native.dequant_int8_bf16(q8, s8.contiguous())
    assert torch.equal(got8, want8.to(torch.bfloat16))
    # widths that leave a scalar tail after the vector loops
    q8, s8 = quantize_int8(torch.randn(5, 40, generator=g))
    assert torch.equal(native.dequant_int8_bf16(q8, s8.contiguous()), (q8.float() * s8[:, None]).to(torch.bfloat16))
    q4, s4, z4 = quantize_int4(torch.randn(5, 60, generator=g), 20)
    want4 = dequantize_int4(q4, s4, z4)
    got4 = native.dequant_int4_bf16(q4, s4, z4, 20)
    assert bool(((got4.float() - want4).abs() <= BF16_REL * want4.abs() + 1e-6).all())


@needs_native
def test_shapes_the_kernels_do_not_take_return_none(isa):
    w = torch.randn(8, 64).to(torch.bfloat16)
    assert native.gemv_bf16(w, torch.randn(native.MAX_ROWS + 1, 64)) is None  # too many rows
    assert native.gemv_bf16(w.float(), torch.randn(1, 64)) is None  # float32 weight
    w48 = torch.randn(8, 48).to(torch.bfloat16)  # K not a multiple of 32
    x48 = torch.randn(1, 48).to(torch.bfloat16)
    q, s, z = quantize_int4(torch.randn(8, 64), 32)
    q8, s8, z8 = quantize_int4(torch.randn(8, 64), 8)
    assert native.gemv_int4(q8, s8, z8, torch.randn(1, 64), 8) is None  # group 8: no build takes it
    if isa.startswith("avx512"):  # 32 bf16 / 64 nibbles per step
        assert native.gemv_bf16(w48, x48) is None
        assert native.gemv_int4(q, s, z, torch.randn(1, 64), 32) is None
        assert not native.int4_group_ok(32) and native.int4_group_ok(128)
    else:  # AVX2 finishes odd widths with scalar code and unpacks 16 nibbles per step
        _check(native.gemv_bf16(w48, x48), x48, w48)
        assert native.gemv_int4(q, s, z, torch.randn(1, 64), 32) is not None
        assert native.int4_group_ok(32)


@needs_native
@pytest.mark.parametrize("rows", [1, 4, 6, 9])
def test_decode_linear_equals_f_linear(rows, isa):
    """Native for up to NATIVE_ROWS rows, F.linear beyond; the same numbers either way (to bf16)."""
    g = torch.Generator().manual_seed(rows)
    layer = DecodeLinear(128, 96, bias=True).to(torch.bfloat16)
    x = torch.randn(1, rows, 128, generator=g).to(torch.bfloat16)
    got = layer(x)
    assert got.shape == (1, rows, 96) and got.dtype == torch.bfloat16
    want = F.linear(x.float(), layer.weight.float(), layer.bias.float())
    assert (got.float() - want).abs().max().item() <= 2 * BF16_REL * want.abs().max().item()


@needs_native
@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 8, 40, 300])  # native, native, native with AMX, dequantize + GEMM
def test_quantized_layers_use_native_kernels(scheme, rows, isa):
    lin = torch.nn.Linear(256, 192, bias=False)
    layer = quantize_linear(lin, QuantConfig.parse(scheme))
    if scheme == "int4":
        assert isinstance(layer, WeightOnlyInt4Linear) and layer.layout == "native"
        p = layer.portable()
        w = dequantize_int4(p["qweight"], p["scales"], p["zeros"])
    else:
        assert isinstance(layer, WeightOnlyInt8Linear) and layer._native_scales is not None
        w = layer.qweight.float() * layer.scales.float()[:, None]
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
    got = layer(x)
    want = x.to(torch.bfloat16).float() @ w.T
    # prefill rounds the dequantized weight and the product to bf16: 2^-8 each
    assert (got - want).abs().max().item() <= 3 * BF16_REL * want.abs().max().item()


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("PHI3V_NATIVE", "0")
    native.reset_for_tests()
    try:
        assert not native.available()
        assert "PHI3V_NATIVE=0" in native.why_unavailable()
        w = torch.randn(16, 64).to(torch.bfloat16)
        assert native.gemv_bf16(w, torch.randn(1, 64)) is None
        layer = quantize_linear(torch.nn.Linear(128, 64, bias=False), QuantConfig("int4"))
        assert layer.layout == "cpu"  # torch's int4 kernel layout instead
        y = DecodeLinear(64, 16, bias=False).to(torch.bfloat16)(torch.randn(1, 64).to(torch.bfloat16))
        assert y.shape == (1, 16)
    finally:
        monkeypatch.delenv("PHI3V_NATIVE")
        native.reset_for_tests()


def test_broken_compiler_falls_back_with_a_warning(monkeypatch, tmp_path):
    if native._unsupported_reason():
        pytest.skip(native._unsupported_reason())
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("PHI3V_CACHE_DIR", str(tmp_path))
    native.reset_for_tests()
    try:
        with pytest.warns(RuntimeWarning, match="native kernels could not be built"):
            assert not native.available()
        assert "could not be built" in native.why_unavailable()
    finally:
        monkeypatch.undo()
        native.reset_for_tests()


@needs_native
def test_batched_bf16_decode_hides_each_rows_padding(tiny_model_dir, monkeypatch):
    """A left-padded bf16 batch decodes through the native kernel with the key-padding mask and
    gives each row the logits of its own single run (to bf16 precision)."""
    import phi3v
    from phi3v.engine.generate import prefill
    from phi3v.engine.running_batch import RunningBatch

    model = phi3v.load(str(tiny_model_dir), device="cpu", dtype="bfloat16", progress=False,
                       image_cache_mb=0, prefix_cache=False)
    masked_calls = []
    real = native.decode_attention

    def spy(q, k, v, length, key_valid=None):
        if key_valid is not None:
            masked_calls.append(int((~key_valid[:, :length]).sum()))
        return real(q, k, v, length, key_valid)

    monkeypatch.setattr(native, "decode_attention", spy)
    prompts = ["Short.", "A medium length prompt with a few more words.", "Hi"]
    ids = [torch.tensor(model.prepare(prompt=p).input_ids) for p in prompts]
    forced = [[100, 200, 300], [7, 8, 9], [3000, 3001, 3002]]
    batch, first = RunningBatch(model.module), []
    for row_ids in ids:
        cache = model.module.new_cache()
        first.append(prefill(model.module, model.module.embed(row_ids), 0, cache))
        batch.join(cache)
    got = [torch.stack(first)] + [batch.step([forced[r][s] for r in range(3)]) for s in range(3)]
    assert masked_calls and all(hidden > 0 for hidden in masked_calls)  # padding was hidden natively
    for r, row_ids in enumerate(ids):
        alone = RunningBatch(model.module)  # a batch of one: no padding, no mask
        cache = model.module.new_cache()
        want = [prefill(model.module, model.module.embed(row_ids), 0, cache)]
        alone.join(cache)
        want += [alone.step([forced[r][s]])[0] for s in range(3)]
        want, have = torch.stack(want), torch.stack([g[r] for g in got])
        # bf16 activations: differently shaped products round differently (~2^-8 per op)
        assert (have - want).abs().max() <= 0.05 * want.abs().max(), f"row {r}"
        assert torch.equal(have.argmax(-1), want.argmax(-1)), f"row {r}"
