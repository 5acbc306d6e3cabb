"""Model facts from a config alone, no weights: parameters, weight and KV-cache bytes, context, image tokens.

    facts = model_facts(Phi3VConfig.from_dir(folder))      # or published_config() for the real models
    facts.parameters            {"decoder", "vision", "projector", "total"} as the checkpoint stores them
    facts.weight_bytes("bfloat16"), facts.weight_bytes("bfloat16", quantize="int4")
    facts.kv_cache_bytes_per_token("bfloat16"), facts.context_length
    facts.image_tokens(640, 480, num_crops=16), facts.crop_grid(640, 480, 16)

Every count comes from the module itself, built on the meta device (shapes only, no memory, well
under a second for the full-size model), so it cannot drift from what the loader builds.  The
checkpoint also stores CLIP layers that phi3v never runs (features come from the second-to-last
layer: the last layer and post_layernorm are skipped at load, spec §4); `parameters` counts them
like the checkpoint and the model card do (4,146,621,440 for both real models, spec §0), and
`loaded_parameters` is what a loaded model holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..quant.layers import QuantConfig, new_quantized_linear, target_linear_names
from .config import Phi3VConfig
from .decoder import RMSNorm
from .devices import dtype_bytes, parse_dtype
from .image import crop_grid, num_image_tokens
from .model import meta_module
from .vision import ClipLayer

# Where the parts of Phi3VForCausalLM live (parameter name prefixes; the rest is the decoder).
VISION_PREFIX = "model.vision_embed_tokens.img_processor."  # the CLIP tower
PROJECTOR_PREFIX = "model.vision_embed_tokens."  # img_projection, glb_GN, sub_GN (outside the tower)

# Numbers of the published checkpoints (spec §1.1, §1.5), for when no config file is at hand.
PUBLISHED_CONTEXT = 131072
PUBLISHED_NUM_CROPS = {"microsoft/Phi-3-vision-128k-instruct": 16, "microsoft/Phi-3.5-vision-instruct": 4}


def published_config(model: str | None = None) -> Phi3VConfig:
    """The real models' configuration: the config dataclasses' defaults are the reference's sizes
    (decoder 3072 x 32 layers, CLIP ViT-L/14-336), plus the values config.json and
    preprocessor_config.json set explicitly (context 131072; num_crops by model, else 16)."""
    raw = {"model_type": "phi3_v", "max_position_embeddings": PUBLISHED_CONTEXT}
    return Phi3VConfig.from_dicts(raw, {"num_crops": PUBLISHED_NUM_CROPS.get(model or "", 16)})


@dataclass(frozen=True)
class ModelFacts:
    config: Phi3VConfig = field(repr=False)
    parameters: dict[str, int]  # decoder, vision, projector, total: the checkpoint's tensors
    loaded_parameters: int  # the module's (without the CLIP layers past the feature layer)
    float_tensors: dict[str, tuple[int, ...]] = field(repr=False)  # parameter name -> shape
    decoder_linears: tuple[str, ...] = field(repr=False)  # module names of the layers int8/int4 replace
    decoder_linear_params: int  # qkv/o/gate_up/down weights of every layer: what int8/int4 replace
    decoder_linear_rows: int  # their output rows
    lm_head_params: int
    norm_params: int  # the decoder's RMSNorm weights (2 per layer + the final one)

    @property
    def context_length(self) -> int:
        return self.config.text.max_position_embeddings

    @property
    def default_num_crops(self) -> int:
        return self.config.preprocessor.num_crops

    def kv_cache_bytes_per_token(self, dtype) -> int:
        """Keys + values of every decoder layer for one position: 2 · layers · kv_heads · head_dim."""
        t = self.config.text
        return 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * dtype_bytes(dtype)

    def weight_bytes(self, dtype, quantize=None) -> int:
        """Bytes of every checkpoint tensor in `dtype`; with `quantize` ("int8", "int4", "int4:64"),
        the decoder linears as phi3v holds them quantized (int8: a byte per weight + a scale per
        row; int4: half a byte + a scale and a zero per group; scales and zeros in `dtype`)."""
        total = self.parameters["total"] * dtype_bytes(dtype)
        qc = QuantConfig.parse(quantize)
        if qc is not None:
            names = target_linear_names(meta_module(self.config), qc)  # + CLIP's when qc.vision
            total += self._quantized_bytes(names, qc, dtype) - self._float_bytes(names, dtype)
        return total

    def decode_weight_bytes(self, dtype, quantize=None) -> int:
        """Weight bytes one decode step reads: the decoder linears (quantized if asked), the norms
        and lm_head. The embedding table is only indexed and the vision side does not run."""
        float_part = (self.lm_head_params + self.norm_params) * dtype_bytes(dtype)
        qc = QuantConfig.parse(quantize)
        if qc is None:
            return float_part + self.decoder_linear_params * dtype_bytes(dtype)
        return float_part + self._quantized_bytes(self.decoder_linears, qc, dtype)

    def image_tokens(self, width: int, height: int, num_crops: int | None = None) -> int:
        """Placeholder tokens of a width x height image (engine.image.num_image_tokens)."""
        return num_image_tokens(width, height, num_crops or self.default_num_crops)

    def crop_grid(self, width: int, height: int, num_crops: int | None = None) -> tuple[int, int]:
        """(rows, cols) of 336-pixel crops of the image (engine.image.crop_grid)."""
        return crop_grid(width, height, num_crops or self.default_num_crops)

    # -- quantized sizes, from the quantized layers built on the meta device ---------------------
    def _float_bytes(self, names, dtype) -> int:
        """The float weights (and biases) of the linear layers `names`."""
        size = dtype_bytes(dtype)
        return sum(_numel(self.float_tensors[f"{name}.{suffix}"]) * size
                   for name in names for suffix in ("weight", "bias")
                   if f"{name}.{suffix}" in self.float_tensors)

    def _quantized_bytes(self, names, qc: QuantConfig, dtype) -> int:
        """The same layers quantized as `qc` says: every tensor of each quantized layer."""
        dt = parse_dtype(dtype)
        total = 0
        for name in names:
            out_f, in_f = self.float_tensors[f"{name}.weight"]
            layer = new_quantized_linear(qc, in_f, out_f, f"{name}.bias" in self.float_tensors,
                                         device="meta", dtype=dt)
            total += sum(t.numel() * t.element_size() for t in _tensors(layer))
        return total


def model_facts(cfg: Phi3VConfig) -> ModelFacts:
    """Count the module that the loader would build for `cfg` (on the meta device)."""
    module = meta_module(cfg)
    shapes = {name: tuple(t.shape) for name, t in module.named_parameters()}
    parts = {"decoder": 0, "vision": 0, "projector": 0}
    for name, shape in shapes.items():
        part = ("vision" if name.startswith(VISION_PREFIX) else
                "projector" if name.startswith(PROJECTOR_PREFIX) else "decoder")
        parts[part] += _numel(shape)
    loaded = sum(parts.values())
    parts["vision"] += _unused_clip_params(cfg)
    parts["total"] = sum(parts.values())

    decoder_linears = tuple(target_linear_names(module, QuantConfig("int8")))  # vision=False: decoder only
    linear_shapes = [shapes[f"{name}.weight"] for name in decoder_linears]
    return ModelFacts(
        config=cfg, parameters=parts, loaded_parameters=loaded, float_tensors=shapes,
        decoder_linears=decoder_linears,
        decoder_linear_params=sum(_numel(s) for s in linear_shapes),
        decoder_linear_rows=sum(s[0] for s in linear_shapes),
        lm_head_params=_numel(shapes["lm_head.weight"]),
        norm_params=sum(m.weight.numel() for m in module.modules() if isinstance(m, RMSNorm)),
    )


def _unused_clip_params(cfg: Phi3VConfig) -> int:
    """CLIP tensors in the checkpoint that the module does not build: the encoder layers past the
    feature layer and post_layernorm (weight + bias)."""
    v = cfg.vision
    with torch.device("meta"):
        per_layer = sum(p.numel() for p in ClipLayer(v).parameters())
    return (v.num_hidden_layers - v.layers_used) * per_layer + 2 * v.hidden_size


def _tensors(layer: nn.Module) -> list[torch.Tensor]:
    return [*layer.parameters(), *layer.buffers()]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
