"""Bounded vision calls, and newcomers' vision and prefill interleaved with the running rows' steps.

The vision tower encodes at most `vision_chunk` crops per CLIP call, with features equal to one
call over every crop (float32, within 1e-5 of the largest value; same layout and order). In a
DecodeLoop, a newcomer's images are encoded one piece per step and its prompt prefilled at most
`prefill_chunk` tokens per step while other rows run (whole when alone); the running rows get a
token every step and every row equals its run alone. Tiny checkpoint, float32 on CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import phi3v
import phi3v.engine.generate as generate_module
from phi3v.engine.running_batch import RunningBatch
from phi3v.errors import Phi3VError
from phi3v.options import GenerationOptions as Opts


def load(model_dir, **kw):
    return phi3v.load(str(model_dir), device="cpu", dtype="float32", progress=False, **kw)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load(tiny_model_dir, image_cache_mb=0, prefix_cache=False)


def picture(seed: int, h: int = 200, w: int = 420) -> np.ndarray:
    return (np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8)


def on_clip_call(model, record, request):
    """record(crops) at every CLIP call (the tower's vision_model forward) until the test ends."""
    tower = model.module.model.vision_embed_tokens.img_processor.vision_model
    handle = tower.register_forward_hook(lambda mod, args, out: record(int(args[0].shape[0])))
    request.addfinalizer(handle.remove)


def clip_calls(model, request) -> list[int]:
    """The crops of every CLIP call, as a list that grows."""
    calls: list[int] = []
    on_clip_call(model, calls.append, request)
    return calls


def real_crops(batch) -> int:
    return sum(1 + (int(h) // 336) * (int(w) // 336) for h, w in batch.image_sizes.tolist())


def three_images(model):
    """A prompt with images of different crop counts (num_crops 4: up to 5 crops each)."""
    images = [picture(1), picture(2, 90, 60), picture(3, 400, 300)]
    return model.prepare(prompt="Compare them.", images=images, num_crops=4)


@pytest.mark.parametrize("chunk", [1, 2, 3, 4])
def test_pieces_of_at_most_vision_chunk_crops_equal_one_call(model, chunk, request):
    prepared = three_images(model)
    pixels, sizes = prepared.images.pixel_values, prepared.images.image_sizes
    total = real_crops(prepared.images)
    vision = model.module.model.vision_embed_tokens
    calls = clip_calls(model, request)
    whole = vision.encoding(pixels, sizes, chunk=0).run()
    assert calls == [total], "chunk 0: every real crop in one call"
    calls.clear()
    pieces = vision.encoding(pixels, sizes, chunk=chunk).run()
    # full pieces across image boundaries, the last one holds what is left
    assert calls == [chunk] * (total // chunk) + ([total % chunk] if total % chunk else [])
    assert len(pieces) == len(whole) == 3
    for k, (a, b) in enumerate(zip(pieces, whole)):
        assert a.shape == b.shape == (prepared.images.num_img_tokens[k], model.config.text.hidden_size)
        assert (a - b).abs().max() <= 1e-5 * b.abs().max(), f"image {k}"


def test_forward_and_the_feature_path_follow_the_load_setting(tiny_model_dir, request):
    chunked = load(tiny_model_dir, image_cache_mb=0, prefix_cache=False, vision_chunk=2)
    prepared = three_images(chunked)
    calls = clip_calls(chunked, request)
    feats = chunked.image_embeddings(prepared.images.pixel_values, prepared.images.image_sizes)  # forward
    assert max(calls) == 2 and sum(calls) == real_crops(prepared.images)
    calls.clear()
    via_cache_path = chunked._image_features([prepared])[0]
    assert max(calls) == 2 and sum(calls) == real_crops(prepared.images)
    for a, b in zip(feats, via_cache_path):
        assert torch.equal(a, b)
    chunked.images.vision_chunk = 0  # all at once
    calls.clear()
    chunked._image_features([prepared])
    assert calls == [real_crops(prepared.images)]
    with pytest.raises(Phi3VError, match="vision_chunk"):
        chunked.images.vision_chunk = -1
    with pytest.raises(Phi3VError, match="vision_chunk"):
        load(tiny_model_dir, vision_chunk=1.5)


def endless(loop):
    """The loop's rows end only at max_new_tokens (a random model may pick a stop id early)."""
    loop.stop_ids = frozenset()
    return loop


def start(model, prepared, n: int):
    """A row of n tokens, without text assembly (whose stop ids would end it)."""
    row = model.start_row(prepared, Opts(max_new_tokens=n))
    row.text = None
    return row


def alone(model, prepared, n: int) -> list[int]:
    """Its token ids run alone (the model's own vision pieces, whole-prompt prefill)."""
    loop = endless(model.new_loop())
    row = loop.add(start(model, prepared, n))
    while loop.busy:
        loop.step()
    return row.generated


def test_pieces_split_by_layers_equal_whole_pieces(tiny_checkpoint, request):
    """vision_layers: a piece goes through the tower's layers over several steps (at most that
    many layers each) with the same features as whole pieces, bit for bit."""
    deep = load(tiny_checkpoint("phi3v", vision_layers=5, num_crops=2), image_cache_mb=0, prefix_cache=False)
    clip = deep.module.model.vision_embed_tokens.img_processor.vision_model
    depth = len(clip.encoder.layers)
    assert depth == 4  # layer_idx -2: the last layer is not built
    ran: list[int] = []
    for i, layer in enumerate(clip.encoder.layers):
        handle = layer.register_forward_hook(lambda mod, a, out, i=i: ran.append(i))
        request.addfinalizer(handle.remove)
    prepared = three_images(deep)
    pixels, sizes = prepared.images.pixel_values, prepared.images.image_sizes
    vision = deep.module.model.vision_embed_tokens
    whole = vision.encoding(pixels, sizes, chunk=3).run()
    ran.clear()
    encoding = vision.encoding(pixels, sizes, chunk=3)
    steps = 0
    while not encoding.done:
        before = len(ran)
        encoding.step(layers=3)
        assert 1 <= len(ran) - before <= 3, "at most 3 layers per step"
        steps += 1
    pieces = -(-real_crops(prepared.images) // 3)
    assert steps == 2 * pieces and ran == [0, 1, 2, 3] * pieces  # 3 + 1 layers per piece, in order
    for a, b in zip(encoding.features, whole):
        assert torch.equal(a, b)
    # in a loop: with a row running, every step runs at most vision_layers layers of the newcomer's piece
    loop = endless(deep.new_loop(prefill_chunk=64, vision_chunk=2, vision_layers=1))
    first = loop.add(start(deep, deep.prepare(prompt="Keep talking."), 200))
    loop.step()
    second = loop.add(start(deep, prepared, 2))
    ran.clear()
    while second.features is not None:
        before = len(ran)
        assert [r for r, _ in loop.step()] == [first]
        assert len(ran) - before <= 1
    assert len(ran) == depth * -(-real_crops(prepared.images) // 2)
    while not second.done:
        loop.step()
    assert second.generated == alone(deep, prepared, 2)


class Recorder:
    """The order of things in a DecodeLoop: ("piece", crops) per CLIP call, ("prefill", tokens) per
    prefill call or prefill part fused into the running rows' pass (engine/fused_step.py),
    ("token", tag) per token a row received, ("step",) at each step's end."""

    def __init__(self, model, monkeypatch, request):
        self.events: list[tuple] = []
        on_clip_call(model, lambda crops: self.events.append(("piece", crops)), request)
        real = generate_module.prefill

        def prefill(m, embeds, start, cache):
            self.events.append(("prefill", int(embeds.shape[0])))
            return real(m, embeds, start, cache)

        monkeypatch.setattr(generate_module, "prefill", prefill)
        real_fused = RunningBatch.step_with

        def step_with(batch, tokens, others, want_logits):
            self.events.extend(("prefill", int(g.embeds.shape[1])) for g in others)
            return real_fused(batch, tokens, others, want_logits)

        monkeypatch.setattr(RunningBatch, "step_with", step_with)

    def step(self, loop, tags: dict) -> list:
        events = loop.step()
        for row, _ in events:
            if row.generated and not row.done or row.finish_reason in ("stop", "length"):
                self.events.append(("token", tags[id(row)]))
        self.events.append(("step",))
        return events

    def between_steps(self) -> list[list[tuple]]:
        """The events grouped by step."""
        steps, now = [], []
        for e in self.events:
            if e == ("step",):
                steps.append(now)
                now = []
            else:
                now.append(e)
        return steps


def test_newcomer_images_and_prefill_interleave_with_the_running_row(model, monkeypatch, request):
    """One row streams; a newcomer with three images (num_crops 4) joins: its images go a piece
    (<= vision_chunk crops) per step, then its prompt <= prefill_chunk tokens per step, and the
    streaming row gets a token in every step. Both equal their runs alone."""
    streaming = model.prepare(prompt="Keep talking.")
    newcomer = three_images(model)
    want = [alone(model, streaming, 120), alone(model, newcomer, 5)]
    rec = Recorder(model, monkeypatch, request)
    loop = endless(model.new_loop(prefill_chunk=64, vision_chunk=2))  # ~2000 prompt tokens: ~32 steps
    first = loop.add(start(model, streaming, 120))
    tags = {id(first): "streaming"}
    rec.step(loop, tags)
    rec.events.clear()
    second = start(model, newcomer, 5)
    assert second.features is not None and second.image_embeds == [], "its images are left to the loop"
    tags[id(second)] = "newcomer"
    loop.add(second)
    while not second.done:
        assert not first.done, "the streaming row must outlive the newcomer"
        rec.step(loop, tags)
    steps = rec.between_steps()
    pieces = [e[1] for e in rec.events if e[0] == "piece"]
    assert sum(pieces) == real_crops(newcomer.images) and max(pieces) <= 2 and len(pieces) >= 4
    first_prefill = next(i for i, e in enumerate(rec.events) if e[0] == "prefill")
    assert all(e[0] != "piece" for e in rec.events[first_prefill:]), "prefill starts once its features are in"
    for n, step in enumerate(steps):
        assert ("token", "streaming") in step, f"step {n}: the streaming row got no token: {step}"
        work = [e for e in step if e[0] in ("piece", "prefill")]
        assert len([e for e in work if e[0] == "piece"]) <= 1, f"step {n}: one vision piece at most"
        assert not (any(e[0] == "piece" for e in work) and any(e[0] == "prefill" for e in work)), \
            f"step {n}: a vision piece and a prefill chunk in one step"
        assert sum(e[1] for e in work if e[0] == "prefill") <= 64, f"step {n}: prefill budget exceeded"
    # between every two vision pieces, the streaming row received a token
    order = [e for e in rec.events if e[0] == "piece" or e == ("token", "streaming")]
    for a, b in zip(order, order[1:]):
        assert not (a[0] == "piece" and b[0] == "piece"), "two vision pieces without a token between"
    assert second.timings.vision_s > 0
    while loop.busy:
        loop.step()
    assert [first.generated, second.generated] == want


def test_prefill_budget_applies_while_rows_run_not_alone(model, monkeypatch, request):
    prompt = model.prepare(prompt="A long prompt that needs several chunks " * 6)
    n = len(prompt.input_ids)
    assert n > 3 * 16
    rec = Recorder(model, monkeypatch, request)
    loop = endless(model.new_loop(prefill_chunk=16))
    first = loop.add(start(model, prompt, 30))
    rec.step(loop, {id(first): "alone"})
    assert [e for e in rec.events if e[0] == "prefill"] == [("prefill", n)], "alone: the whole prompt at once"
    assert first.generated, "and its first token in the same step"
    rec.events.clear()
    joining = loop.add(start(model, prompt, 2))
    while any(r is joining for r in loop.waiting):
        rec.step(loop, {id(first): "alone", id(joining): "joining"})
    chunks = [e[1] for e in rec.events if e[0] == "prefill"]
    assert chunks == [16] * (n // 16) + ([n % 16] if n % 16 else [])
    for step in rec.between_steps():
        assert ("token", "alone") in step


def test_cancel_in_the_vision_stage_frees_it_and_stops_its_pieces(model, monkeypatch, request):
    streaming = model.prepare(prompt="Keep talking.")
    rec = Recorder(model, monkeypatch, request)
    loop = endless(model.new_loop(prefill_chunk=16, vision_chunk=1))
    first = loop.add(start(model, streaming, 40))
    tags = {id(first): "streaming"}
    rec.step(loop, tags)
    second = loop.add(start(model, three_images(model), 5))
    tags[id(second)] = "newcomer"
    for _ in range(3):
        rec.step(loop, tags)
    assert second.features is not None, "still in its vision stage"
    loop.cancel(second)
    assert second.finish_reason == "cancelled" and second.features is None and second.cache is None
    assert not loop.waiting
    pieces = len([e for e in rec.events if e[0] == "piece"])
    assert pieces == 3
    while loop.busy:
        rec.step(loop, tags)
    assert len([e for e in rec.events if e[0] == "piece"]) == pieces, "no piece after the cancel"
    assert second.completion().finish_reason == "cancelled" and second.generated == []
    assert first.generated == alone(model, streaming, 40)


def test_a_failure_in_one_newcomers_vision_fails_only_that_row(model, monkeypatch):
    """A newcomer whose pixels the tower rejects fails alone; the running row and a second
    newcomer with an image go on and equal their runs alone."""
    vision = model.module.model.vision_embed_tokens
    real_encode = vision.encode_crops

    def encode_crops(crops):
        if torch.isnan(crops).any():
            raise RuntimeError("the vision tower got pixels it cannot encode")
        return real_encode(crops)

    monkeypatch.setattr(vision, "encode_crops", encode_crops)
    streaming = model.prepare(prompt="Keep talking.")
    good = model.prepare(prompt="What is it?", images=[picture(7, 60, 90)], num_crops=2)
    bad = three_images(model)
    bad.images.pixel_values = bad.images.pixel_values.clone()
    bad.images.pixel_values[1] = float("nan")  # its second image
    want = [alone(model, streaming, 40), alone(model, good, 4)]
    loop = endless(model.new_loop(prefill_chunk=16, vision_chunk=2))
    rows = [loop.add(start(model, streaming, 40))]
    loop.step()
    rows += [loop.add(start(model, bad, 4)), loop.add(start(model, good, 4))]
    failed = []
    while loop.busy:
        failed += [row for row, _ in loop.step() if row.finish_reason == "error"]
    assert failed == [rows[1]] and "cannot encode" in str(rows[1].error)
    assert rows[1].features is None and rows[1].generated == []
    assert [rows[0].generated, rows[2].generated] == want


def newcomer_work_per_step(model, monkeypatch, request, streaming_tokens: int = 80, **loop_kw):
    """A streaming row, then a newcomer with three images joins -> (the newcomer's work grouped by
    step, both rows' tokens, what they give alone). Every step must give the streaming row a token."""
    streaming = model.prepare(prompt="Keep talking.")
    newcomer = three_images(model)
    rec = Recorder(model, monkeypatch, request)
    loop = endless(model.new_loop(**loop_kw))
    first = loop.add(start(model, streaming, streaming_tokens))
    tags = {id(first): "streaming"}
    for _ in range(3):  # plain decode steps: the budget measures one
        rec.step(loop, tags)
    rec.events.clear()
    second = loop.add(start(model, newcomer, 5))
    tags[id(second)] = "newcomer"
    while any(r is second for r in loop.waiting):
        assert not first.done
        rec.step(loop, tags)
    steps = rec.between_steps()
    for n, step in enumerate(steps):
        assert ("token", "streaming") in step, f"step {n}: the streaming row got no token: {step}"
    work = [[e for e in step if e[0] in ("piece", "prefill")] for step in steps]
    while loop.busy:
        loop.step()
    got = [first.generated, second.generated]
    return work, got, [alone(model, streaming, streaming_tokens), alone(model, newcomer, 5)]


def test_a_step_budget_runs_vision_pieces_back_to_back_and_grows_prefill_chunks(model, monkeypatch, request):
    """step_budget: pieces sized from measured times. With a budget no step can exhaust, the
    newcomer's vision pieces (each <= vision_chunk crops) all run in its first step, and its
    prefill chunks double from prefill_chunk each step; the streaming row still gets a token every
    step and both rows equal their runs alone."""
    work, got, want = newcomer_work_per_step(model, monkeypatch, request, prefill_chunk=16, vision_chunk=2,
                                             step_budget=1e9)
    assert got == want
    pieces = [e[1] for e in work[0]]
    assert all(e[0] == "piece" for e in work[0]) and max(pieces) <= 2 and len(pieces) >= 4
    assert all(e[0] != "piece" for step in work[1:] for e in step), "every piece in the first step"
    chunks = [e[1] for step in work[1:] for e in step]
    assert all(len(step) == 1 for step in work[1:]), "one prefill part per step"
    doubling = [16 * 2**i for i in range(len(chunks))]
    assert chunks[:-1] == doubling[:-1] and chunks[-1] <= doubling[-1], chunks


def test_a_step_budget_too_small_for_a_second_piece_keeps_one_piece_per_step(model, monkeypatch, request):
    work, got, want = newcomer_work_per_step(model, monkeypatch, request, streaming_tokens=300,
                                             prefill_chunk=64, vision_chunk=2, step_budget=1e-9)
    assert got == want
    assert all(len(step) <= 1 for step in work), "one vision piece or one prefill part per step"
    chunks = [e[1] for step in work for e in step if e[0] == "prefill"]
    assert len(chunks) > 2 and max(chunks) == 64, "the prefill chunk stays at its minimum"
