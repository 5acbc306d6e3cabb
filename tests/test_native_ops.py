"""The native kernels as torch operators (phi3v.kernels.ops): registered under torch.ops.phi3v, fake
implementations with the right shapes, torch.library.opcheck, results equal to the torch fallback,
visible by name in torch.profiler, traced by torch.compile, and built while phi3v.load() runs.

Tolerances: the kernels and the fallbacks both read bf16-rounded activations and accumulate in
fp32; they differ by summation order only (float32 outputs: ~1e-5 relative to the sum of |terms|),
plus one bf16 rounding of the output (2^-8 relative) for bf16 outputs."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from phi3v.kernels import native, ops
from phi3v.kernels.decode_linear import DecodeLinear
from phi3v.quant.layers import quantize_int4, quantize_int8

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: "
                                                                 f"{native.why_unavailable()}")
OPS = ("gemv_bf16", "gemv_int8", "gemv_int4", "decode_attention")


def _inputs(rows: int = 3, seed: int = 0) -> dict[str, tuple]:
    """Arguments of each operator: N = 48 outputs, K = 128 inputs, int4 groups of 64; attention
    B=2, H=4 query heads over KVH=2, D=16, a cache of capacity 40 with 29 filled slots."""
    g = torch.Generator().manual_seed(seed)
    N, K, G = 48, 128, 64
    x = torch.randn(rows, K, generator=g).to(torch.bfloat16)
    w = torch.randn(N, K, generator=g).to(torch.bfloat16)
    q8, s8 = quantize_int8(torch.randn(N, K, generator=g))
    q4, s4, z4 = quantize_int4(torch.randn(N, K, generator=g), G)
    q = torch.randn(2, 4, 1, 16, generator=g).to(torch.bfloat16)
    kb = torch.randn(2, 2, 40, 16, generator=g).to(torch.bfloat16)
    vb = torch.randn(2, 2, 40, 16, generator=g).to(torch.bfloat16)
    valid = torch.ones(2, 29, dtype=torch.bool)
    valid[1, :5] = False  # row 1's left padding
    return {
        "gemv_bf16": (w, x),
        "gemv_int8": (q8, s8.float().contiguous(), x),
        "gemv_int4": (q4, s4.to(torch.bfloat16).contiguous(), z4.to(torch.bfloat16).contiguous(), x, G),
        "decode_attention": (q, kb, vb, 29, valid),
    }


def test_the_operators_are_registered():
    for name in OPS:
        op = getattr(torch.ops.phi3v, name)
        assert op.default._schema.name == f"phi3v::{name}"


def test_fake_implementations_give_the_output_shapes():
    args = _inputs(rows=5)
    want = {"gemv_bf16": (5, 48), "gemv_int8": (5, 48), "gemv_int4": (5, 48), "decode_attention": (2, 4, 1, 16)}
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        for name in OPS:
            fake = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args[name])
            out = getattr(torch.ops.phi3v, name)(*fake)
            assert tuple(out.shape) == want[name], name
            assert out.dtype == torch.bfloat16, name


@pytest.mark.parametrize("native_on", [True, False], ids=["native", "fallback"])
def test_opcheck_passes(native_on, monkeypatch):
    monkeypatch.setenv("PHI3V_NATIVE", "1" if native_on else "0")
    native.reset_for_tests()
    try:
        if native_on and not native.available():
            pytest.skip(native.why_unavailable())
        for name, args in _inputs().items():
            torch.library.opcheck(getattr(torch.ops.phi3v, name), args)
    finally:
        monkeypatch.undo()
        native.reset_for_tests()


@needs_native
@pytest.mark.parametrize("rows", [1, 4, 8])
def test_native_results_equal_the_fallback(rows, monkeypatch):
    args = _inputs(rows=rows, seed=rows)
    got = {name: getattr(ops, name)(*a) for name, a in args.items()}
    monkeypatch.setenv("PHI3V_NATIVE", "0")
    native.reset_for_tests()
    try:
        assert not native.available()
        want = {name: getattr(ops, name)(*a) for name, a in args.items()}
    finally:
        monkeypatch.undo()
        native.reset_for_tests()
    for name in OPS:
        g, w = got[name].float(), want[name].float()
        assert g.shape == w.shape and got[name].dtype == want[name].dtype, name
        # bf16 outputs: one rounding apart at most (plus summation order)
        tol = 2.0**-7 * w.abs() + 1e-2
        assert bool(((g - w).abs() <= tol).all()), f"{name}: max diff {(g - w).abs().max().item():.3g}"
    # The padded slots of row 1 are hidden in both: its output is the attention over slots 5..28 only.
    q, kb, vb, length, valid = args["decode_attention"]
    alone = ops.decode_attention_torch(q[1:], kb[1:, :, 5:].contiguous(), vb[1:, :, 5:].contiguous(), length - 5)
    assert torch.allclose(got["decode_attention"][1:].float(), alone.float(), atol=1e-2, rtol=2.0**-7)


@needs_native
def test_the_profiler_shows_the_operators_by_name():
    layer = DecodeLinear(128, 48, bias=False).to(torch.bfloat16)
    x = torch.randn(1, 1, 128).to(torch.bfloat16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        layer(x)
        ops.decode_attention(*_inputs()["decode_attention"][:4])
    names = {e.key for e in prof.key_averages()}
    assert "phi3v::gemv_bf16" in names and "phi3v::decode_attention" in names


def test_torch_compile_traces_through_the_operators():
    """fullgraph=True: a graph break (an opaque ctypes call) would raise.  The aot_eager backend
    traces with fake tensors (the fake implementations) and runs the real operators, without a
    C++ compile of generated code."""
    layer = DecodeLinear(128, 48, bias=True).to(torch.bfloat16)
    w, x = _inputs(rows=2)["gemv_bf16"]

    def f(w, x):
        return torch.ops.phi3v.gemv_bf16(w, x).float().relu()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(w, x), f(w, x))
    torch._dynamo.reset()
    compiled_layer = torch.compile(layer, fullgraph=True, backend="aot_eager")  # its checks trace too
    with torch.no_grad():  # as the engine runs (the operators have no backward)
        assert torch.allclose(compiled_layer(x[:, None]).float(), layer(x[:, None]).float())
    torch._dynamo.reset()


def test_load_builds_the_kernels(tiny_model_dir, monkeypatch):
    """phi3v.load() prepares the library (the first request does not): after a reset, the load
    alone leads to exactly one build-or-cache lookup and leaves the kernels usable."""
    if native._unsupported_reason():
        pytest.skip(native._unsupported_reason())
    import phi3v

    calls = []
    real_build = native._build
    monkeypatch.setattr(native, "_build", lambda name: calls.append(name) or real_build(name))
    native.reset_for_tests()
    try:
        assert not native._tried
        phi3v.load(str(tiny_model_dir), device="cpu", dtype="bfloat16", progress=False)
        assert native._tried and len(calls) == 1
        assert native._lib is not None or native.why_unavailable()
    finally:
        monkeypatch.undo()
        native.reset_for_tests()


def test_the_first_request_imports_nothing_the_load_could_have(tiny_model_dir):
    """torch loads its custom-operator dispatch (sympy, ~1 s cold) on the first operator call;
    phi3v.load() makes that call, so the first answer imports no new module (fresh process)."""
    code = (
        "import sys, phi3v\n"
        f"m = phi3v.load({str(tiny_model_dir)!r}, device='cpu', dtype='bfloat16', progress=False)\n"
        "before = set(sys.modules)\n"
        "m.ask('hi', max_new_tokens=2)\n"
        "print(sorted(set(sys.modules) - before))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    new = eval(out.stdout.strip().splitlines()[-1])
    assert not [name for name in new if name.split(".")[0] in ("sympy", "torch")], new
