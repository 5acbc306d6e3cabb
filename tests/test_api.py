"""The Python API on a tiny random checkpoint: ask / chat / stream, sampling, stops, usage, errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import phi3v
from phi3v.api import Phi3V
from phi3v.engine.generate import GenerationState, generate_ids
from phi3v.engine.text import StopMatcher


def _png(w=48, h=40, seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_ask_is_deterministic_and_reports_usage(tiny_model):
    a = tiny_model.ask("Describe the picture.", images=[_png()], max_new_tokens=6)
    b = tiny_model.ask("Describe the picture.", images=[_png()], max_new_tokens=6)
    assert a.text == b.text and a.token_ids == b.token_ids
    assert a.finish_reason in ("length", "stop")
    assert a.usage.completion_tokens == len(a.token_ids) <= 6
    prepared = tiny_model.prepare(prompt="Describe the picture.", images=[_png()])
    assert a.usage.prompt_tokens == len(prepared.input_ids)
    assert a.usage.image_tokens == sum(1 for t in prepared.input_ids if t < 0) > 0
    assert a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens
    assert a.timings.vision_s > 0 and a.timings.prefill_s > 0 and a.timings.first_token_s > 0


def test_ask_equals_chat_with_the_same_turn(tiny_model):
    img = _png(seed=3)
    asked = tiny_model.ask("What is this?", images=[img], max_new_tokens=5, system="Be brief.")
    chatted = tiny_model.chat([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "What is this?"}]},
    ], max_new_tokens=5)
    assert asked.token_ids == chatted.token_ids


def test_stream_deltas_add_up_to_the_completion(tiny_model):
    stream = tiny_model.stream("Tell me a story.", max_new_tokens=12)
    deltas = list(stream)
    c = stream.completion
    assert "".join(deltas) == c.text
    assert c.text == tiny_model.tokenizer.decode([t for t in c.token_ids if t not in tiny_model.stop_ids])
    assert all(isinstance(d, str) and "\ufffd" not in d for d in deltas)
    assert c.token_ids == tiny_model.ask("Tell me a story.", max_new_tokens=12).token_ids


def test_stream_close_cancels(tiny_model):
    stream = tiny_model.stream("Count to ten.", max_new_tokens=50)
    next(iter(stream))
    stream.close()
    assert stream.completion.finish_reason == "cancelled"
    assert 1 <= stream.completion.usage.completion_tokens < 50


def test_messages_with_several_turns_and_images(tiny_model):
    messages = [
        {"role": "user", "content": [{"type": "image", "image": _png(seed=1)},
                                     {"type": "image", "image": _png(60, 30, seed=2)},
                                     {"type": "text", "text": "Compare them."}]},
        {"role": "assistant", "content": "They differ."},
        {"role": "user", "content": "How?"},
    ]
    prepared = tiny_model.prepare(messages=messages)
    assert -1 in prepared.input_ids and -2 in prepared.input_ids
    assert prepared.prompt_text.endswith("<|user|>\nHow?<|end|>\n<|assistant|>\n")
    c = tiny_model.chat(messages, max_new_tokens=3)
    assert c.usage.image_tokens == sum(prepared.images.num_img_tokens)


def test_sampling_is_reproducible_with_a_seed(tiny_model):
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    a = tiny_model.ask("Hello", **kw)
    b = tiny_model.ask("Hello", **kw)
    assert a.token_ids == b.token_ids
    others = {tuple(tiny_model.ask("Hello", **{**kw, "seed": s}).token_ids) for s in range(5)}
    assert len(others) > 1, "different seeds should sample different continuations"


def test_top_k_one_is_greedy(tiny_model):
    greedy = tiny_model.ask("Hello", max_new_tokens=6)
    sampled = tiny_model.ask("Hello", max_new_tokens=6, temperature=0.7, top_k=1, seed=5)
    assert greedy.token_ids == sampled.token_ids


def test_repetition_penalty_demotes_seen_tokens():
    from phi3v.engine.sampling import Sampler

    logits = torch.tensor([0.0, 5.0, 4.0, -1.0])
    seen = torch.tensor([1, 3])
    assert Sampler(phi3v.GenerationOptions(), "cpu")(logits, seen) == 1
    # 5.0 / 2 = 2.5 < 4.0: token 2 wins once token 1 is penalised; negative logits are multiplied.
    assert Sampler(phi3v.GenerationOptions(repetition_penalty=2.0), "cpu")(logits, seen) == 2
    assert Sampler(phi3v.GenerationOptions(repetition_penalty=1.1), "cpu")(logits, seen) == 1


def test_repetition_penalty_reaches_the_sampler(tiny_model):
    plain = tiny_model.ask("Hello", max_new_tokens=1).token_ids[0]
    # Asking with the greedy token already in the prompt and a huge penalty must pick another one.
    prompt = "Hello " + tiny_model.tokenizer.decode([plain])
    penalised = tiny_model.ask(prompt, max_new_tokens=1, repetition_penalty=1e6).token_ids[0]
    seen = set(tiny_model.prepare(prompt=prompt).input_ids)
    assert penalised not in seen


def test_stop_string_is_never_emitted(tiny_model):
    full = tiny_model.ask("Write something.", max_new_tokens=12)
    assert len(full.text) > 4
    stop = full.text[3:5]  # a string that occurs in the greedy output
    stream = tiny_model.stream("Write something.", max_new_tokens=12, stop=[stop])
    streamed = "".join(stream)
    c = stream.completion
    assert c.finish_reason == "stop"
    assert streamed == c.text == full.text[: full.text.index(stop)]
    assert stop not in streamed


def test_stop_matcher_holds_back_partial_matches():
    m = StopMatcher(("<END>",))
    assert m.check("hello <E", 0) == (6, False)  # "<E" might start the stop string
    assert m.check("hello <EN", 6) == (6, False)
    assert m.check("hello <ENX", 6) == (10, False)
    assert m.check("hello <END> more", 6) == (6, True)


def test_stop_token_ends_generation(tiny_model):
    # Force <|end|> by running with the logits biased through a custom stop set: the first greedy
    # token becomes a stop id, so the completion is empty with finish_reason "stop".
    first = tiny_model.ask("Hi", max_new_tokens=1).token_ids[0]
    model = Phi3V(tiny_model.module, tiny_model.config, tiny_model.tokenizer, "x", tiny_model.model_dir)
    model.stop_ids = frozenset({first})
    c = model.ask("Hi", max_new_tokens=5)
    assert c.finish_reason == "stop" and c.text == "" and c.token_ids == [first]


def test_prompt_too_long_names_the_counts(tiny_model_dir):
    model = phi3v.load(str(tiny_model_dir), device="cpu", dtype="float32", progress=False, max_context=400)
    with pytest.raises(phi3v.PromptTooLongError) as err:
        model.ask("Describe.", images=[_png()], num_crops=4)
    msg = str(err.value)
    assert str(err.value.prompt_tokens) in msg and "400" in msg and "num_crops" in msg
    # A prompt that fits still generates, with max_new_tokens clamped to the room left.
    c = model.ask("Hi", max_new_tokens=10_000)
    assert c.usage.total_tokens <= 400


@pytest.mark.parametrize("bad, error", [
    (b"not an image", phi3v.ImageError),
    ("/no/such/file.png", phi3v.ImageError),
])
def test_bad_images_are_clear_errors(tiny_model, bad, error):
    with pytest.raises(error):
        tiny_model.ask("What?", images=[bad])


def test_tag_and_image_count_mismatch(tiny_model):
    with pytest.raises(phi3v.PromptError):
        tiny_model.ask("<|image_1|> and <|image_2|>", images=[_png()])
    with pytest.raises(phi3v.TooManyImagesError):
        tiny_model.prepare(prompt="x", images=[_png(), _png()], max_images=1)


def test_unknown_option_and_bad_values(tiny_model):
    with pytest.raises(phi3v.Phi3VError, match="unknown generation option"):
        tiny_model.ask("Hi", max_tokenz=3)
    with pytest.raises(phi3v.Phi3VError, match="top_p"):
        tiny_model.ask("Hi", top_p=0)


def test_device_and_model_errors(tiny_model_dir, tmp_path):
    if not torch.cuda.is_available():
        with pytest.raises(phi3v.DeviceError, match="CUDA"):
            phi3v.load(str(tiny_model_dir), device="cuda")
    with pytest.raises(phi3v.DeviceError, match="dtype"):
        phi3v.load(str(tiny_model_dir), dtype="int3")
    with pytest.raises(phi3v.ModelNotFoundError):
        phi3v.load(str(tmp_path / "nowhere"))
    with pytest.raises(phi3v.Phi3VError, match="rope_switch"):
        phi3v.load(str(tiny_model_dir), rope_switch="sometimes")


def test_bfloat16_matches_float32_closely(tiny_model_dir, tiny_model):
    bf16 = phi3v.load(str(tiny_model_dir), device="cpu", dtype="bfloat16", progress=False)
    assert bf16.dtype == torch.bfloat16
    prepared = tiny_model.prepare(prompt="Describe.", images=[_png()])
    ref = tiny_model.logits(prepared.input_ids, prepared.images.pixel_values, prepared.images.image_sizes, last=4)
    got = bf16.logits(prepared.input_ids, prepared.images.pixel_values, prepared.images.image_sizes, last=4)
    rel = (got - ref).abs().max() / ref.abs().max()
    assert rel < 0.05, f"bf16 logits deviate {rel:.3f} relative to fp32"
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75


def test_load_does_not_touch_caller_inputs(tiny_model):
    ids = tiny_model.prepare(prompt="Describe.", images=[_png()]).input_ids
    t = torch.tensor(ids)
    before = t.clone()
    tiny_model.logits(t, *_pv(tiny_model, _png()))
    assert torch.equal(t, before)


def _pv(model, img):
    p = model.prepare(prompt="Describe.", images=[img])
    return p.images.pixel_values, p.images.image_sizes


@pytest.mark.parametrize("style, override, policy", [
    ("phi3v", None, "mixed"), ("phi35v", None, "recompute"), ("phi3v", "recompute", "recompute"),
])
def test_rope_switch_policy_at_the_boundary(tiny_checkpoint, style, override, policy):
    """Phi-3-vision keeps a mixed cache past original_max_position_embeddings (4096 in the real
    models, SHORT_ROPE here): cached != uncached once the crossing is processed; Phi-3.5-vision
    re-prefills with long factors (cached == uncached). The default follows the model;
    load(rope_switch=...) overrides it."""
    from conftest import SHORT_ROPE

    d = tiny_checkpoint(style, num_crops=1, original_max_position_embeddings=SHORT_ROPE)
    model = phi3v.load(str(d), device="cpu", dtype="float32", progress=False, rope_switch=override)
    assert model.config.family == style and model.config.rope_switch == policy
    orig = model.config.text.original_max_position_embeddings
    assert orig == SHORT_ROPE
    rng = np.random.default_rng(0)
    prompt = [1] + rng.integers(100, 30000, orig - 6).tolist()  # orig - 5 tokens
    steps = 10  # generation crosses the boundary at step 5
    cached: dict[int, torch.Tensor] = {}
    state = GenerationState(torch.tensor(prompt), [], model.module.new_cache())
    tokens = list(generate_ids(model.module, state, phi3v.GenerationOptions(max_new_tokens=steps),
                               frozenset(), policy, logits_hook=lambda k, lg: cached.__setitem__(k, lg.clone())))
    diffs = []
    for k in range(steps):
        uncached = model.logits(prompt + tokens[:k], last=1)[0]
        diffs.append((cached[k] - uncached).abs().max().item())
    crossing = orig - len(prompt) + 1  # first step whose logits come from a forward reaching total > orig
    assert max(diffs[:crossing]) < 1e-3, diffs
    if policy == "recompute":
        assert max(diffs) < 1e-3, diffs
    else:
        assert max(diffs[crossing:]) > 1e-2, diffs  # keys cached with short factors now disagree


def test_character_cut_by_max_tokens_is_dropped_not_garbled(tiny_model):
    from phi3v.engine.text import TextAssembler

    tok = tiny_model.tokenizer
    euro = [tok.token_to_id(f"<0x{b:02X}>") for b in "€".encode()]  # 3 byte-fallback tokens
    hello = tok.encode("Hello")[1:]
    full = TextAssembler(tok, tiny_model.stop_ids, ())
    text = "".join(full.push(t) for t in hello + euro) + full.flush()
    assert text == "Hello€"
    cut = TextAssembler(tok, tiny_model.stop_ids, ())
    text = "".join(cut.push(t) for t in hello + euro[:2]) + cut.flush()
    assert text == "Hello" and cut.finish_reason == "length"


def test_one_image_given_alone_is_one_image(tiny_model, tmp_path):
    """images="photo.png" (a single path, not a list) means that one image, not its characters."""
    from PIL import Image

    path = tmp_path / "one.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(path)
    alone = tiny_model.ask("What?", images=str(path), max_new_tokens=3)
    listed = tiny_model.ask("What?", images=[str(path)], max_new_tokens=3)
    assert alone.usage.image_tokens == listed.usage.image_tokens > 0 and alone.text == listed.text
