"""Model configuration read from a checkpoint folder's json files (spec §1).

`Phi3VConfig.from_dir(path)` reads config.json, preprocessor_config.json and
generation_config.json. The real checkpoints hard-code the CLIP ViT-L/14-336 tower; the tiny test
checkpoints describe theirs under an extra `vision_config` key.

Defaults: each setting has one default, the dataclass field's, and `from_dicts` falls back to it
for a key missing from the json.  The values are those the reference config classes use for a
missing key (spec §1.3, §1.5), so a checkpoint loads as the reference would load it: for example
`max_position_embeddings` 4096 and `num_crops` 1.  The real checkpoints write their own values
(131072; 16 for Phi-3-vision, 4 for Phi-3.5-vision), and those win.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from ..errors import CheckpointError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# How the KV cache is treated when generation crosses original_max_position_embeddings (spec §7.4):
#  "mixed"     - Phi-3-vision reference: new tokens use long factors, cached keys keep short ones.
#  "recompute" - Phi-3.5-vision reference: drop the cache once and re-prefill everything with long
#                factors, so cached generation equals an uncached recomputation.
ROPE_SWITCH_POLICIES = ("mixed", "recompute")


@dataclass
class VisionConfig:
    """CLIP vision tower. Defaults = ViT-L/14 at 336 px, as hard-coded by the reference."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    layer_idx: int = -2  # hidden_states index used as features: -2 = output of the second-to-last layer

    @property
    def num_patches_per_side(self) -> int:  # 24
        return self.image_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def layers_used(self) -> int:
        """Encoder layers that must run: hidden_states[layer_idx] is the output of this many layers."""
        # hidden_states has num_hidden_layers + 1 entries (embeddings output first).
        return (self.num_hidden_layers + 1 + self.layer_idx) if self.layer_idx < 0 else self.layer_idx

    @classmethod
    def from_dict(cls, d: dict | None, layer_idx: int = -2) -> "VisionConfig":
        d = d or {}
        act = d.get("hidden_act", "quick_gelu")
        if act != "quick_gelu":
            raise CheckpointError(f"vision_config.hidden_act {act!r} is not supported (quick_gelu only)")
        keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "image_size", "patch_size", "num_channels", "layer_norm_eps")
        return cls(**{k: d[k] for k in keys if k in d}, layer_idx=layer_idx)


@dataclass
class TextConfig:
    """Phi-3-mini decoder. Defaults = the reference config class's (spec §1.3)."""

    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # The reference class default; every real config.json overrides it with 131072 (spec §1.1-1.3).
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096
    rope_short_factor: list[float] | None = None  # None => plain RoPE
    rope_long_factor: list[float] | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def uses_long_rope(self, seq_len: int) -> bool:
        """The 4096 rule (spec §7.3): a sequence of `seq_len` tokens (cached + new, i.e. its largest
        position + 1) is rotated with the long factors iff the model has them and seq_len exceeds
        original_max_position_embeddings. The one place this rule is written."""
        return self.rope_long_factor is not None and seq_len > self.original_max_position_embeddings

    @property
    def rope_mscale(self) -> float:
        """LongRoPE attention factor applied to cos and sin in both regimes (spec §7.2)."""
        ratio = self.max_position_embeddings / self.original_max_position_embeddings
        if self.rope_short_factor is None or ratio <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(ratio) / math.log(self.original_max_position_embeddings))


@dataclass
class PreprocessorConfig:
    """preprocessor_config.json. Defaults = the reference image processor's for a missing key
    (spec §1.5): num_crops 1 (the real files say 16 for Phi-3-vision, 4 for Phi-3.5-vision)."""

    num_crops: int = 1
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    num_img_tokens: int = 144


@dataclass
class Phi3VConfig:
    text: TextConfig
    vision: VisionConfig
    preprocessor: PreprocessorConfig
    image_dim_out: int = 1024  # CLIP width fed to the 2x2 merge
    family: str = "phi3v"  # "phi3v" (Phi-3-vision-128k) or "phi35v" (Phi-3.5-vision)
    rope_switch: str = "mixed"  # see ROPE_SWITCH_POLICIES; default follows the family's reference
    bos_token_id: int = 1
    stop_token_ids: tuple[int, ...] = (32007, 32000)  # <|end|>, <|endoftext|> (config's eos=2 is stale)
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dir(cls, path: str | Path) -> "Phi3VConfig":
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"{path} has no config.json: not a Phi-3-vision checkpoint folder")
        raw = _read_json(cfg_file)
        pre_file = path / "preprocessor_config.json"
        pre = _read_json(pre_file) if pre_file.is_file() else {}
        return cls.from_dicts(raw, pre)

    @classmethod
    def from_dicts(cls, raw: dict, pre: dict | None = None) -> "Phi3VConfig":
        pre = pre or {}
        model_type = raw.get("model_type")
        if model_type != "phi3_v":
            raise CheckpointError(
                f"config.json has model_type {model_type!r}; phi3v runs Phi-3-vision checkpoints ('phi3_v')"
            )
        embd = raw.get("embd_layer", {})
        if isinstance(embd, dict) and embd.get("hd_transform_order", "sub_glb") != "sub_glb":
            raise CheckpointError("only embd_layer.hd_transform_order 'sub_glb' is supported")
        text_defaults = _field_defaults(TextConfig)
        heads = raw.get("num_attention_heads", text_defaults["num_attention_heads"])
        rope = raw.get("rope_scaling")
        short = long = None
        if rope:
            kind = rope.get("type") or rope.get("rope_type")
            if kind not in ("su", "longrope"):
                raise CheckpointError(f"rope_scaling type {kind!r} is not supported (su/longrope only)")
            short, long = list(rope["short_factor"]), list(rope["long_factor"])
        # Keys absent from config.json keep the field defaults; a null num_key_value_heads means
        # "as many as the query heads" (the reference's rule, spec §1.3).
        plain = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "rms_norm_eps",
                 "rope_theta", "max_position_embeddings", "original_max_position_embeddings")
        text = TextConfig(
            **{k: raw[k] for k in plain if k in raw},
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            rope_short_factor=short,
            rope_long_factor=long,
        )
        if short is not None and not (len(short) == len(long) == text.head_dim // 2):
            raise CheckpointError(
                f"rope_scaling factor lists must have head_dim/2 = {text.head_dim // 2} entries"
            )
        img = raw.get("img_processor") or {}
        vision = VisionConfig.from_dict(raw.get("vision_config"), layer_idx=img.get("layer_idx", -2))
        if img.get("type_feature", "patch") != "patch":
            raise CheckpointError("only img_processor.type_feature 'patch' is supported")
        pre_defaults = _field_defaults(PreprocessorConfig)
        preprocessor = PreprocessorConfig(
            num_crops=int(pre.get("num_crops", pre_defaults["num_crops"])),
            image_mean=tuple(pre.get("image_mean", pre_defaults["image_mean"])),
            image_std=tuple(pre.get("image_std", pre_defaults["image_std"])),
            num_img_tokens=int(pre.get("num_img_tokens", img.get("num_img_tokens", pre_defaults["num_img_tokens"]))),
        )
        family = detect_family(raw)
        return cls(
            text=text,
            vision=vision,
            preprocessor=preprocessor,
            image_dim_out=img.get("image_dim_out", vision.hidden_size),
            family=family,
            rope_switch="recompute" if family == "phi35v" else "mixed",
            **({"bos_token_id": raw["bos_token_id"]} if "bos_token_id" in raw else {}),
            raw=raw,
        )


def _field_defaults(cls) -> dict:
    """name -> default of a config dataclass's fields that have one (the one place defaults live)."""
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


def detect_family(raw: dict) -> str:
    """Phi-3.5-vision's config differs from Phi-3-vision's only in small ways (spec §1.8)."""
    name = str(raw.get("_name_or_path", "")).lower().replace("-", "").replace(".", "").replace("_", "")
    if "phi35" in name or raw.get("sliding_window") == 262144:
        return "phi35v"
    if "phi3v" in name or "phi3vision" in name or raw.get("sliding_window") == 131072:
        return "phi3v"
    # Explicit pad_token_id is only written by Phi-3.5-vision's config.
    return "phi35v" if "pad_token_id" in raw else "phi3v"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path.name}: {e}") from e
