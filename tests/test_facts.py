"""phi3v.engine.facts: model numbers from the module built on the meta device, checked against a
real tiny module and checkpoint, and against the spec's numbers for the published models."""

from __future__ import annotations

import math

import phi3v
from phi3v.engine.config import Phi3VConfig
from phi3v.engine.facts import model_facts, published_config


def test_facts_count_the_real_module_and_the_checkpoint(tiny_model_dir):
    from safetensors import safe_open

    cfg = Phi3VConfig.from_dir(tiny_model_dir)
    facts = model_facts(cfg)
    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as f:
        stored = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert facts.parameters["total"] == stored  # every checkpoint tensor, unused CLIP layers included
    module = phi3v.load(str(tiny_model_dir), device="cpu", dtype="float32", progress=False).module
    params = dict(module.named_parameters())
    assert facts.loaded_parameters == sum(p.numel() for p in params.values())
    vision = sum(p.numel() for n, p in params.items() if n.startswith("model.vision_embed_tokens.img_processor."))
    projector = sum(p.numel() for n, p in params.items() if n.startswith("model.vision_embed_tokens.")) - vision
    assert facts.parameters["projector"] == projector
    assert facts.parameters["vision"] > vision  # + the CLIP layer past the feature layer, post_layernorm
    assert facts.parameters["decoder"] == facts.loaded_parameters - vision - projector
    assert facts.lm_head_params == params["lm_head.weight"].numel()
    assert facts.weight_bytes("float32") == 4 * stored and facts.weight_bytes("bf16") == 2 * stored
    t = cfg.text
    assert facts.kv_cache_bytes_per_token("bfloat16") == 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * 2
    assert facts.context_length == t.max_position_embeddings and facts.default_num_crops == 2
    assert facts.image_tokens(336, 336, 16) == 2509 and facts.crop_grid(336, 336, 16) == (4, 4)


def test_quantized_weight_bytes_equal_the_loaded_quantized_module(tiny_model_dir):
    facts = model_facts(Phi3VConfig.from_dir(tiny_model_dir))
    for scheme in ("int8", "int4:32"):
        module = phi3v.load(str(tiny_model_dir), device="cpu", dtype="bfloat16", progress=False,
                            quantize=scheme).module
        loaded = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()]
                     if not any(t is b for b in module.model.rotary.buffers()))
        skipped = (facts.parameters["total"] - facts.loaded_parameters) * 2  # unused CLIP tensors, bf16
        assert facts.weight_bytes("bfloat16", scheme) == loaded + skipped, scheme
        assert facts.weight_bytes("bfloat16", scheme) < facts.weight_bytes("bfloat16")


def test_published_facts_match_the_spec():
    facts = model_facts(published_config("microsoft/Phi-3.5-vision-instruct"))
    assert facts.parameters == {"decoder": 3_821_079_552, "vision": 303_507_456,
                                "projector": 22_026_240 + 8_192, "total": 4_146_621_440}  # spec §0
    assert facts.weight_bytes("bfloat16") == 8_293_242_880  # the real index's total_size
    assert facts.context_length == 131072 and facts.default_num_crops == 4
    assert model_facts(published_config()).default_num_crops == 16
    assert facts.kv_cache_bytes_per_token("bfloat16") == 393_216  # 2 * 32 layers * 3072 * 2 bytes
