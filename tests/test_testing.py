"""phi3v.testing.make_tiny_checkpoint: the official layout, real names/shapes, determinism."""

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from phi3v import testing

GOLDEN_TINY = Path(__file__).parent / "golden" / "models" / "tiny-phi3v"
# Sizes of the golden tiny-phi3v (tests/golden/README.md, "Tiny models").
GOLDEN_SIZES = dict(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, vision_hidden=64,
                    vision_layers=3, vision_heads=4, vision_intermediate=128, num_crops=16)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def header_shapes(file: Path) -> dict[str, list[int]]:
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: v["shape"] for k, v in header.items()}


def expected_shapes(h, inter, layers, vh, vlayers, vi, vocab=32064) -> dict[str, list[int]]:
    """Spec §2's table written out independently of testing.tensor_specs."""
    shapes = {"model.embed_tokens.weight": [vocab, h], "model.norm.weight": [h], "lm_head.weight": [vocab, h]}
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes.update({p + "input_layernorm.weight": [h], p + "self_attn.qkv_proj.weight": [3 * h, h],
                       p + "self_attn.o_proj.weight": [h, h], p + "post_attention_layernorm.weight": [h],
                       p + "mlp.gate_up_proj.weight": [2 * inter, h], p + "mlp.down_proj.weight": [h, inter]})
    v = "model.vision_embed_tokens."
    shapes.update({v + "glb_GN": [1, 1, 4 * vh], v + "sub_GN": [1, 1, 1, 4 * vh],
                   v + "img_projection.0.weight": [h, 4 * vh], v + "img_projection.0.bias": [h],
                   v + "img_projection.2.weight": [h, h], v + "img_projection.2.bias": [h]})
    c = v + "img_processor.vision_model."
    shapes.update({c + "embeddings.class_embedding": [vh],
                   c + "embeddings.patch_embedding.weight": [vh, 3, 14, 14],
                   c + "embeddings.position_embedding.weight": [577, vh],
                   c + "pre_layrnorm.weight": [vh], c + "pre_layrnorm.bias": [vh],
                   c + "post_layernorm.weight": [vh], c + "post_layernorm.bias": [vh]})
    for n in range(vlayers):
        p = f"{c}encoder.layers.{n}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes.update({f"{p}self_attn.{proj}.weight": [vh, vh], f"{p}self_attn.{proj}.bias": [vh]})
        for ln in ("layer_norm1", "layer_norm2"):
            shapes.update({f"{p}{ln}.weight": [vh], f"{p}{ln}.bias": [vh]})
        shapes.update({p + "mlp.fc1.weight": [vi, vh], p + "mlp.fc1.bias": [vi],
                       p + "mlp.fc2.weight": [vh, vi], p + "mlp.fc2.bias": [vh]})
    return shapes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return testing.make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def test_tiny_checkpoint_files_and_config(tiny):
    assert sorted(p.name for p in tiny.iterdir()) == sorted(
        ["config.json", "generation_config.json", "preprocessor_config.json", "model.safetensors",
         *TOKENIZER_FILES])
    cfg = json.loads((tiny / "config.json").read_text())
    real = testing.full_size_config("phi3v")
    assert list(cfg) == list(real) + ["vision_config"]  # every real key, same order
    assert cfg["_name_or_path"] == "tiny-phi3v"
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (64, 128, 2)
    assert cfg["num_attention_heads"] == cfg["num_key_value_heads"] == 4
    assert cfg["img_processor"]["image_dim_out"] == 32
    assert cfg["vision_config"]["hidden_size"] == 32
    assert cfg["vision_config"]["num_hidden_layers"] == 2
    assert cfg["vision_config"]["image_size"] == 336 and cfg["vision_config"]["patch_size"] == 14
    assert cfg["vision_config"]["hidden_act"] == "quick_gelu"
    assert cfg["vision_config"]["layer_norm_eps"] == 1e-5
    # head_dim 16 -> 8 rope factors, evenly picked from the real 48 (both ends kept).
    picks = [0, 7, 13, 20, 27, 34, 40, 47]
    for key in ("short_factor", "long_factor"):
        assert cfg["rope_scaling"][key] == [testing.REAL_ROPE_FACTORS["phi3v"][key][i] for i in picks]
    assert cfg["sliding_window"] == 131072 and "pad_token_id" not in cfg
    assert json.loads((tiny / "preprocessor_config.json").read_text())["num_crops"] == 4
    assert json.loads((tiny / "generation_config.json").read_text())["eos_token_id"] == 2


def test_golden_sizes_reproduce_the_golden_layout(tmp_path):
    made = testing.make_tiny_checkpoint(tmp_path / "g", seed=1234, **GOLDEN_SIZES)
    for name in ("config.json", "generation_config.json", "preprocessor_config.json"):
        assert json.loads((made / name).read_text()) == json.loads((GOLDEN_TINY / name).read_text()), name
    for name in TOKENIZER_FILES:
        assert (made / name).read_bytes() == (GOLDEN_TINY / name).read_bytes(), name
    assert header_shapes(made / "model.safetensors") == header_shapes(GOLDEN_TINY / "model.safetensors")


def test_tensor_names_and_shapes_follow_the_spec(tiny):
    tensors = read_tensors(tiny)
    want = expected_shapes(h=64, inter=128, layers=2, vh=32, vlayers=2, vi=64)
    assert {k: list(t.shape) for k, t in tensors.items()} == want
    assert len(tensors) == (6 * 2 + 3) + (3 + 2 + 2 + 16 * 2) + (4 + 2)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert not any(".wte." in k for k in tensors)


def test_phi35v_style(tmp_path):
    made = testing.make_tiny_checkpoint(tmp_path / "p35", style="phi35v", num_heads=2)  # head_dim 32
    cfg = json.loads((made / "config.json").read_text())
    assert cfg["_name_or_path"] == "tiny-phi35v"
    assert cfg["sliding_window"] == 262144 and cfg["pad_token_id"] == 32000
    assert cfg["embd_pdrop"] == 0.0 and cfg["resid_pdrop"] == 0.0
    picks = [0, 3, 6, 9, 13, 16, 19, 22, 25, 28, 31, 34, 38, 41, 44, 47]  # the golden README's list
    for key in ("short_factor", "long_factor"):
        assert cfg["rope_scaling"][key] == [testing.REAL_ROPE_FACTORS["phi35v"][key][i] for i in picks]
        assert cfg["rope_scaling"][key] != testing.subsample_factors(testing.REAL_ROPE_FACTORS["phi3v"][key], 16)
    assert json.loads((made / "generation_config.json").read_text())["pad_token_id"] == 32000
    assert json.loads((made / "tokenizer_config.json").read_text())["processor_class"] == "Phi3VProcessor"
    assert (made / "tokenizer.json").read_bytes() == (GOLDEN_TINY / "tokenizer.json").read_bytes()


def test_two_shards_write_an_index_like_the_real_checkpoint(tmp_path, tiny):
    made = testing.make_tiny_checkpoint(tmp_path / "sharded", shards=2)
    names = sorted(p.name for p in made.glob("*.safetensors"))
    assert names == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = json.loads((made / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    for name in names:
        with safe_open(str(made / name), framework="pt") as f:
            stored = set(f.keys())
        assert stored and stored == {k for k, v in weight_map.items() if v == name}
    tensors = read_tensors(made)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    # Values depend on (seed, name) only, not on the sharding.
    single = read_tensors(tiny)
    assert tensors.keys() == single.keys()
    assert all(torch.equal(tensors[k], single[k]) for k in single)


def test_same_seed_same_bytes_other_seed_other_values(tmp_path, tiny):
    again = testing.make_tiny_checkpoint(tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (tiny / "model.safetensors").read_bytes()
    other = read_tensors(testing.make_tiny_checkpoint(tmp_path / "other", seed=1))
    base = read_tensors(tiny)
    assert not torch.equal(other["lm_head.weight"], base["lm_head.weight"])
    assert not torch.equal(other["model.vision_embed_tokens.sub_GN"], base["model.vision_embed_tokens.sub_GN"])


def test_weight_scales_follow_the_golden_stds(tiny):
    t = {k: v.float() for k, v in read_tensors(tiny).items()}
    # hidden 64 instead of the golden 128: fan-in scaled std = golden std * sqrt(128 / 64).
    assert t["lm_head.weight"].std().item() == pytest.approx(0.4 * math.sqrt(2), rel=0.02)
    assert t["model.layers.0.self_attn.qkv_proj.weight"].std().item() == pytest.approx(0.1 * math.sqrt(2), rel=0.05)
    assert t["model.embed_tokens.weight"].std().item() == pytest.approx(1.0, rel=0.02)
    norm = t["model.layers.1.input_layernorm.weight"]
    assert abs(norm.mean().item() - 1.0) < 0.05 and 0.05 < norm.std().item() < 0.15
    proj = t["model.vision_embed_tokens.img_projection.0.weight"]  # fan_in 4*32 instead of 256
    assert proj.std().item() == pytest.approx(0.06 * math.sqrt(2), rel=0.05)


def test_float32_storage_and_std_override(tmp_path):
    made = testing.make_tiny_checkpoint(tmp_path / "f32", dtype=torch.float32, std={"lm_head": 0.01})
    assert json.loads((made / "config.json").read_text())["torch_dtype"] == "float32"
    tensors = read_tensors(made)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert tensors["lm_head.weight"].std().item() == pytest.approx(0.01, rel=0.02)


def test_short_rope_boundary_option(tmp_path):
    """original_max_position_embeddings moves the long/short RoPE boundary of a tiny checkpoint."""
    from phi3v.engine.config import Phi3VConfig

    assert testing.tiny_config()["original_max_position_embeddings"] == 4096  # the real value by default
    made = testing.make_tiny_checkpoint(tmp_path / "short", style="phi35v", original_max_position_embeddings=256)
    cfg = json.loads((made / "config.json").read_text())
    assert cfg["original_max_position_embeddings"] == 256 and cfg["max_position_embeddings"] == 131072
    text = Phi3VConfig.from_dir(made).text
    assert text.original_max_position_embeddings == 256
    assert not text.uses_long_rope(256) and text.uses_long_rope(257)
    for bad in (0, 1, 200_000, 256.0, True):
        with pytest.raises(ValueError, match="original_max_position_embeddings"):
            testing.tiny_config(original_max_position_embeddings=bad)


def test_full_size_config_and_shapes_match_the_real_checkpoint():
    for style in testing.STYLES:
        cfg = testing.full_size_config(style)
        assert (cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"]) == (32064, 3072, 8192)
        assert cfg["num_hidden_layers"] == 32 and cfg["num_attention_heads"] == 32
        assert len(cfg["rope_scaling"]["short_factor"]) == len(cfg["rope_scaling"]["long_factor"]) == 48
        specs = testing.tensor_specs(cfg)  # nothing is written at full size
        assert len(specs) == 592
        assert sum(s.numel() for s in specs) == 4_146_621_440  # spec §0: bf16 total_size / 2
        shapes = {s.name: list(s.shape) for s in specs}
        assert shapes == expected_shapes(h=3072, inter=8192, layers=32, vh=1024, vlayers=24, vi=4096)
    assert testing.full_size_config("phi35v")["sliding_window"] == 262144
    assert testing.full_size_config("phi3v")["_attn_implementation"] == "flash_attention_2"


def test_bad_arguments_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="style"):
        testing.make_tiny_checkpoint(tmp_path / "a", style="phi4")
    with pytest.raises(ValueError, match="sizes"):
        testing.make_tiny_checkpoint(tmp_path / "b", sizes="huge")
    with pytest.raises(ValueError, match="heads"):
        testing.make_tiny_checkpoint(tmp_path / "c", hidden_size=60, num_heads=8)
    with pytest.raises(ValueError, match="std roles"):
        testing.make_tiny_checkpoint(tmp_path / "d", std={"nope": 1.0})
    with pytest.raises(ValueError, match="shards"):
        testing.make_tiny_checkpoint(tmp_path / "e", shards=1000)


def test_full_size_writer_layout_without_writing_weights(tmp_path, monkeypatch):
    # Stubs keep this cheap: no 4.1B random numbers and no 8 GB of files, only the layout logic.
    written = {}
    monkeypatch.setattr(testing, "random_tensor", lambda spec, **kw: torch.empty(0))
    monkeypatch.setattr(testing, "save_file",
                        lambda tensors, file, metadata: written.update({Path(file).name: list(tensors)}))
    made = testing.make_tiny_checkpoint(tmp_path / "full", style="phi35v", sizes="full")
    assert sorted(written) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = json.loads((made / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 8_293_242_880  # the real index's value (spec §2)
    assert sorted(index["weight_map"]) == sorted(n for names in written.values() for n in names)
    assert len(index["weight_map"]) == 592
    assert json.loads((made / "config.json").read_text()) == testing.full_size_config("phi35v")
    assert json.loads((made / "preprocessor_config.json").read_text())["num_crops"] == 4
