"""Random checkpoints in the official Phi-3-vision layout, for tests and benchmarks.

`make_tiny_checkpoint(path)` writes a folder that looks exactly like a (shrunk) hub snapshot of
microsoft/Phi-3-vision-128k-instruct or microsoft/Phi-3.5-vision-instruct:

    config.json                  every key of the real file (spec §1.1 / §1.2) + `vision_config`
    generation_config.json       derived from config.json, as transformers does
    preprocessor_config.json     num_crops, CLIP mean/std
    tokenizer.json, tokenizer_config.json, special_tokens_map.json   the real tokenizer files
    model.safetensors            or model-0000K-of-0000N.safetensors + model.safetensors.index.json

The tensors have exactly the real names (spec §2) with shapes scaled to the requested sizes.
Weights are N(0, std) drawn with a torch.Generator seeded per tensor from (seed, tensor name), so
a tensor's values depend neither on the order of writing nor on the sharding.

Standard deviations follow the golden tiny models (tests/golden/README.md, "Tiny models"). Matrix
weights use std = gain / sqrt(fan_in), with the gain chosen so the golden sizes (hidden 128,
intermediate 256, vision hidden 64, vision intermediate 128) get exactly the golden stds; other
sizes keep the same activation scale, so logits stay O(10) and greedy margins stay clear at any
size (including `sizes="full"`, the real 4.1B-parameter shapes, used by benchmarks).
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import math
import zlib
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors.torch import save_file

from .engine.config import CLIP_MEAN, CLIP_STD

STYLES = ("phi3v", "phi35v")

# Real rope_scaling factor lists (spec Appendix A: Phi-3-vision-128k-instruct, Appendix B:
# Phi-3.5-vision-instruct), 48 entries each = head_dim 96 / 2.  Index i pairs with frequency i.
REAL_ROPE_FACTORS = {
    "phi3v": {
        "short_factor": [
            1.05, 1.05, 1.05, 1.1, 1.1, 1.1,
            1.2500000000000002, 1.2500000000000002, 1.4000000000000004, 1.4500000000000004, 1.5500000000000005, 1.8500000000000008,
            1.9000000000000008, 2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001,
            2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001,
            2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001,
            2.000000000000001, 2.000000000000001, 2.1000000000000005, 2.1000000000000005, 2.2, 2.3499999999999996,
            2.3499999999999996, 2.3499999999999996, 2.3499999999999996, 2.3999999999999995, 2.3999999999999995, 2.6499999999999986,
            2.6999999999999984, 2.8999999999999977, 2.9499999999999975, 3.049999999999997, 3.049999999999997, 3.049999999999997,
        ],
        "long_factor": [
            1.0299999713897705, 1.0499999523162842, 1.0499999523162842, 1.0799999237060547, 1.2299998998641968, 1.2299998998641968,
            1.2999999523162842, 1.4499999284744263, 1.5999999046325684, 1.6499998569488525, 1.8999998569488525, 2.859999895095825,
            3.68999981880188, 5.419999599456787, 5.489999771118164, 5.489999771118164, 9.09000015258789, 11.579999923706055,
            15.65999984741211, 15.769999504089355, 15.789999961853027, 18.360000610351562, 21.989999771118164, 23.079999923706055,
            30.009998321533203, 32.35000228881836, 32.590003967285156, 35.56000518798828, 39.95000457763672, 53.840003967285156,
            56.20000457763672, 57.95000457763672, 59.29000473022461, 59.77000427246094, 59.920005798339844, 61.190006256103516,
            61.96000671386719, 62.50000762939453, 63.3700065612793, 63.48000717163086, 63.48000717163086, 63.66000747680664,
            63.850006103515625, 64.08000946044922, 64.760009765625, 64.80001068115234, 64.81001281738281, 64.81001281738281,
        ],
    },
    "phi35v": {
        "short_factor": [
            1.08, 1.1, 1.1300000000000001, 1.2800000000000002, 1.3100000000000003, 1.4500000000000004,
            1.4500000000000004, 1.9500000000000008, 2.030000000000001, 2.4299999999999926, 2.5699999999999896, 2.9499999999999815,
            3.729999999999965, 3.869999999999962, 4.189999999999955, 4.43999999999995, 4.6399999999999455, 4.979999999999938,
            5.159999999999934, 5.279999999999932, 5.759999999999922, 5.889999999999919, 5.889999999999919, 5.969999999999917,
            6.089999999999915, 6.2799999999999105, 6.7699999999999, 6.8899999999998975, 7.109999999999893, 7.129999999999892,
            7.179999999999891, 7.289999999999889, 7.339999999999888, 7.559999999999883, 7.619999999999882, 7.69999999999988,
            7.879999999999876, 7.879999999999876, 7.879999999999876, 7.939999999999875, 7.949999999999875, 7.979999999999874,
            8.19999999999987, 8.439999999999864, 8.469999999999864, 8.589999999999861, 8.809999999999857, 8.999999999999853,
        ],
        "long_factor": [
            1.0800000429153442, 1.1100000143051147, 1.1399999856948853, 1.340000033378601, 1.5899999141693115, 1.600000023841858,
            1.6200000047683716, 2.620000123977661, 3.2300000190734863, 3.2300000190734863, 4.789999961853027, 7.400000095367432,
            7.700000286102295, 9.09000015258789, 12.199999809265137, 17.670000076293945, 24.46000099182129, 28.57000160217285,
            30.420001983642578, 30.840002059936523, 32.590003967285156, 32.93000411987305, 42.320003509521484, 44.96000289916992,
            50.340003967285156, 50.45000457763672, 57.55000305175781, 57.93000411987305, 58.21000289916992, 60.1400032043457,
            62.61000442504883, 62.62000274658203, 62.71000289916992, 63.1400032043457, 63.1400032043457, 63.77000427246094,
            63.93000411987305, 63.96000289916992, 63.970001220703125, 64.02999877929688, 64.06999969482422, 64.08000183105469,
            64.12000274658203, 64.41000366210938, 64.4800033569336, 64.51000213623047, 64.52999877929688, 64.83999633789062,
        ],
    },
}

# CLIP ViT-L/14 @ 336, hard-coded by the real models (their config.json has no vision section).
_REAL_VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                "num_attention_heads": 16}
_IMAGE_SIZE, _PATCH_SIZE = 336, 14
_REAL_NUM_CROPS = {"phi3v": 16, "phi35v": 4}
_NAME_OR_PATH = {"phi3v": ("Phi-3-vision-128k-instruct", "tiny-phi3v"),
                 "phi35v": ("Phi-3.5-vision-instruct", "tiny-phi35v")}


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"unknown checkpoint style {style!r}; expected one of {STYLES}")


def full_size_config(style: str = "phi3v") -> dict:
    """The real config.json of the model (spec §1.1 for "phi3v", §1.2 for "phi35v"), as a fresh dict.

    Keys are in the order of the real file (alphabetical, `_attn_implementation` last).
    """
    _check_style(style)
    cfg: dict = {
        "_name_or_path": _NAME_OR_PATH[style][0],
        "architectures": ["Phi3VForCausalLM"],
        "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_phi3_v.Phi3VConfig",
                     "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM"},
        "bos_token_id": 1,
        "embd_layer": {"embedding_cls": "image", "hd_transform_order": "sub_glb",
                       "projection_cls": "mlp", "use_hd_transform": True,
                       "with_learnable_separator": True},
    }
    if style == "phi35v":
        cfg["embd_pdrop"] = 0.0
    cfg.update({
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 3072,
        "img_processor": {"image_dim_out": 1024, "model_name": "openai/clip-vit-large-patch14-336",
                          "name": "clip_vision_model", "num_img_tokens": 144},
        "initializer_range": 0.02,
        "intermediate_size": 8192,
        "max_position_embeddings": 131072,
        "model_type": "phi3_v",
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 32,
        "original_max_position_embeddings": 4096,
    })
    if style == "phi35v":
        cfg["pad_token_id"] = 32000
        cfg["resid_pdrop"] = 0.0
    factors = REAL_ROPE_FACTORS[style]
    cfg.update({
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"long_factor": list(factors["long_factor"]),
                         "short_factor": list(factors["short_factor"]), "type": "su"},
        "rope_theta": 10000.0,
        "sliding_window": 131072 if style == "phi3v" else 262144,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.38.1",
        "use_cache": True,
        "vocab_size": 32064,
        "_attn_implementation": "flash_attention_2",
    })
    return cfg


def subsample_factors(factors: list[float], n: int) -> list[float]:
    """n entries of a 48-entry factor list, evenly spread and keeping both ends.

    Entry i is factors[round(i * 47 / (n - 1))]; for n = 16 these are 0,3,6,9,13,...,44,47,
    the entries the golden tiny models use.
    """
    last = len(factors) - 1
    if n == 1:
        return [factors[0]]
    return [factors[math.floor(i * last / (n - 1) + 0.5)] for i in range(n)]


def tiny_config(style: str = "phi3v", *, hidden_size: int = 64, intermediate_size: int = 128,
                num_layers: int = 2, num_heads: int = 4, vision_hidden: int = 32,
                vision_layers: int = 2, vision_heads: int = 2, vision_intermediate: int = 64,
                dtype: torch.dtype = torch.bfloat16,
                original_max_position_embeddings: int | None = None) -> dict:
    """config.json of a tiny model: the real config with the sizes replaced, plus `vision_config`.

    original_max_position_embeddings: where the long RoPE factors take over (the real 4096 when
    None). A small value (e.g. 256) lets tests cross that boundary with a few hundred tokens.
    """
    _check_style(style)
    for label, value in [("hidden_size", hidden_size), ("intermediate_size", intermediate_size),
                         ("num_layers", num_layers), ("num_heads", num_heads),
                         ("vision_hidden", vision_hidden), ("vision_layers", vision_layers),
                         ("vision_heads", vision_heads), ("vision_intermediate", vision_intermediate)]:
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive int, got {value!r}")
    if original_max_position_embeddings is not None:
        limit = full_size_config(style)["max_position_embeddings"]
        value = original_max_position_embeddings
        if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= limit:
            raise ValueError(f"original_max_position_embeddings must be an int in 2..{limit}, got {value!r}")
    if hidden_size % num_heads or (hidden_size // num_heads) % 2:
        raise ValueError(f"hidden_size {hidden_size} must split into {num_heads} heads of even size")
    head_dim = hidden_size // num_heads
    if head_dim // 2 > 48:
        raise ValueError(f"head_dim {head_dim} needs more than the 48 real rope factors")
    if vision_hidden % vision_heads:
        raise ValueError(f"vision_hidden {vision_hidden} is not divisible by vision_heads {vision_heads}")

    cfg = full_size_config(style)
    cfg["_name_or_path"] = _NAME_OR_PATH[style][1]
    cfg["hidden_size"] = hidden_size
    cfg["intermediate_size"] = intermediate_size
    cfg["num_hidden_layers"] = num_layers
    cfg["num_attention_heads"] = num_heads
    cfg["num_key_value_heads"] = num_heads
    cfg["img_processor"]["image_dim_out"] = vision_hidden
    for key in ("long_factor", "short_factor"):
        cfg["rope_scaling"][key] = subsample_factors(REAL_ROPE_FACTORS[style][key], head_dim // 2)
    cfg["torch_dtype"] = _dtype_name(dtype)
    cfg["_attn_implementation"] = "eager"  # like the golden tiny models; only picks a kernel
    if original_max_position_embeddings is not None:
        cfg["original_max_position_embeddings"] = original_max_position_embeddings
    cfg["vision_config"] = {
        "model_type": "clip_vision_model",
        "hidden_size": vision_hidden,
        "intermediate_size": vision_intermediate,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": vision_heads,
        "num_channels": 3,
        "image_size": _IMAGE_SIZE,
        "patch_size": _PATCH_SIZE,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-05,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "projection_dim": 768,
    }
    return cfg


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------
# Tensor list and initialisation
# ---------------------------------------------------------------------------------------------

# role -> (std at the golden tiny size, fan_in at that size or None for "do not scale").
# Golden sizes: hidden 128, intermediate 256, vision hidden 64, vision intermediate 128.
_ROLE_STD: dict[str, tuple[float, int | None]] = {
    "embed_tokens": (1.0, None),
    "lm_head": (0.4, 128),
    "qkv_proj": (0.1, 128),
    "o_proj": (0.08, 128),
    "gate_up_proj": (0.1, 128),
    "down_proj": (0.07, 256),
    "rms_norm": (0.1, None),            # weight = 1 + std * N(0, 1)
    "class_embedding": (0.5, None),
    "patch_embedding": (0.05, None),
    "position_embedding": (0.3, None),
    "layer_norm": (0.1, None),          # weight = 1 + std * N(0, 1)
    "bias": (0.05, None),
    "q_proj": (0.12, 64),
    "k_proj": (0.12, 64),
    "v_proj": (0.1, 64),
    "out_proj": (0.09, 64),
    "fc1": (0.1, 64),
    "fc2": (0.09, 128),
    "img_projection.0": (0.06, 256),
    "img_projection.2": (0.09, 128),
    "separator": (1.0, None),           # glb_GN, sub_GN
}
STD_ROLES = tuple(_ROLE_STD)
_ONE_PLUS_ROLES = ("rms_norm", "layer_norm")  # initialised around 1, not 0


class TensorSpec:
    """One checkpoint tensor: its real name, shape and how to draw it."""

    __slots__ = ("name", "shape", "role", "fan_in")

    def __init__(self, name: str, shape: tuple[int, ...], role: str, fan_in: int | None = None):
        self.name, self.shape, self.role, self.fan_in = name, tuple(shape), role, fan_in

    def numel(self) -> int:
        return math.prod(self.shape)

    def __repr__(self) -> str:
        return f"TensorSpec({self.name!r}, {self.shape}, {self.role!r})"


def _vision_sizes(config: dict) -> dict:
    vc = config.get("vision_config")
    if vc is None:
        return dict(_REAL_VISION, image_size=_IMAGE_SIZE, patch_size=_PATCH_SIZE)
    return {k: vc[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "image_size", "patch_size")}


def tensor_specs(config: dict) -> list[TensorSpec]:
    """Every tensor of a checkpoint with this config.json, in the order of the real index
    (embed_tokens, the vision part, decoder layers, final norm, lm_head).  Spec §2."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    vocab, n_layers = config["vocab_size"], config["num_hidden_layers"]
    n_heads = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_heads
    head_dim = h // n_heads
    vis = _vision_sizes(config)
    vh, vi = vis["hidden_size"], vis["intermediate_size"]
    positions = (vis["image_size"] // vis["patch_size"]) ** 2 + 1  # patches + CLS = 577
    merged = 4 * vh  # 2x2 patch merge width, the projector input

    specs = [TensorSpec("model.embed_tokens.weight", (vocab, h), "embed_tokens")]
    v = "model.vision_embed_tokens."
    specs += [
        TensorSpec(v + "glb_GN", (1, 1, merged), "separator"),
        TensorSpec(v + "sub_GN", (1, 1, 1, merged), "separator"),
        TensorSpec(v + "img_projection.0.weight", (h, merged), "img_projection.0", merged),
        TensorSpec(v + "img_projection.0.bias", (h,), "bias"),
        TensorSpec(v + "img_projection.2.weight", (h, h), "img_projection.2", h),
        TensorSpec(v + "img_projection.2.bias", (h,), "bias"),
    ]
    c = v + "img_processor.vision_model."
    specs += [
        TensorSpec(c + "embeddings.class_embedding", (vh,), "class_embedding"),
        TensorSpec(c + "embeddings.patch_embedding.weight", (vh, 3, vis["patch_size"], vis["patch_size"]),
                   "patch_embedding"),  # Conv2d without bias
        TensorSpec(c + "embeddings.position_embedding.weight", (positions, vh), "position_embedding"),
        TensorSpec(c + "pre_layrnorm.weight", (vh,), "layer_norm"),  # (sic) "layrnorm"
        TensorSpec(c + "pre_layrnorm.bias", (vh,), "bias"),
    ]
    for i in range(vis["num_hidden_layers"]):
        p = f"{c}encoder.layers.{i}."
        specs += [TensorSpec(p + "layer_norm1.weight", (vh,), "layer_norm"),
                  TensorSpec(p + "layer_norm1.bias", (vh,), "bias")]
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            specs += [TensorSpec(f"{p}self_attn.{proj}.weight", (vh, vh), proj, vh),
                      TensorSpec(f"{p}self_attn.{proj}.bias", (vh,), "bias")]
        specs += [TensorSpec(p + "layer_norm2.weight", (vh,), "layer_norm"),
                  TensorSpec(p + "layer_norm2.bias", (vh,), "bias"),
                  TensorSpec(p + "mlp.fc1.weight", (vi, vh), "fc1", vh),
                  TensorSpec(p + "mlp.fc1.bias", (vi,), "bias"),
                  TensorSpec(p + "mlp.fc2.weight", (vh, vi), "fc2", vi),
                  TensorSpec(p + "mlp.fc2.bias", (vh,), "bias")]
    # Unused by Phi-3-V (features come from the penultimate layer) but present in the real files.
    specs += [TensorSpec(c + "post_layernorm.weight", (vh,), "layer_norm"),
              TensorSpec(c + "post_layernorm.bias", (vh,), "bias")]
    qkv_rows = (n_heads + 2 * n_kv) * head_dim  # Q rows, then K, then V
    for i in range(n_layers):
        p = f"model.layers.{i}."
        specs += [
            TensorSpec(p + "input_layernorm.weight", (h,), "rms_norm"),
            TensorSpec(p + "self_attn.qkv_proj.weight", (qkv_rows, h), "qkv_proj", h),
            TensorSpec(p + "self_attn.o_proj.weight", (h, n_heads * head_dim), "o_proj", n_heads * head_dim),
            TensorSpec(p + "post_attention_layernorm.weight", (h,), "rms_norm"),
            TensorSpec(p + "mlp.gate_up_proj.weight", (2 * inter, h), "gate_up_proj", h),  # gate, then up
            TensorSpec(p + "mlp.down_proj.weight", (h, inter), "down_proj", inter),
        ]
    specs += [TensorSpec("model.norm.weight", (h,), "rms_norm"),
              TensorSpec("lm_head.weight", (vocab, h), "lm_head", h)]  # untied from embed_tokens
    return specs


def role_std(spec: TensorSpec, overrides: Mapping[str, float] | None = None) -> float:
    """Standard deviation used for a tensor: an override for its role (absolute), else the golden
    std rescaled by sqrt(golden fan_in / fan_in) for matrix weights."""
    if overrides and spec.role in overrides:
        return float(overrides[spec.role])
    std, ref_fan_in = _ROLE_STD[spec.role]
    if ref_fan_in is not None and spec.fan_in:
        std *= math.sqrt(ref_fan_in / spec.fan_in)
    return std


def tensor_seed(seed: int, name: str) -> int:
    """Seed of one tensor's generator: a function of (seed, name) only."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def random_tensor(spec: TensorSpec, *, seed: int, dtype: torch.dtype,
                  std: Mapping[str, float] | None = None) -> torch.Tensor:
    """Draw one tensor (float32 normal, then rounded once to `dtype`)."""
    gen = torch.Generator().manual_seed(tensor_seed(seed, spec.name))
    t = torch.randn(spec.shape, generator=gen, dtype=torch.float32)
    t.mul_(role_std(spec, std))
    if spec.role in _ONE_PLUS_ROLES:
        t.add_(1.0)
    return t.to(dtype)


def _split_into_shards(specs: list[TensorSpec], shards: int, itemsize: int) -> list[list[TensorSpec]]:
    """Consecutive groups of roughly equal byte size; every group non-empty."""
    if shards > len(specs):
        raise ValueError(f"cannot split {len(specs)} tensors into {shards} shards")
    total = sum(s.numel() for s in specs) * itemsize
    groups: list[list[TensorSpec]] = [[]]
    before = 0  # bytes of all tensors placed so far
    for i, spec in enumerate(specs):
        left_tensors, left_groups = len(specs) - i, shards - len(groups)
        if groups[-1] and left_groups > 0 and (
                before >= total * len(groups) / shards or left_tensors == left_groups):
            groups.append([])
        groups[-1].append(spec)
        before += spec.numel() * itemsize
    return groups


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _copy_tokenizer(dest: Path, style: str) -> None:
    assets = importlib.resources.files("phi3v") / "assets" / "tokenizer"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        data = (assets / name).read_bytes()
        if style == "phi35v" and name == "tokenizer_config.json":
            # The Phi-3.5-vision copy adds these two keys (spec §1.7); nothing else differs.
            tok_cfg = json.loads(data)
            tok_cfg["processor_class"] = "Phi3VProcessor"
            tok_cfg["auto_map"] = {"AutoProcessor": "processing_phi3_v.Phi3VProcessor"}
            data = (json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n").encode()
        (dest / name).write_bytes(data)


def _preprocessor_config(style: str, num_crops: int) -> dict:
    image_module = "image_processing_phi3_v" if style == "phi3v" else "processing_phi3_v"
    return {
        "auto_map": {"AutoProcessor": "processing_phi3_v.Phi3VProcessor",
                     "AutoImageProcessor": f"{image_module}.Phi3VImageProcessor"},
        "num_crops": num_crops,
        "image_mean": list(CLIP_MEAN),
        "image_processor_type": "Phi3VImageProcessor",
        "image_std": list(CLIP_STD),
        "processor_class": "Phi3VProcessor",
        "num_img_tokens": 144,
    }


def _generation_config(config: dict) -> dict:
    # What transformers derives from config.json (the real files are unknown, spec §14).
    gen = {"_from_model_config": True, "bos_token_id": config["bos_token_id"],
           "eos_token_id": config["eos_token_id"]}
    if "pad_token_id" in config:
        gen["pad_token_id"] = config["pad_token_id"]
    gen["transformers_version"] = "4.43.4"
    return gen


def _shard_tensors(specs: list[TensorSpec], seed: int, dtype: torch.dtype,
                   std: Mapping[str, float] | None) -> Iterator[tuple[str, torch.Tensor]]:
    for spec in specs:
        yield spec.name, random_tensor(spec, seed=seed, dtype=dtype, std=std)


def make_tiny_checkpoint(path, *, style: str = "phi3v", seed: int = 0, sizes: str = "tiny",
                         hidden_size: int = 64, intermediate_size: int = 128, num_layers: int = 2,
                         num_heads: int = 4, vision_hidden: int = 32, vision_layers: int = 2,
                         vision_heads: int = 2, vision_intermediate: int = 64,
                         num_crops: int | None = None, shards: int | None = None,
                         dtype: torch.dtype = torch.bfloat16,
                         std: Mapping[str, float] | None = None,
                         original_max_position_embeddings: int | None = None) -> Path:
    """Write a random checkpoint folder in the official layout and return its path.

    style:   "phi3v" (Phi-3-vision-128k-instruct) or "phi35v" (Phi-3.5-vision-instruct): config
             values, rope factors, generation/preprocessor configs of that model.
    sizes:   "tiny" uses the size arguments; "full" writes the real shapes (4.1B parameters, the
             real config.json without `vision_config`) and ignores them.  Full size is for
             benchmarks only: ~8.3 GB in bf16, written one shard at a time.
    num_crops: preprocessor_config.json's num_crops (default 4 for tiny, the real value for full).
    shards:  number of safetensors files (default 1 for tiny, 2 for full like the real files);
             more than 1 also writes model.safetensors.index.json.
    dtype:   storage dtype of every tensor (the real files are bfloat16).
    std:     per-role absolute std overrides, roles in STD_ROLES.
    original_max_position_embeddings: tiny only; the long/short RoPE boundary (None: the real
             4096). Tests use a small one (e.g. 256) to cross it with a few hundred tokens.
    """
    _check_style(style)
    if sizes not in ("tiny", "full"):
        raise ValueError(f"sizes must be 'tiny' or 'full', got {sizes!r}")
    if std:
        unknown = sorted(set(std) - set(STD_ROLES))
        if unknown:
            raise ValueError(f"unknown std roles {unknown}; known roles: {', '.join(STD_ROLES)}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    if sizes == "full":
        config = full_size_config(style)
        config["torch_dtype"] = _dtype_name(dtype)
        num_crops = _REAL_NUM_CROPS[style] if num_crops is None else num_crops
        shards = 2 if shards is None else shards
    else:
        config = tiny_config(style, hidden_size=hidden_size, intermediate_size=intermediate_size,
                             num_layers=num_layers, num_heads=num_heads, vision_hidden=vision_hidden,
                             vision_layers=vision_layers, vision_heads=vision_heads,
                             vision_intermediate=vision_intermediate, dtype=dtype,
                             original_max_position_embeddings=original_max_position_embeddings)
        num_crops = 4 if num_crops is None else num_crops
        shards = 1 if shards is None else shards
    if not isinstance(num_crops, int) or num_crops < 1:
        raise ValueError(f"num_crops must be a positive int, got {num_crops!r}")
    if not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards must be a positive int, got {shards!r}")

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", _generation_config(config))
    _write_json(out / "preprocessor_config.json", _preprocessor_config(style, num_crops))
    _copy_tokenizer(out, style)

    specs = tensor_specs(config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    metadata = {"format": "pt"}
    if shards == 1:
        save_file(dict(_shard_tensors(specs, seed, dtype, std)), str(out / "model.safetensors"),
                  metadata=metadata)
        return out

    weight_map: dict[str, str] = {}
    for k, group in enumerate(_split_into_shards(specs, shards, itemsize), start=1):
        file_name = f"model-{k:05d}-of-{shards:05d}.safetensors"
        # Only one shard's tensors are alive at a time: memory stays ~ one shard.
        save_file(dict(_shard_tensors(group, seed, dtype, std)), str(out / file_name),
                  metadata=metadata)
        weight_map.update({spec.name: file_name for spec in group})
    total_size = sum(spec.numel() for spec in specs) * itemsize
    _write_json(out / "model.safetensors.index.json",
                {"metadata": {"total_size": total_size},
                 "weight_map": dict(sorted(weight_map.items()))})
    return out
