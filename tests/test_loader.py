"""phi3v.engine.loader (one loader for float and quantized models) and engine.devices (one dtype
and device parser)."""

from __future__ import annotations

import pytest
import torch

import phi3v
from phi3v.engine import devices, hub, loader
from phi3v.errors import DeviceError
from phi3v.kernels import native

# -------------------------------------------------------------------------------- devices, dtypes


@pytest.mark.parametrize("name", ["float32", "fp32", "bfloat16", "bf16", "float16", "fp16", "BF16", "torch.float16"])
def test_every_accepted_dtype_name_parses(name):
    assert devices.parse_dtype(name) in (torch.float32, torch.bfloat16, torch.float16)


def test_unknown_dtype_lists_every_accepted_name(tiny_model_dir):
    with pytest.raises(DeviceError) as err:
        phi3v.load(str(tiny_model_dir), device="cpu", dtype="int3", progress=False)
    message = str(err.value)
    assert "'int3'" in message
    for name in ("float32", "bfloat16", "float16", "bf16", "fp16"):  # float16 works: it must be listed
        assert name in message
    with pytest.raises(DeviceError, match="float16"):
        devices.parse_dtype(torch.int8)


def test_unknown_device_is_a_device_error_naming_the_accepted_ones(tiny_model_dir):
    with pytest.raises(DeviceError) as err:
        phi3v.load(str(tiny_model_dir), device="tpu", dtype="float32", progress=False)
    for name in ("auto", "cpu", "cuda", "mps"):
        assert name in str(err.value)
    with pytest.raises(DeviceError):
        devices.resolve_device("cpu:x")


def test_device_and_dtype_defaults():
    assert devices.resolve_device("cpu") == torch.device("cpu")
    assert devices.resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert devices.resolve_device("auto").type in ("cpu", "cuda")
    assert devices.resolve_dtype(None, torch.device("cpu")) == torch.bfloat16
    assert devices.resolve_dtype("auto", "mps") == torch.float32  # MPS lacks full bf16 support
    assert devices.dtype_name("bf16") == "bfloat16" and devices.dtype_bytes("float32") == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_a_device_error():
    with pytest.raises(DeviceError, match="CUDA"):
        devices.resolve_device("cuda:0")


# -------------------------------------------------------------------------------- the loader


def test_load_resolves_the_model_folder_once(tiny_model_dir, monkeypatch):
    calls = []
    real = hub.resolve_model_dir

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(hub, "resolve_model_dir", counting)
    monkeypatch.setattr(loader, "resolve_model_dir", counting)
    phi3v.load(str(tiny_model_dir), device="cpu", dtype="float32", progress=False)
    assert len(calls) == 1
    phi3v.load(str(tiny_model_dir), device="cpu", dtype="float32", progress=False, quantize="int8")
    assert len(calls) == 2
    # a caller that resolved the folder itself (the CLI, to show a download's progress) passes it on
    model = phi3v.load("a-name", model_dir=tiny_model_dir, device="cpu", dtype="float32", progress=False)
    assert len(calls) == 2 and model.name == "a-name" and model.model_dir == tiny_model_dir


def test_cli_loading_resolves_the_model_folder_once(tiny_model_dir, monkeypatch):
    """The CLI resolves first (a download's progress bars before the spinner) and hands the folder
    on; phi3v.load used to resolve it a second time."""
    from argparse import Namespace

    from phi3v.cli.loading import load_model_from_args

    calls = []
    real = hub.resolve_model_dir
    monkeypatch.setattr(hub, "resolve_model_dir", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    monkeypatch.setattr(loader, "resolve_model_dir", hub.resolve_model_dir)
    args = Namespace(model=str(tiny_model_dir), device="cpu", dtype="float32", quiet=True, revision=None,
                     quantize=None, low_memory=None, verbose=False)
    model = load_model_from_args(args)
    assert calls == [str(tiny_model_dir)] and model.name == str(tiny_model_dir)


def test_load_engine_float_and_quantized(tiny_model_dir):
    loaded = loader.load_engine(tiny_model_dir, device="cpu", dtype="float32", progress=False)
    assert loaded.model_dir == tiny_model_dir.resolve()
    assert not loaded.module.training
    assert all(not t.is_meta for t in [*loaded.module.parameters(), *loaded.module.buffers()])
    assert loaded.module.model.rotary.inv_freq_short.device.type == "cpu"
    assert loaded.tokenizer.end_id == 32007 and loaded.config.preprocessor.num_crops == 2
    q = loader.load_engine(tiny_model_dir, device="cpu", dtype="float32", progress=False, quantize="int4:32")
    assert q.module.quantization.label() and q.module.quantization.group_size == 32
    assert all(not t.is_meta for t in [*q.module.parameters(), *q.module.buffers()])
    with pytest.raises(phi3v.Phi3VError, match="rope_switch"):
        loader.load_engine(tiny_model_dir, device="cpu", rope_switch="sometimes")


def test_native_kernels_are_prepared_during_a_cpu_load(tiny_model_dir, monkeypatch):
    """Built (or found in the cache) in load(), not in the first request's time to first token."""
    native.reset_for_tests()
    assert not native._tried
    try:
        phi3v.load(str(tiny_model_dir), device="cpu", dtype="float32", progress=False)
        assert native._tried
    finally:
        native.reset_for_tests()
