"""Image-feature cache and KV prefix reuse: cached runs must give what a cold run gives.

Each test loads its own model instances from the session's tiny checkpoint (float32, CPU): one with
the caches on, and a "cold" one with both caches off as the reference. Token ids must be identical;
logits of a reused-prefix run must match the cold run within 1e-4 * max|logit|.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import phi3v
from phi3v.engine.feature_cache import ImageFeatureCache, image_keys
from phi3v.engine.generate import GenerationState, generate_ids
from phi3v.engine.prefix_cache import RetainedConversation, reusable_prefix

GREEDY = {"max_new_tokens": 12}


def load(model_dir, **kw):
    return phi3v.load(str(model_dir), device="cpu", dtype="float32", progress=False, **kw)


@pytest.fixture()
def cached(tiny_model_dir):
    return load(tiny_model_dir)


@pytest.fixture(scope="module")
def cold(tiny_model_dir):
    return load(tiny_model_dir, image_cache_mb=0, prefix_cache=False)


def picture(seed: int, h: int = 60, w: int = 90) -> np.ndarray:
    return (np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8)


def vision_counter(model):
    """Record each image the vision tower encodes (a 1 per image: its one projector call)."""
    calls: list[int] = []
    model.module.model.vision_embed_tokens.img_projection.register_forward_hook(
        lambda mod, args, out: calls.append(1))
    return calls


def prefill_counter(model):
    """Record how many new positions each decoder pass processes (per row)."""
    seen: list[int] = []
    model.module.model.layers[0].register_forward_pre_hook(lambda mod, args: seen.append(int(args[0].shape[1])))
    return seen


def user(text, *images):
    return {"role": "user", "content": [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": text}]}


# -- image-feature cache ----------------------------------------------------------------------------
def test_image_cache_hit_skips_vision_and_matches_cold(tiny_model_dir, cold):
    model = load(tiny_model_dir, prefix_cache=False)
    calls = vision_counter(model)
    img = picture(1)
    first = model.ask("Describe it.", images=[img], **GREEDY)
    second = model.ask("Describe it.", images=[img.copy()], **GREEDY)  # same pixels, new object
    assert calls == [1], "the second request must not run the vision tower"
    assert model.image_cache.hits == 1 and len(model.image_cache) == 1
    reference = cold.ask("Describe it.", images=[img], **GREEDY)
    assert first.token_ids == second.token_ids == reference.token_ids
    assert first.text == second.text == reference.text


def test_image_cache_encodes_only_misses_in_one_batch(tiny_model_dir, cold):
    model = load(tiny_model_dir, prefix_cache=False)
    calls = vision_counter(model)
    a, b, c = picture(2), picture(3, 40, 120), picture(4, 90, 50)
    model.ask("One.", images=[a], **GREEDY)
    got = model.ask("Three.", images=[a, b, c], **GREEDY)
    assert len(calls) == 3, "a, then b and c are encoded; the second time a comes from the cache"
    assert got.token_ids == cold.ask("Three.", images=[a, b, c], **GREEDY).token_ids


def test_image_cache_key_includes_num_crops_and_pixels(tiny_model_dir):
    model = load(tiny_model_dir, prefix_cache=False)
    calls = vision_counter(model)
    img = picture(5, 200, 420)
    model.ask("x", images=[img], num_crops=1, max_new_tokens=1)
    model.ask("x", images=[img], num_crops=4, max_new_tokens=1)
    changed = img.copy()
    changed[0, 0, 0] ^= 1  # one channel of one pixel
    model.ask("x", images=[changed], num_crops=4, max_new_tokens=1)
    assert calls == [1, 1, 1]
    p1 = model.prepare(prompt="x", images=[img], num_crops=4)
    p2 = model.prepare(prompt="x", images=[changed], num_crops=4)
    k1 = image_keys(p1.images.pixel_values, p1.images.image_sizes)
    assert k1 != image_keys(p2.images.pixel_values, p2.images.image_sizes)
    assert k1 == image_keys(p1.images.pixel_values.clone(), p1.images.image_sizes)


def test_pixel_cache_reuses_preprocessing_with_equal_pixels(tiny_model_dir, monkeypatch):
    import phi3v.engine.image_features
    from phi3v.engine.image import open_image, preprocess

    model = load(tiny_model_dir)
    runs = []
    monkeypatch.setattr(phi3v.engine.image_features, "preprocess", lambda *a, **kw: runs.append(1) or preprocess(*a, **kw))
    a, b = picture(11, 200, 420), picture(12)
    first = model.prepare(prompt="Compare.", images=[a, b])
    second = model.prepare(prompt="Compare again.", images=[b.copy(), a.copy()])
    assert len(runs) == 2, "each image is preprocessed once"
    fresh = preprocess([open_image(b), open_image(a)], model.default_num_crops)
    assert torch.equal(second.images.pixel_values, fresh.pixel_values)
    assert torch.equal(second.images.image_sizes, fresh.image_sizes)
    assert second.images.num_img_tokens == fresh.num_img_tokens
    assert second.image_keys == first.image_keys[::-1]
    model.prepare(prompt="x", images=[a], num_crops=1)
    assert len(runs) == 3, "another num_crops is another entry"


def test_feature_cache_is_a_byte_bounded_lru():
    cache = ImageFeatureCache(max_bytes=3 * 400)  # room for three (10, 10) float32 tensors
    t = {k: torch.full((10, 10), float(i)) for i, k in enumerate("abcd")}
    for k in "abc":
        cache.put(k, t[k])
    assert cache.get("a") is t["a"]  # a becomes the most recently used
    cache.put("d", t["d"])  # evicts b, the least recently used
    assert cache.get("b") is None and cache.get("c") is t["c"] and cache.get("d") is t["d"]
    assert cache.nbytes == 1200 and len(cache) == 3
    cache.put("huge", torch.zeros(100, 100))  # larger than the whole budget: not kept, nothing evicted
    assert cache.get("huge") is None and len(cache) == 3
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0
    off = ImageFeatureCache(0)
    off.put("a", t["a"])
    assert off.get("a") is None


# -- KV prefix reuse --------------------------------------------------------------------------------
def test_followup_reuses_prefix_and_matches_cold(cached, cold):
    calls, prefilled = vision_counter(cached), prefill_counter(cached)
    img = picture(6)
    turn1 = [user("What is in the picture?", img)]
    first = cached.chat(turn1, **GREEDY)
    turn2 = turn1 + [{"role": "assistant", "content": first.text}, user("Tell me more.")]
    prepared = cached.prepare(messages=turn2)
    prefilled.clear()
    stream = cached.generate_stream(prepared, phi3v.GenerationOptions(**GREEDY))
    stream.text()
    second = stream.completion

    retained = first.token_ids[:-1] if first.finish_reason == "stop" else first.token_ids
    old = cached.prepare(messages=turn1).input_ids + retained[:-1]  # the last generated id is never fed
    common = next((i for i, (x, y) in enumerate(zip(old, prepared.input_ids)) if x != y), min(len(old), len(prepared.input_ids)))
    assert stream.reused_tokens == common > prepared.image_tokens
    assert prefilled[0] == prepared.num_tokens - common, "only the new tokens are prefilled"
    assert calls == [1], "the follow-up neither re-encodes the image"
    assert second.token_ids == cold.chat(turn2, **GREEDY).token_ids
    assert second.usage.prompt_tokens == prepared.num_tokens


def test_reused_prefix_logits_match_a_cold_prefill(cached):
    """Lower level: run a follow-up on the retained cache and on a fresh one, compare every step."""
    img = picture(7)
    turn1 = [user("Look.", img)]
    first = cached.chat(turn1, **GREEDY)
    retained = cached._retained
    turn2 = turn1 + [{"role": "assistant", "content": first.text}, user("Again, in one word?")]
    prepared = cached.prepare(messages=turn2)
    feats = cached._image_features([prepared])[0]
    reuse = reusable_prefix(retained, prepared.input_ids, prepared.image_keys, False)
    assert reuse > 0
    runs = {}
    for name, cache, start in (("warm", retained.cache, reuse), ("cold", cached.module.new_cache(), 0)):
        if name == "warm":
            cache.truncate(start)
        logits: list[torch.Tensor] = []
        state = GenerationState(torch.tensor(prepared.input_ids), feats, cache)
        ids = list(generate_ids(cached.module, state, phi3v.GenerationOptions(max_new_tokens=8), frozenset(),
                                reuse_prefix=start, logits_hook=lambda k, lg, out=logits: out.append(lg)))
        runs[name] = (ids, torch.stack(logits))
    assert runs["warm"][0] == runs["cold"][0]
    scale = runs["cold"][1].abs().max()
    assert (runs["warm"][1] - runs["cold"][1]).abs().max() < 1e-4 * scale


def test_same_request_again_reuses_all_but_one_token(cached, cold):
    prompt = "Please write a long poem about caches and rivers and the sea. " * 3
    first = cached.ask(prompt, **GREEDY)
    stream = cached.generate_stream(cached.prepare(prompt=prompt), phi3v.GenerationOptions(**GREEDY))
    stream.text()
    assert stream.reused_tokens == cached.prepare(prompt=prompt).num_tokens - 1
    assert stream.completion.token_ids == first.token_ids == cold.ask(prompt, **GREEDY).token_ids


def test_changed_image_is_not_reused(cached, cold):
    turn = [user("What is in the picture?", picture(8))]
    cached.chat(turn, **GREEDY)
    other = [user("What is in the picture?", picture(9))]  # same ids, other pixels
    prepared = cached.prepare(messages=other)
    stream = cached.generate_stream(prepared, phi3v.GenerationOptions(**GREEDY))
    stream.text()
    first_placeholder = prepared.input_ids.index(-1)
    assert stream.reused_tokens == 0 or stream.reused_tokens <= first_placeholder
    assert stream.completion.token_ids == cold.chat(other, **GREEDY).token_ids


def test_unrelated_or_short_prefix_is_not_reused(cached):
    cached.ask("First question about something entirely different, with many words in it.", **GREEDY)
    stream = cached.generate_stream(cached.prepare(prompt="Hi"), phi3v.GenerationOptions(**GREEDY))
    stream.text()
    assert stream.reused_tokens == 0  # only "<s><|user|>\n" in common: below prefix_min_tokens


def test_prefix_not_reused_across_rope_regimes(tiny_checkpoint):
    """A short retained conversation must not seed a prompt that a cold run prefills with long RoPE."""
    from conftest import SHORT_ROPE

    folder = tiny_checkpoint("phi3v", num_crops=2, original_max_position_embeddings=SHORT_ROPE)
    cached, cold = load(folder), load(folder, image_cache_mb=0, prefix_cache=False)
    orig = cached.config.text.original_max_position_embeddings
    assert orig == SHORT_ROPE
    base = "alpha beta gamma delta " * 8
    cached.ask(base, **GREEDY)
    long_prompt = base + "epsilon " * (orig + 10)
    prepared = cached.prepare(prompt=long_prompt)
    assert prepared.num_tokens > orig
    stream = cached.generate_stream(prepared, phi3v.GenerationOptions(max_new_tokens=3))
    stream.text()
    assert stream.reused_tokens == 0
    assert stream.completion.token_ids == cold.ask(long_prompt, max_new_tokens=3).token_ids
    assert cached._retained.long_rope  # and back: a short prompt must not reuse this long cache
    again = cached.generate_stream(cached.prepare(prompt=base), phi3v.GenerationOptions(**GREEDY))
    again.text()
    assert again.reused_tokens == 0


def test_reusable_prefix_rules():
    class FakeCache:
        def __init__(self, n):
            self.length = n

    ids = [1, 5, 6, -1, -1, -1, 7, 8, 9]
    r = RetainedConversation(ids, ["img-a"], FakeCache(len(ids)), long_rope=False)
    assert reusable_prefix(r, ids + [10, 11], ["img-a"], False) == len(ids)
    assert reusable_prefix(r, ids, ["img-a"], False) == len(ids) - 1  # one token left to prefill
    assert reusable_prefix(r, ids[:7] + [99, 98], ["img-a"], False) == 7
    assert reusable_prefix(r, ids + [10], ["img-b"], False) == 3  # cut before the changed image
    assert reusable_prefix(r, ids + [10], [], False) == 3
    assert reusable_prefix(r, ids + [10], ["img-a"], True) == 0  # RoPE regime differs
    assert reusable_prefix(r, ids + [10], ["img-a"], False, min_tokens=20) == 0
    assert reusable_prefix(r, [1], ["img-a"], False) == 0


def test_clear_caches_and_switches(tiny_model_dir):
    model = load(tiny_model_dir, image_cache_mb=1)
    model.ask("Describe.", images=[picture(10)], max_new_tokens=2)
    assert model._retained is not None and len(model.image_cache) == 1
    model.clear_caches()
    assert model._retained is None and len(model.image_cache) == 0
    off = load(tiny_model_dir, image_cache_mb=0, prefix_cache=False)
    off.ask("Describe.", images=[picture(10)], max_new_tokens=2)
    assert off._retained is None and len(off.image_cache) == 0


def test_cancelled_stream_keeps_a_consistent_cache(cached, cold):
    prompt = "Count slowly from one to one hundred, one number per line please. " * 2
    stream = cached.stream(prompt, max_new_tokens=30)
    next(stream)
    stream.close()
    assert stream.completion.finish_reason == "cancelled"
    r = cached._retained
    assert r is not None and len(r.ids) == r.cache.length
    again = cached.generate_stream(cached.prepare(prompt=prompt), phi3v.GenerationOptions(**GREEDY))
    again.text()
    assert again.reused_tokens > 0
    assert again.completion.token_ids == cold.ask(prompt, **GREEDY).token_ids
