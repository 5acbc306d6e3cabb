"""phi3v.engine.config: one default per setting, and the 4096 rule (TextConfig.uses_long_rope)."""

from __future__ import annotations

import dataclasses

import torch

from phi3v.engine.config import Phi3VConfig, PreprocessorConfig, TextConfig, VisionConfig
from phi3v.engine.decoder import LongRoPE

MINIMAL = {"model_type": "phi3_v"}  # every other key missing: the defaults apply


def _defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def test_missing_keys_take_the_dataclass_defaults():
    """from_dicts and the dataclasses agree (they used to say 4096 vs 131072 and 1 vs 16)."""
    cfg = Phi3VConfig.from_dicts(MINIMAL, {})
    for cls, built in ((TextConfig, cfg.text), (PreprocessorConfig, cfg.preprocessor), (VisionConfig, cfg.vision)):
        for name, default in _defaults(cls).items():
            assert getattr(built, name) == default, f"{cls.__name__}.{name}"
    assert cfg.bos_token_id == 1


def test_defaults_are_the_reference_class_defaults():
    """Spec §1.3 / §1.5: what the reference uses when config.json / preprocessor_config.json lack a key."""
    assert TextConfig().max_position_embeddings == 4096
    assert TextConfig().original_max_position_embeddings == 4096
    assert PreprocessorConfig().num_crops == 1
    assert PreprocessorConfig().num_img_tokens == 144


def test_values_in_the_json_win_over_the_defaults():
    raw = {**MINIMAL, "max_position_embeddings": 131072, "num_key_value_heads": None, "num_attention_heads": 8,
           "hidden_size": 256, "bos_token_id": 5}
    cfg = Phi3VConfig.from_dicts(raw, {"num_crops": 16})
    assert cfg.text.max_position_embeddings == 131072
    assert cfg.text.num_key_value_heads == 8  # null = as many as the query heads
    assert cfg.preprocessor.num_crops == 16
    assert cfg.bos_token_id == 5


def _long_rope_config(original: int = 4096) -> TextConfig:
    return TextConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=131072,
                      original_max_position_embeddings=original,
                      rope_short_factor=[1.0] * 8, rope_long_factor=[2.0] * 8)


def test_uses_long_rope_past_original_max_position_embeddings():
    cfg = _long_rope_config()
    assert not cfg.uses_long_rope(1)
    assert not cfg.uses_long_rope(4096)
    assert cfg.uses_long_rope(4097)
    assert not TextConfig().uses_long_rope(10**6)  # no long factors: plain RoPE, never long
    small = _long_rope_config(original=300)
    assert not small.uses_long_rope(300) and small.uses_long_rope(301)


def test_long_rope_tables_follow_the_config_rule():
    cfg = _long_rope_config(original=16)
    rope = LongRoPE(cfg)
    short_cos, _ = rope(torch.arange(16)[None], torch.float32)  # 16 tokens: short factors
    long_cos, _ = rope(torch.arange(17)[None], torch.float32)  # 17 tokens: long factors
    assert not torch.allclose(short_cos[..., 1, :], long_cos[..., 1, :])
    # per row in a batch: row 0 ends at position 15 (short), row 1 at 16 (long)
    both, _ = rope(torch.stack([torch.arange(1, 17) - 1, torch.arange(1, 17)]), torch.float32)
    assert torch.equal(both[0], rope(torch.arange(16)[None], torch.float32)[0][0])
    assert torch.equal(both[1], rope(torch.arange(1, 17)[None], torch.float32)[0][0])
    assert torch.allclose(both[1, :, 0], long_cos[0, :, 1])  # position 1, long factors


def test_tiny_checkpoint_config_loads(tiny_model_dir):
    cfg = Phi3VConfig.from_dir(tiny_model_dir)
    assert cfg.preprocessor.num_crops == 2  # the fixture writes num_crops 2
    assert cfg.text.max_position_embeddings >= cfg.text.original_max_position_embeddings
