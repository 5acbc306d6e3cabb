"""Quantized models on disk and in memory: fill one at load time, write one, read one back.

    resolve_scheme(cfg, requested) -> QuantConfig | None   the scheme a load uses (or None: float)
    load_quantized_weights(module, cfg, model_dir, qc, dtype=..., device=...)
        fills a module built on the meta device by engine.loader (which also made its RoPE tables):
        float checkpoint -> quantize the target linears while loading;
        quantized checkpoint (config.json has CONFIG_KEY) -> load its tensors directly.
    quantize_checkpoint(src_dir, out_dir, "int4")  streams a float checkpoint into a quantized one
    save_quantized(model, out_dir)                 writes a model quantized in memory

Memory: the float parts (embeddings, norms, lm_head, vision unless quantized) load through
engine.weights.load_weights (memory-mapped, zero copy in the stored dtype).  The quantized layers'
tensors are read one at a time with plain file reads (`TensorReader`), never through the mapping,
so the pages of the float weights being quantized do not stay resident: peak memory is the
quantized model plus one float tensor.

A quantized checkpoint keeps the official layout (config.json, tokenizer, safetensors shards with
an index); each quantized layer X stores X.qweight, X.scales (+ X.zeros for int4) (+ X.bias)
instead of X.weight, and config.json records the scheme under CONFIG_KEY.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path

import torch
from torch import nn

from ..engine.config import Phi3VConfig
from ..engine.hub import INDEX_FILE
from ..engine.model import Phi3VForCausalLM, meta_module
from ..engine.weights import checkpoint_files, load_weights
from ..errors import CheckpointError, Phi3VError
from .layers import (CONFIG_KEY, QuantConfig, checkpoint_quantization, new_quantized_linear,
                       portable_tensors, quantize_weight, quantized_layers, set_submodule,
                       target_linear_names)
from ..engine.vision import unused_vision_keys

SHARD_BYTES = 2 * 2**30  # largest shard written
_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
              "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32,
              "I64": torch.int64, "BOOL": torch.bool}


class TensorReader:
    """Reads single tensors of a checkpoint folder into fresh memory (no memory map)."""

    def __init__(self, model_dir):
        self.files = checkpoint_files(model_dir)  # name -> shard path
        self._headers: dict[Path, tuple[dict, int]] = {}

    def _header(self, file: Path) -> tuple[dict, int]:
        if file not in self._headers:
            try:
                with open(file, "rb") as f:
                    (size,) = struct.unpack("<Q", f.read(8))
                    header = json.loads(f.read(size))
            except (OSError, ValueError, struct.error) as err:
                raise CheckpointError(f"cannot read the safetensors header of {file}: {err}") from err
            self._headers[file] = (header, 8 + size)
        return self._headers[file]

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        entry = self._entry(name)
        return _ST_DTYPES[entry["dtype"]], tuple(entry["shape"])

    def _entry(self, name: str) -> dict:
        if name not in self.files:
            raise CheckpointError(f"tensor {name} is missing from the checkpoint")
        header, _ = self._header(self.files[name])
        entry = header.get(name)
        if entry is None or entry.get("dtype") not in _ST_DTYPES:
            raise CheckpointError(f"tensor {name} is missing or has an unsupported dtype in {self.files[name]}")
        return entry

    def read(self, name: str) -> torch.Tensor:
        entry = self._entry(name)
        file = self.files[name]
        _, data_start = self._header(file)
        start, end = entry["data_offsets"]
        buf = bytearray(end - start)
        with open(file, "rb") as f:
            f.seek(data_start + start)
            if f.readinto(buf) != len(buf):
                raise CheckpointError(f"{file} is truncated (tensor {name})")
        dtype = _ST_DTYPES[entry["dtype"]]
        if not buf:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).view(entry["shape"])


# ---------------------------------------------------------------------------------------------
# loading


def resolve_scheme(cfg: Phi3VConfig, requested) -> QuantConfig | None:
    """The scheme to load with: the checkpoint's own, or the requested one for a float checkpoint."""
    stored = checkpoint_quantization(cfg.raw)
    wanted = QuantConfig.parse(requested)
    if stored is not None and wanted is not None and (wanted.scheme, wanted.group_size) != (
            stored.scheme, stored.group_size):
        raise CheckpointError(f"this checkpoint is already quantized as {stored.label()}; it cannot be loaded "
                              f"as {wanted.label()} (load it without --quantize, or quantize the float checkpoint)")
    return stored or wanted


def _layer_pattern(names: list[str]) -> str:
    """One regex matching every checkpoint tensor of the given layers."""
    alternatives = "|".join(re.escape(n) for n in names)
    return rf"^(?:{alternatives})\.(?:weight|bias|qweight|scales|zeros)$"


def load_quantized_weights(module: Phi3VForCausalLM, cfg: Phi3VConfig, model_dir, qc: QuantConfig, *,
                           dtype: torch.dtype, device: torch.device) -> Phi3VForCausalLM:
    """Fill `module` (built on the meta device, RoPE tables already made) with the target linears
    quantized as `qc` says (see the module docstring); returns it, with `module.quantization` set."""
    stored = checkpoint_quantization(cfg.raw) is not None
    targets = target_linear_names(module, qc)
    shapes = {}
    for name in targets:
        lin = module.get_submodule(name)
        shapes[name] = (lin.in_features, lin.out_features, lin.bias is not None)
        set_submodule(module, name, nn.Module())  # placeholder: load_weights sees no tensor here
    skip = [*unused_vision_keys(cfg.vision)]
    if targets:
        skip.append(_layer_pattern(targets))
    load_weights(module, model_dir, dtype=dtype, device=device, skip_unused=skip)

    reader = TensorReader(model_dir)
    for name in targets:
        in_f, out_f, has_bias = shapes[name]
        bias = reader.read(name + ".bias") if has_bias else None
        if stored:
            layer = _read_quantized_layer(reader, name, qc, in_f, out_f, bias, dtype)
        else:
            weight = reader.read(name + ".weight")
            if tuple(weight.shape) != (out_f, in_f):
                raise CheckpointError(f"{name}.weight: checkpoint {list(weight.shape)} vs module {[out_f, in_f]}")
            layer = quantize_weight(weight, bias, qc, dtype=dtype)
            del weight
        set_submodule(module, name, _to_device(layer, device))
        release_free_memory()
    module.quantization = qc
    return module


def release_free_memory() -> None:
    """Give freed heap memory back to the OS (glibc keeps the many ~10-100 MB blocks freed while
    repacking; without this the process holds ~1 GiB more than the int4 model needs)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def _to_device(layer: nn.Module, device: torch.device) -> nn.Module:
    if device.type == "cpu":
        return layer
    # The CPU kernel layout is CPU-only: rebuild from the portable form on the target device.
    portable = {k: v.to(device) for k, v in layer.portable().items()}
    cls = type(layer)
    kwargs = {"group_size": layer.group_size} if hasattr(layer, "group_size") else {}
    new = cls(layer.in_features, layer.out_features, "bias" in portable, device=device,
              dtype=layer.scales.dtype, **kwargs)
    for key, value in portable.items():
        if key == "bias":
            new.bias = nn.Parameter(value, requires_grad=False)
        else:
            setattr(new, key, value)
    return new.prepare()


def _read_quantized_layer(reader: TensorReader, name: str, qc: QuantConfig, in_f: int, out_f: int,
                          bias, dtype) -> nn.Module:
    layer = new_quantized_linear(qc, in_f, out_f, bias is not None, device="cpu", dtype=dtype)
    for key in ("qweight", "scales", "zeros"):
        if not hasattr(layer, key):
            continue
        want = getattr(layer, key)
        full = f"{name}.{key}"
        got_dtype, got_shape = reader.info(full)
        if got_shape != tuple(want.shape):
            raise CheckpointError(f"{full}: checkpoint {list(got_shape)} vs expected {list(want.shape)} "
                                  f"for {qc.label()}")
        if want.is_floating_point() != got_dtype.is_floating_point or (
                not want.is_floating_point() and got_dtype != want.dtype):
            raise CheckpointError(f"{full}: checkpoint dtype {got_dtype} vs expected {want.dtype}")
        setattr(layer, key, reader.read(full).to(want.dtype))
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
    return layer.prepare()


# ---------------------------------------------------------------------------------------------
# writing


class _ShardWriter:
    """Collects tensors and writes model-0000k-of-0000n.safetensors files plus the index."""

    def __init__(self, out_dir: Path, shard_bytes: int = SHARD_BYTES):
        self.out_dir, self.shard_bytes = out_dir, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.shard_bytes:
            self._flush()
        self.pending[name] = tensor.detach().to("cpu").contiguous()
        self.pending_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        tmp = f"shard-{len(self.written) + 1}.tmp"
        save_file(self.pending, str(self.out_dir / tmp), metadata={"format": "pt"})
        self.written.append((tmp, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        if self.pending or not self.written:
            self._flush()
        n = len(self.written)
        for tmp, _ in self.written:
            _readable_like_other_files(self.out_dir / tmp)
        if n == 1:
            (self.out_dir / self.written[0][0]).replace(self.out_dir / "model.safetensors")
            return
        weight_map = {}
        for i, (tmp, names) in enumerate(self.written, start=1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            (self.out_dir / tmp).replace(self.out_dir / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _prepare_out_dir(src_dir: Path, out_dir: Path, qc: QuantConfig) -> None:
    """Copy every non-weight file (configs, tokenizer) and record the scheme in config.json."""
    out_dir = Path(out_dir)
    if out_dir.resolve() == Path(src_dir).resolve():
        raise Phi3VError("the output folder must differ from the source checkpoint folder")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise Phi3VError(f"output folder {out_dir} exists and is not empty: choose a new folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in Path(src_dir).iterdir():
        if item.is_file() and not item.name.endswith(".safetensors") and item.name != INDEX_FILE:
            shutil.copy2(item, out_dir / item.name)
    cfg_path = out_dir / "config.json"
    raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    raw[CONFIG_KEY] = qc.to_json()
    cfg_path.write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")


def _check_fits(module, targets: set[str], qc: QuantConfig) -> None:
    """Refuse a scheme the model's shapes cannot take (int4 groups that do not divide an input width)."""
    if qc.scheme != "int4":
        return
    for name, sub in module.named_modules():
        if name in targets and sub.in_features % qc.group_size:
            fits = [g for g in (128, 64, 32, 16) if sub.in_features % g == 0]
            hint = f"; choose a smaller group (e.g. int4:{fits[0]})" if fits else "; use int8"
            raise Phi3VError(f"int4: input width {sub.in_features} of {name} is not a multiple of the group size "
                             f"{qc.group_size}{hint}")


def quantize_checkpoint(src_dir, out_dir, scheme, *, shard_bytes: int = SHARD_BYTES, progress=None) -> Path:
    """Write a quantized copy of a float checkpoint folder, one tensor at a time.

    progress(done, total) is called after each source tensor.  Returns the output folder.
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    qc = QuantConfig.parse(scheme)
    cfg = Phi3VConfig.from_dir(src_dir)
    if checkpoint_quantization(cfg.raw) is not None:
        raise CheckpointError(f"{src_dir} is already quantized; quantize the float checkpoint instead")
    module = meta_module(cfg)
    targets = set(target_linear_names(module, qc))
    reader = TensorReader(src_dir)
    for name in targets:
        if name + ".weight" not in reader:
            raise CheckpointError(f"tensor {name}.weight is missing from {src_dir}")
    _check_fits(module, targets, qc)  # before the output folder exists: a refusal leaves nothing behind
    _prepare_out_dir(src_dir, out_dir, qc)
    writer = _ShardWriter(out_dir, shard_bytes)
    names = list(reader.files)
    for i, full in enumerate(names, start=1):
        layer, _, suffix = full.rpartition(".")
        if layer in targets and suffix == "weight":
            bias = reader.read(layer + ".bias") if layer + ".bias" in reader else None
            for key, t in portable_tensors(reader.read(full), bias, qc).items():
                writer.add(f"{layer}.{key}", t)
        elif not (layer in targets and suffix == "bias"):  # biases travel with their weight
            writer.add(full, reader.read(full))
        if progress is not None:
            progress(i, len(names))
    writer.finish()
    return out_dir


def save_quantized(model, out_dir, *, shard_bytes: int = SHARD_BYTES) -> Path:
    """Write a model quantized in memory (phi3v.load(..., quantize=...)) as a checkpoint that
    phi3v.load reads directly.  `model` is a Phi3V; configs and tokenizer come from its folder."""
    module = model.module
    qc = getattr(module, "quantization", None)
    if qc is None:
        raise CheckpointError("the model is not quantized: load it with quantize='int8' or 'int4' first")
    out_dir = Path(out_dir)
    _prepare_out_dir(Path(model.model_dir), out_dir, qc)
    writer = _ShardWriter(out_dir, shard_bytes)
    quantized = dict(quantized_layers(module))
    for name, layer in quantized.items():
        for key, t in layer.portable().items():
            writer.add(f"{name}.{key}", t.float() if (qc.scheme in ("int8", "w8a8") and key == "scales") else t)
    prefixes = tuple(n + "." for n in quantized)
    for name, t in module.state_dict().items():
        if not name.startswith(prefixes):
            writer.add(name, t)
    writer.finish()
    return out_dir


def _readable_like_other_files(path) -> None:
    """safetensors writes its files with mode 0600; give a shard the mode a plain new file gets
    (0666 less the umask, usually 0644), as config.json and the tokenizer files next to it have."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
