"""Batched generation: every row must come out as if it ran alone.

Reference = the same prepared prompt through `generate` on a model with its caches off (float32,
CPU, tiny checkpoint). Token ids, text, finish reason and usage must be identical; logits of the
batched prefill / decode steps must match single runs within 1e-4 * max|logit|.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import phi3v
from phi3v.engine.generate import DecodeLoop, GenerationState, Row, generate_ids, prefill, run_rows
from phi3v.engine.running_batch import RunningBatch
from phi3v.errors import Phi3VError, PromptTooLongError
from phi3v.options import GenerationOptions as Opts


def load(model_dir, **kw):
    return phi3v.load(str(model_dir), device="cpu", dtype="float32", progress=False, **kw)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load(tiny_model_dir, image_cache_mb=0, prefix_cache=False)


def picture(seed: int, h: int = 60, w: int = 90) -> np.ndarray:
    return (np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8)


def alone(model, prepared, options):
    return [model.generate(p, o) for p, o in zip(prepared, options)]


def assert_same(batched, single):
    for row, (b, s) in enumerate(zip(batched, single)):
        assert b.token_ids == s.token_ids, f"row {row}"
        assert (b.text, b.finish_reason) == (s.text, s.finish_reason), f"row {row}"
        assert b.usage.to_dict() == s.usage.to_dict(), f"row {row}"


def test_mixed_batch_equals_each_run_alone(model):
    prepared = [
        model.prepare(prompt="Hi"),
        model.prepare(prompt="Describe the picture in detail, please.", images=[picture(1)]),
        model.prepare(prompt="Compare <|image_1|> with <|image_2|>.", images=[picture(2, 40, 120), picture(3)]),
        model.prepare(prompt="A much longer text-only prompt that goes on and on about nothing in particular. " * 4),
        model.prepare(messages=[{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": [{"type": "image", "image": picture(4, 90, 50)},
                                                             {"type": "text", "text": "What?"}]}], num_crops=1),
    ]
    single_first = model.generate(prepared[3], Opts(max_new_tokens=6))
    stop_text = single_first.text[len(single_first.text) // 2:][:3]  # a stop string that will occur in row 3
    assert stop_text
    options = [Opts(max_new_tokens=3), Opts(max_new_tokens=16), Opts(max_new_tokens=9),
               Opts(max_new_tokens=12, stop=(stop_text,)), Opts(max_new_tokens=1)]
    batched = model.generate_batch(prepared, options)
    single = alone(model, prepared, options)
    assert_same(batched, single)
    assert batched[3].finish_reason == "stop" and stop_text not in batched[3].text
    assert [c.usage.completion_tokens for c in batched][:3] == [3, 16, 9]


def test_batch_of_eight_with_shared_options_and_repetition_penalty(model):
    prompts = [("word " * (3 * i + 1)).strip() for i in range(8)]
    prepared = [model.prepare(prompt=p, images=[picture(i)] if i % 3 == 0 else []) for i, p in enumerate(prompts)]
    options = Opts(max_new_tokens=10, repetition_penalty=1.3)
    assert_same(model.generate_batch(prepared, options), alone(model, prepared, [options] * 8))


def test_seeded_sampling_per_row_equals_alone(model):
    prepared = [model.prepare(prompt="Once upon a time"), model.prepare(prompt="In a galaxy far away, long ago")]
    options = [Opts(max_new_tokens=10, temperature=0.9, top_k=50, seed=7),
               Opts(max_new_tokens=10, temperature=0.7, top_p=0.9, seed=8)]
    assert_same(model.generate_batch(prepared, options), alone(model, prepared, options))


def test_running_batch_logits_match_an_uncached_forward(model):
    """Lower level: rows prefilled alone join a left-padded batch; its logits at every step equal
    an uncached forward over each row's prompt + the tokens fed."""
    prepared = [model.prepare(prompt="Short."), model.prepare(prompt="Look at this.", images=[picture(5)]),
                model.prepare(prompt="A medium length prompt with a few more words.")]
    feats = model._image_features(prepared)
    forced = [[100, 200, 300, 400], [7, 8, 9, 10], [3000, 3001, 3002, 3003]]  # tokens fed at each step
    batch, first = RunningBatch(model.module), []
    for p, f in zip(prepared, feats):
        cache = model.module.new_cache()
        first.append(prefill(model.module, model.module.embed(torch.tensor(p.input_ids), f), 0, cache))
        batch.join(cache)
    assert batch.key_valid is not None  # rows of different lengths: padding is masked
    got = [torch.stack(first)] + [batch.step([forced[r][step] for r in range(3)]) for step in range(4)]
    for r, p in enumerate(prepared):
        images = p.images
        want = model.logits(p.input_ids + forced[r], images.pixel_values if images else None,
                            images.image_sizes if images else None, last=5)
        have = torch.stack([g[r] for g in got])
        assert (have - want).abs().max() < 1e-4 * want.abs().max(), f"row {r}"


def test_rows_joining_and_leaving_between_steps_equal_alone(model):
    """Continuous batching: rows join a running loop at different steps, leave at different
    steps (one cancelled), and each greedy row equals its run alone, logits included."""
    prepared = [model.prepare(prompt="First prompt, quite a long one with many words in it."),
                model.prepare(prompt="Second.", images=[picture(11)]),
                model.prepare(prompt="Third one here"),
                model.prepare(prompt="Fourth: cancelled midway")]
    feats = model._image_features(prepared)
    lengths = [12, 5, 9, 20]
    logits: dict[tuple[int, int], torch.Tensor] = {}
    rows = [Row(torch.tensor(p.input_ids), f, Opts(max_new_tokens=n)) for p, f, n in zip(prepared, feats, lengths)]
    index = {id(r): i for i, r in enumerate(rows)}
    loop = DecodeLoop(model.module, frozenset(), model.config.rope_switch,
                      lambda row, k, lg: logits.__setitem__((index[id(row)], k), lg.clone()))
    join_at = {0: [0], 2: [1, 3], 4: [2]}  # step -> rows that join before it
    step = 0
    while step == 0 or loop.busy:
        for r in join_at.get(step, []):
            loop.add(rows[r])
        loop.step()
        if step == 6:
            loop.cancel(rows[3])
        step += 1
    assert [r.finish_reason for r in rows] == ["length", "length", "length", "cancelled"]
    assert len(rows[3].generated) == 5  # joined before step 2, cancelled after step 6
    assert loop.batch.size == 0 and loop.batch.cache is None  # everything freed
    for r in range(3):
        want_logits = []
        state = GenerationState(rows[r].prompt_ids, rows[r].image_embeds, None)
        want = list(generate_ids(model.module, state, Opts(max_new_tokens=lengths[r]), frozenset(),
                                 model.config.rope_switch, logits_hook=lambda k, lg, out=want_logits: out.append(lg)))
        assert rows[r].generated == want, f"row {r}"
        have = torch.stack([logits[(r, k)] for k in range(len(want))])
        want_logits = torch.stack(want_logits)
        assert (have - want_logits).abs().max() < 1e-4 * want_logits.abs().max(), f"row {r}"


def test_chunked_prefill_lets_running_rows_decode_and_equals_alone(model):
    """With prefill_chunk, a long newcomer is prefilled over several steps while the running row
    keeps producing a token every step; both rows still equal their runs alone."""
    prepared = [model.prepare(prompt="Running."),
                model.prepare(prompt="A long newcomer prompt that goes on " * 5, images=[picture(12)])]
    feats = model._image_features(prepared)
    chunk = 16
    lengths = [len(prepared[1].input_ids) // chunk + 8, 6]  # row 0 outlives row 1's prefill
    rows = [Row(torch.tensor(p.input_ids), f, Opts(max_new_tokens=n)) for p, f, n in zip(prepared, feats, lengths)]
    assert rows[1].prompt_ids.numel() > 4 * chunk
    loop = DecodeLoop(model.module, frozenset(), model.config.rope_switch, prefill_chunk=chunk)
    loop.add(rows[0])
    while not rows[0].generated:
        loop.step()
    loop.add(rows[1])
    steps_while_prefilling = 0
    while any(r is rows[1] for r in loop.waiting):
        events = loop.step()
        joined = not any(r is rows[1] for r in loop.waiting)  # its last part went in this step
        assert [r for r, _ in events] == ([rows[0], rows[1]] if joined else [rows[0]]), \
            "the running row decodes while the newcomer prefills"
        steps_while_prefilling += 1
    assert steps_while_prefilling >= rows[1].prompt_ids.numel() // chunk - 1
    while loop.busy:
        loop.step()
    for r in range(2):
        state = GenerationState(rows[r].prompt_ids, rows[r].image_embeds, None)
        want = list(generate_ids(model.module, state, Opts(max_new_tokens=lengths[r]), frozenset(),
                                 model.config.rope_switch))
        assert rows[r].generated == want, f"row {r}"


def test_stream_yields_row_deltas_and_close_cancels(model):
    prepared = [model.prepare(prompt="One"), model.prepare(prompt="Two two")]
    options = [Opts(max_new_tokens=4), Opts(max_new_tokens=20)]
    stream = model.generate_batch_stream(prepared, options)
    texts = ["", ""]
    for row, delta in stream:
        texts[row] += delta
    assert texts == [c.text for c in stream.completions]
    assert_same(stream.completions, alone(model, prepared, options))
    assert stream.completions[0].timings.first_token_s > 0 and stream.completions[1].timings.decode_s > 0

    stream = model.generate_batch_stream(prepared, options)
    for seen, _ in enumerate(stream, start=1):
        if seen == 10:
            break
    stream.close()
    reasons = [c.finish_reason for c in stream.completions]
    assert reasons[0] == "length" and reasons[1] == "cancelled"
    assert 0 < stream.completions[1].usage.completion_tokens < 20


def test_image_repeated_across_rows_is_encoded_once(tiny_model_dir):
    m = load(tiny_model_dir, image_cache_mb=0, prefix_cache=False)
    projected, crops = [], []  # one projector call per image encoded; crops per CLIP call
    vision = m.module.model.vision_embed_tokens
    vision.img_projection.register_forward_hook(lambda mod, a, out: projected.append(int(a[0].shape[0])))
    vision.img_processor.vision_model.register_forward_hook(lambda mod, a, out: crops.append(int(a[0].shape[0])))
    img = picture(6)
    prepared = [m.prepare(prompt="A", images=[img]), m.prepare(prompt="B", images=[img, picture(7)]),
                m.prepare(prompt="C", images=[picture(8, 200, 420)], num_crops=4)]
    m.generate_batch(prepared, Opts(max_new_tokens=2))
    distinct = [prepared[1].images, prepared[2].images]  # img and picture 7, picture 8
    want_tokens = sorted(n for b in distinct for n in b.num_img_tokens)
    assert sorted(projected) == want_tokens, "each distinct image encoded once, the repeated one too"
    want_crops = sum(1 + (int(h) // 336) * (int(w) // 336) for b in distinct for h, w in b.image_sizes.tolist())
    assert sum(crops) == want_crops and max(crops) <= vision.vision_chunk


@pytest.mark.parametrize("style", ["phi3v", "phi35v"])
def test_row_crossing_the_long_rope_boundary_equals_alone(tiny_checkpoint, style):
    """Row 0 starts just below original_max_position_embeddings (SHORT_ROPE here, 4096 in the real
    models) and grows past it: "mixed" (Phi-3-vision) switches per token, "recompute"
    (Phi-3.5-vision) re-prefills that row. The image row starts past the boundary."""
    from conftest import SHORT_ROPE

    folder = tiny_checkpoint(style, num_crops=2, original_max_position_embeddings=SHORT_ROPE)
    m = load(folder, image_cache_mb=0, prefix_cache=False)
    orig = m.config.text.original_max_position_embeddings
    assert orig == SHORT_ROPE
    long_prompt = m.prepare(prompt="x" + " hello" * (orig - 12))
    assert orig - 5 < long_prompt.num_tokens <= orig
    prepared = [long_prompt, m.prepare(prompt="Short one."), m.prepare(prompt="Tiny.", images=[picture(9)])]
    options = Opts(max_new_tokens=12)
    assert_same(m.generate_batch(prepared, options), alone(m, prepared, [options] * 3))

    # Greedy tokens barely depend on the regime in a tiny random model: compare the logits too
    # (short vs long factors differ by ~0.5 here, far above the 1e-4 relative tolerance).
    feats = m._image_features(prepared)
    rows = [Row(torch.tensor(p.input_ids), f, options) for p, f in zip(prepared, feats)]
    index = {id(r): i for i, r in enumerate(rows)}
    got: dict[tuple[int, int], torch.Tensor] = {}
    loop = DecodeLoop(m.module, frozenset(), m.config.rope_switch,
                      lambda row, k, lg: got.__setitem__((index[id(row)], k), lg.clone()))
    list(run_rows(loop, rows))
    for r, row in enumerate(rows):
        want = []
        state = GenerationState(row.prompt_ids, row.image_embeds, m.module.new_cache())
        list(generate_ids(m.module, state, options, frozenset(), m.config.rope_switch,
                          logits_hook=lambda k, lg, out=want: out.append(lg)))
        want = torch.stack(want)
        have = torch.stack([got[(r, k)] for k in range(len(want))])
        assert (have - want).abs().max() < 1e-4 * want.abs().max(), f"row {r}"


def test_bad_batches_are_rejected(model):
    p = model.prepare(prompt="Hi")
    with pytest.raises(Phi3VError, match="at least one"):
        model.generate_batch([])
    with pytest.raises(Phi3VError, match="2 GenerationOptions given for 1"):
        model.generate_batch([p], [Opts(), Opts()])
    small = load(model.model_dir, image_cache_mb=0, prefix_cache=False, max_context=8)
    with pytest.raises(PromptTooLongError):
        small.generate_batch([small.prepare(prompt="Hi"), small.prepare(prompt="word " * 20)])


def test_rows_ending_on_a_stop_id_equal_alone(tiny_model_dir):
    """Random weights rarely produce <|end|>: make a token that row 1 produces a stop id."""
    m = load(tiny_model_dir, image_cache_mb=0, prefix_cache=False)
    prepared = [m.prepare(prompt="Alpha beta"), m.prepare(prompt="Gamma", images=[picture(10)]),
                m.prepare(prompt="Delta epsilon zeta eta")]
    options = Opts(max_new_tokens=10)
    probe = m.generate(prepared[1], options).token_ids
    m.stop_ids = m.stop_ids | {probe[3]}
    single = alone(m, prepared, [options] * 3)
    assert single[1].finish_reason == "stop" and single[1].token_ids[-1] == probe[3]
    assert_same(m.generate_batch(prepared, options), single)
