"""One loader: model name -> folder -> config, tokenizer -> module with its weights, ready to run.

    loaded = load_engine("microsoft/Phi-3-vision-128k-instruct", device="cpu", quantize="int4")
    loaded.module, loaded.config, loaded.tokenizer, loaded.model_dir

Steps, each done once:
  1. device and dtype parsed (engine.devices);
  2. the folder resolved (engine.hub: a local folder, or a hub id through the cache / a download),
     unless the caller resolved it already and passes `model_dir`;
  3. config.json and the tokenizer read;
  4. the module built on the meta device (no memory; its LongRoPE tables, which are not in the
     checkpoint, are computed on the CPU even there: decoder.LongRoPE);
  5. the weights filled in: float (engine.weights, memory-mapped) or quantized (quant.checkpoint,
     which quantizes a float checkpoint while loading or reads a quantized one); the RoPE tables
     follow to the device;
  6. on the CPU, the native decode kernels built or found in their cache (kernels.native), so the
     first request does not pay for a compile.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import Phi3VError
from ..kernels import native, ops
from ..quant.checkpoint import load_quantized_weights, resolve_scheme
from .config import ROPE_SWITCH_POLICIES, Phi3VConfig
from .devices import resolve_device, resolve_dtype
from .hub import resolve_model_dir
from .model import Phi3VForCausalLM, meta_module
from .tokenizer import Tokenizer
from .vision import unused_vision_keys
from .weights import load_weights


@dataclass
class LoadedModel:
    module: Phi3VForCausalLM  # in eval mode, on the chosen device; `.quantization` set when quantized
    config: Phi3VConfig
    tokenizer: Tokenizer
    model_dir: Path  # the resolved folder the files were read from


def load_engine(model: str | os.PathLike, *, device: str | torch.device = "auto", dtype=None,
                revision: str | None = None, progress: bool = True, quantize=None,
                rope_switch: str | None = None, model_dir: str | os.PathLike | None = None) -> LoadedModel:
    """Load a checkpoint folder or hub id (see the module docstring for the steps).

    dtype:       None/"auto" = bfloat16 (float32 on MPS), or a name engine.devices accepts.
    quantize:    None | "int8" | "int4" | "int4:GROUP" | "w8a8" (quant.layers.QuantConfig.parse); a quantized
                 checkpoint loads quantized without it.
    rope_switch: None = the model family's reference policy, or one of ROPE_SWITCH_POLICIES.
    model_dir:   the folder `model` already resolved to (a caller that showed a download's progress
                 itself); skips the resolution.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if rope_switch is not None and rope_switch not in ROPE_SWITCH_POLICIES:
        raise Phi3VError(f"rope_switch must be one of {', '.join(ROPE_SWITCH_POLICIES)}, got {rope_switch!r}")
    if model_dir is None:  # str: a Path-like hub id resolves as before (PathLike means "a folder" there)
        model_dir = resolve_model_dir(str(model), progress=progress, revision=revision)
    folder = Path(model_dir)
    cfg = Phi3VConfig.from_dir(folder)
    if rope_switch is not None:
        cfg.rope_switch = rope_switch
    tokenizer = Tokenizer.from_dir(folder)
    scheme = resolve_scheme(cfg, quantize)  # None = a float model

    module = meta_module(cfg)
    if scheme is None:
        load_weights(module, folder, dtype=dt, device=dev, skip_unused=unused_vision_keys(cfg.vision))
    else:
        load_quantized_weights(module, cfg, folder, scheme, dtype=dt, device=dev)
    module.eval()
    if dev.type == "cpu":
        native.prepare()  # build or find the decode kernels now, not in the first request
        ops.warm_up()  # and torch's custom-operator dispatch, which the first call would load
    return LoadedModel(module, cfg, tokenizer, folder)
