"""Devices and dtypes: the one parser of the names users write ("auto", "cuda:1", "bf16", ...).

    resolve_device("auto") -> torch.device     cuda when available, else cpu
    resolve_dtype(None, device) -> torch.dtype  bfloat16 (float32 on MPS)
    parse_dtype("bf16") -> torch.bfloat16       any accepted name or a torch.dtype
    dtype_name(torch.bfloat16) -> "bfloat16"    the canonical name (CLI output, JSON)

Unknown names raise DeviceError listing what is accepted (never a raw torch RuntimeError).
"""

from __future__ import annotations

import re

import torch

from ..errors import DeviceError

# Accepted dtype names -> dtype. The canonical name of each dtype comes first.
DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
}
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")  # as shown in error messages
_DEVICE_RE = re.compile(r"^(cpu|mps|cuda)(?::(\d+))?$")


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A supported floating dtype from its name ("bfloat16", "bf16", "torch.float16", ...) or itself."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        name = str(dtype).removeprefix("torch.")
    else:
        name = str(dtype).strip().lower().removeprefix("torch.")
        if name in DTYPES:
            return DTYPES[name]
    raise DeviceError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPES)}")


def dtype_name(dtype: str | torch.dtype) -> str:
    """"bfloat16", "float32" or "float16" for any accepted spelling."""
    return str(parse_dtype(dtype)).removeprefix("torch.")


def dtype_bytes(dtype: str | torch.dtype) -> int:
    """Bytes per element (2 for bfloat16/float16, 4 for float32)."""
    return parse_dtype(dtype).itemsize


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bfloat16, or float32 on MPS. `device` may also be a CLI name ("auto", "cuda:1")."""
    # bf16 halves memory and is what the checkpoints store; MPS lacks full bf16 support.
    kind = device.type if isinstance(device, torch.device) else str(device).strip().lower().split(":")[0]
    return torch.float32 if kind == "mps" else torch.bfloat16


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | str) -> torch.dtype:
    """The dtype to load in: `dtype` parsed, or the device's default for None / "auto"."""
    if dtype is None or (isinstance(dtype, str) and dtype.strip().lower() == "auto"):
        return default_dtype(device)
    return parse_dtype(dtype)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" -> cuda when available, else cpu; "cpu", "cuda", "cuda:N", "mps" -> checked to exist here."""
    if isinstance(device, torch.device):
        device = str(device)
    text = str(device).strip().lower()
    if text == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    match = _DEVICE_RE.match(text)
    if match is None:
        raise DeviceError(f"unknown device {device!r}: choose one of {', '.join(DEVICES)}")
    kind, index = match.group(1), match.group(2)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("CUDA was requested but no CUDA device is available (use --device cpu or auto)")
        if index is not None and int(index) >= torch.cuda.device_count():
            raise DeviceError(f"device {text!r} does not exist: this machine has {torch.cuda.device_count()} "
                              "CUDA device(s), numbered from 0")
    if kind == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise DeviceError("MPS was requested but is not available on this machine (use --device cpu or auto)")
    return torch.device(text)
