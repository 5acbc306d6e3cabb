"""Long prompts prefilled in chunks (engine/chunked_prefill.py) equal one pass, with bounded
temporaries: every attention call sees at most `chunk` queries, its mask is at most chunk x S, the
MLP at most `chunk` rows, and the attention runs torch's flash kernel (no score matrix).

The checkpoint is Phi-3.5-vision style with the long/short RoPE boundary moved to SHORT_ROPE (256)
tokens, so a 700-token prompt needs the long factors from its first chunk on.  Tolerance: float32
model; chunked and one-pass differ only in summation order inside the attention (the flash kernel's
key blocks fall differently), so logits agree to 1e-4 of their largest magnitude."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import SHORT_ROPE
from phi3v.engine import decoder
from phi3v.engine.chunked_prefill import prefill_chunked
from phi3v.engine.generate import prefill

PROMPT = 700
CHUNK = 128
TOL = 1e-4


@pytest.fixture(scope="module")
def long_model(tiny_checkpoint):
    import phi3v

    folder = tiny_checkpoint("phi35v", num_crops=1, original_max_position_embeddings=SHORT_ROPE)
    return phi3v.load(str(folder), device="cpu", dtype="float32", progress=False).module


def _embeds(module, n: int = PROMPT, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([1] + torch.randint(100, 32000, (n - 1,), generator=g).tolist())
    return module.embed(ids)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a - b).abs().max() <= TOL * b.abs().max()).item())


def test_chunked_prefill_equals_one_pass(long_model):
    embeds = _embeds(long_model)
    one_cache, chunk_cache = long_model.new_cache(), long_model.new_cache()
    one = prefill(long_model, embeds, 0, one_cache)
    chunked = prefill_chunked(long_model, embeds, 0, chunk_cache, chunk=CHUNK)
    assert _close(chunked, one), f"max diff {(chunked - one).abs().max().item():.3g}"
    assert chunk_cache.length == one_cache.length == PROMPT
    for layer in range(len(one_cache.k)):  # the caches a decode step reads are the same too
        assert _close(chunk_cache.k[layer][:, :, :PROMPT], one_cache.k[layer][:, :, :PROMPT])
        assert _close(chunk_cache.v[layer][:, :, :PROMPT], one_cache.v[layer][:, :, :PROMPT])


def test_chunks_after_a_cached_prefix_equal_one_pass(long_model):
    """A follow-up: 300 tokens cached, the other 400 prefilled in chunks through the mask path."""
    embeds = _embeds(long_model, seed=1)
    one = prefill(long_model, embeds, 0, long_model.new_cache())
    cache = long_model.new_cache()
    prefill_chunked(long_model, embeds[:300], 0, cache, chunk=CHUNK, rope_len=PROMPT)
    chunked = prefill_chunked(long_model, embeds[300:], 300, cache, chunk=CHUNK)
    assert _close(chunked, one)


def test_a_naive_split_would_rotate_early_chunks_with_the_short_factors(long_model):
    """Why rope_len exists: chunks whose positions end below the boundary pick the short factors
    when nobody says how long the prompt is, and the result is not one pass's."""
    embeds = _embeds(long_model)
    one = prefill(long_model, embeds, 0, long_model.new_cache())
    naive = prefill_chunked(long_model, embeds, 0, long_model.new_cache(), chunk=CHUNK, rope_len=CHUNK)
    assert not _close(naive, one)


def test_temporaries_are_bounded_by_the_chunk(long_model, monkeypatch):
    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((q.shape[2], k.shape[2], None if attn_mask is None else attn_mask.numel()))
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(decoder.F, "scaled_dot_product_attention", spy)
    mlp_rows = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, args: mlp_rows.append(args[0].shape[1]))
             for layer in long_model.model.layers]
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            prefill_chunked(long_model, _embeds(long_model), 0, long_model.new_cache(), chunk=CHUNK)
    finally:
        for h in hooks:
            h.remove()
    layers = len(long_model.model.layers)
    chunks = -(-PROMPT // CHUNK)
    assert len(calls) == layers * chunks
    assert max(q for q, _, _ in calls) <= CHUNK and max(mlp_rows) <= CHUNK
    assert all(m is None or m <= CHUNK * PROMPT for _, _, m in calls)  # never PROMPT x PROMPT
    kernels = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in kernels
    assert not any("attention_math" in k for k in kernels)  # no materialised score matrix


def test_bad_chunk_sizes_are_refused(long_model):
    with pytest.raises(ValueError, match="chunk"):
        prefill_chunked(long_model, _embeds(long_model, 8), 0, long_model.new_cache(), chunk=0)


def test_a_long_prompt_alone_is_prefilled_in_bounded_pieces(tiny_model, monkeypatch):
    """DecodeLoop: a prompt part longer than ONE_PASS_MAX_TOKENS (1024; a video's prompt) goes
    through the decoder in pieces of at most that many rows (bounded activation memory), and the
    answer equals the one-pass prefill's (greedy, float32)."""
    from phi3v.engine import generate

    rng = torch.Generator().manual_seed(5)
    image = (torch.rand(3, 200, 300, generator=rng) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
    from PIL import Image

    picture = Image.fromarray(image)
    one_pass = tiny_model.ask("Describe it.", images=[picture], max_new_tokens=6, num_crops=4)
    assert one_pass.usage.prompt_tokens > 300

    rows_seen = []
    layer0 = tiny_model.module.model.layers[0]
    handle = layer0.register_forward_pre_hook(lambda mod, args: rows_seen.append(args[0].shape[1]))
    monkeypatch.setattr(generate, "ONE_PASS_MAX_TOKENS", 128)
    try:
        tiny_model.clear_caches()
        pieces = tiny_model.ask("Describe it.", images=[picture], max_new_tokens=6, num_crops=4)
    finally:
        handle.remove()
    prompt = one_pass.usage.prompt_tokens
    assert rows_seen[: -(-prompt // 128)] == [128] * (prompt // 128) + ([prompt % 128] if prompt % 128 else [])
    assert max(rows_seen) <= 128
    assert pieces.token_ids == one_pass.token_ids and pieces.text == one_pass.text


def test_the_memory_plan_knows_the_engines_prefill_piece():
    """phi3v info's peak estimate assumes the engine's piece size (memory_plan keeps no engine import)."""
    from phi3v.engine import generate, memory_plan

    assert memory_plan.PREFILL_PIECE_TOKENS == generate.ONE_PASS_MAX_TOKENS
