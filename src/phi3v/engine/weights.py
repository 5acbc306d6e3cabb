"""Load a checkpoint folder's safetensors weights into a module, strictly.

`load_weights(module, folder, dtype=..., device=...)` copies the checkpoint tensors into a torch module
whose parameter / persistent-buffer names are the checkpoint names (spec §2).  It is strict: a
missing, unexpected or mis-shaped tensor raises CheckpointError before anything is assigned.
Files are memory-mapped by safetensors; each tensor goes straight to its target dtype and device,
and a same-dtype CPU load keeps the memory-mapped tensor itself (no second copy, no fp32 detour).
It works for modules built on the meta device (`model.meta_module(cfg)`).

`checkpoint_files(folder)` maps tensor names to their shard (model.safetensors.index.json, or the
single model.safetensors).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from ..errors import CheckpointError
from .config import VisionConfig
from .devices import parse_dtype
from .hub import INDEX_FILE, SINGLE_FILE
from .vision import unused_vision_keys


def unused_vision_patterns(num_vision_layers: int) -> tuple[str, ...]:
    """Regexes of the checkpoint tensors Phi-3-V never uses with the default feature layer (-2):
    CLIP's post_layernorm and its last encoder layer (spec §2/§4).  For `skip_unused`; the model
    itself uses vision.unused_vision_keys(config), which also follows a configured layer_idx."""
    return tuple(unused_vision_keys(VisionConfig(num_hidden_layers=num_vision_layers)))


def checkpoint_files(model_dir) -> dict[str, Path]:
    """Tensor name -> safetensors file, from model.safetensors.index.json or model.safetensors."""
    folder = Path(model_dir)
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index_path} is not a valid index file (needs a 'weight_map'): {err}") from err
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: 'weight_map' must be a non-empty object")
        files = {name: folder / str(file) for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise CheckpointError(f"{index_path} names the shard {file.name}, which is missing in {folder}")
        return files
    single = folder / SINGLE_FILE
    if single.is_file():
        return {name: single for name in _open(single).keys()}
    raise CheckpointError(f"no weights in {folder}: expected {SINGLE_FILE} or {INDEX_FILE} with its shards")


def _open(file: Path):
    from safetensors import safe_open

    try:
        # Memory-maps the file; get_tensor returns tensors backed by the mapping.
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as err:  # safetensors raises its own SafetensorError for corrupt headers
        raise CheckpointError(f"cannot read safetensors file {file}: {err}") from err


class _Slot:
    """One tensor of the module, reachable under one or more names (tied / shared modules)."""

    __slots__ = ("names", "owners", "is_param", "tensor")

    def __init__(self, tensor: torch.Tensor, is_param: bool):
        self.names: list[str] = []
        self.owners: list[tuple[nn.Module, str]] = []
        self.is_param, self.tensor = is_param, tensor


def _module_slots(module: nn.Module) -> tuple[list[_Slot], list[tuple[str, nn.Module, str]]]:
    """Parameters + persistent buffers grouped by tensor identity, and the non-persistent buffers."""
    slots: dict[int, _Slot] = {}
    transient: list[tuple[str, nn.Module, str]] = []
    for prefix, sub in module.named_modules(remove_duplicate=False):
        dot = prefix + "." if prefix else ""
        for attr, param in sub._parameters.items():
            if param is not None:
                slot = slots.setdefault(id(param), _Slot(param, True))
                slot.names.append(dot + attr)
                slot.owners.append((sub, attr))
        for attr, buf in sub._buffers.items():
            if buf is None:
                continue
            if attr in sub._non_persistent_buffers_set:
                transient.append((dot + attr, sub, attr))
                continue
            slot = slots.setdefault(id(buf), _Slot(buf, False))
            slot.names.append(dot + attr)
            slot.owners.append((sub, attr))
    return list(slots.values()), transient


def _listing(names: Iterable[str], limit: int = 10) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" ... and {len(names) - limit} more" if len(names) > limit else "")


def load_weights(module: nn.Module, model_dir, *, dtype, device,
                 skip_unused: Iterable[str] = (), skip: Iterable[str] | None = None,
                 dtype_for: Callable[[str], torch.dtype | None] | None = None,
                 allow_meta_buffers: bool = False) -> None:
    """Load every parameter and persistent buffer of `module` from the checkpoint in `model_dir`.

    dtype:       target dtype of floating tensors (torch.dtype or name); None keeps each module
                 tensor's own dtype.  Integer tensors keep their stored dtype.
    device:      target device; tensors are converted there one by one.
    skip_unused: regexes (re.search) of checkpoint tensors the module does not have and may ignore,
                 e.g. unused_vision_patterns(n).  `skip` is an alias (architecture.md's name).
    dtype_for:   optional name -> dtype override (return None for the default), e.g. keep norms in fp32.
    allow_meta_buffers: leave non-persistent buffers that are still on the meta device (the caller
                 will build them); otherwise they raise CheckpointError.
    Errors (CheckpointError, raised before anything is assigned): missing tensors, unexpected
    tensors, shape mismatches, unreadable files.  Loaded parameters have requires_grad=False.
    """
    dtype = None if dtype is None else parse_dtype(dtype)
    device = torch.device(device)
    patterns = [re.compile(p) for p in (*skip_unused, *(skip or ()))]
    folder = Path(model_dir)
    files = checkpoint_files(folder)

    handles = {file: _open(file) for file in sorted(set(files.values()))}
    present = {file: set(h.keys()) for file, h in handles.items()}
    for name, file in files.items():
        if name not in present[file]:
            raise CheckpointError(f"{INDEX_FILE} maps tensor {name} to {file.name}, which does not contain it")

    slots, transient = _module_slots(module)
    module_names = {n for slot in slots for n in slot.names}

    # --- validate everything first: the module stays untouched when the checkpoint does not fit ---
    missing: list[str] = []
    mismatched: list[str] = []
    chosen: list[tuple[_Slot, str]] = []  # (slot, checkpoint name to load it from)
    for slot in slots:
        found = [n for n in slot.names if n in files]
        if not found:
            missing.append(slot.names[0])
            continue
        for n in found:
            stored = tuple(handles[files[n]].get_slice(n).get_shape())
            if stored != tuple(slot.tensor.shape):
                mismatched.append(f"{n}: checkpoint {list(stored)} vs module {list(slot.tensor.shape)}")
        chosen.append((slot, found[0]))
    unexpected = [n for n in files if n not in module_names and not any(p.search(n) for p in patterns)]

    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing from the checkpoint: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s) in the checkpoint: {_listing(sorted(unexpected))}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_listing(mismatched)}")
    if problems:
        raise CheckpointError(f"checkpoint {folder} does not fit the model: " + "; ".join(problems))

    # --- load: one tensor at a time, straight from the mapping to dtype/device ---
    for slot, name in chosen:
        stored = handles[files[name]].get_tensor(name)  # backed by the file mapping, not copied
        target = stored.dtype
        if stored.is_floating_point():
            override = dtype_for(name) if dtype_for is not None else None
            target = override or dtype or slot.tensor.dtype
        # A no-op (same tensor) when dtype and device already match: zero copies.
        value = stored.to(device=device, dtype=target)
        new = nn.Parameter(value, requires_grad=False) if slot.is_param else value
        for owner, attr in slot.owners:
            if slot.is_param:
                owner._parameters[attr] = new
            else:
                owner._buffers[attr] = new

    # --- non-persistent buffers (rope tables ...): follow the device, never left on meta silently ---
    still_meta = []
    for full_name, owner, attr in transient:
        buf = owner._buffers[attr]
        if buf.is_meta:
            still_meta.append(full_name)
        elif buf.device != device:
            owner._buffers[attr] = buf.to(device)
    if still_meta and not allow_meta_buffers:
        raise CheckpointError(
            f"non-persistent buffer(s) still on the meta device after loading: {_listing(still_meta)}; "
            "create them outside the meta context or after loading (allow_meta_buffers=True)")
    leftover = [n for n, t in module.named_parameters(remove_duplicate=False) if t.is_meta]
    leftover += [n for n, t in module.named_buffers(remove_duplicate=False)
                 if t.is_meta and n not in still_meta]
    if leftover:  # cannot happen after the checks above; kept as a guard for exotic modules
        raise CheckpointError(f"tensor(s) left on the meta device after loading: {_listing(leftover)}")
