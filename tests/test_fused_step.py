"""A newcomer's prefill chunk fused with the running rows' decode step (engine/fused_step.py).

Tolerances: in fp32 the fused pass computes the same per-token products as the separate passes,
only in larger matmuls (another summation order), so logits agree to 1e-5 of the largest logit
(measured ~4e-7). Quantized layers round activations to bf16 and pick their kernel by row count
(quant/layers.py PREFILL_ROWS: B + C rows may take another kernel than B or C rows alone), so
int8/int4 agree to bf16 rounding: 2e-2 of the largest logit (measured ~9e-3); so does a bf16 model
(few rows: the native kernels, more: torch's GEMM). KV caches: same bounds.
"""

from __future__ import annotations

import pytest
import torch

import phi3v
from phi3v.engine.decoder import build_attention_mask
from phi3v.engine.fused_step import Group
from phi3v.engine.generate import DecodeLoop, Row, prefill
from phi3v.engine.running_batch import RunningBatch
from phi3v.options import GenerationOptions as Opts

FLOAT_TOL, QUANT_TOL = 1e-5, 2e-2


@pytest.fixture(scope="module")
def reduced(tiny_checkpoint):
    """int8 and int4 models of one tiny checkpoint whose hidden size (128) fits int4's groups, and
    the same in bf16 (the native decode kernels' dtype: DecodeLinear and one-query attention)."""
    folder = tiny_checkpoint("phi3v", hidden_size=128, intermediate_size=256, num_heads=4)
    models = {q: phi3v.load(str(folder), device="cpu", dtype="float32", progress=False, quantize=q)
              for q in ("int8", "int4")}
    models["bf16"] = phi3v.load(str(folder), device="cpu", dtype="bfloat16", progress=False)
    return models


def ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(100, 32000, (n,), generator=torch.Generator().manual_seed(seed))


def running_batch(module, lengths: list[int]) -> RunningBatch:
    """Rows with prompts of these lengths, prefilled alone and joined (left padding when unequal)."""
    batch = RunningBatch(module)
    for k, n in enumerate(lengths):
        cache = module.new_cache()
        prefill(module, module.embed(ids(n, 10 + k)), 0, cache)
        batch.join(cache)
    return batch


def newcomer(module, prefix: int, chunk: int, seed: int) -> Group:
    """A newcomer's chunk of `chunk` tokens after `prefix` tokens already in its own cache."""
    embeds = module.embed(ids(prefix + chunk + 3, seed))  # (L, hidden), more prompt follows the chunk
    cache = module.new_cache()
    if prefix:
        prefill(module, embeds[:prefix], 0, cache)
    positions = torch.arange(prefix, prefix + chunk)[None]  # (1, C)
    return Group(embeds[None, prefix:prefix + chunk], positions, cache, build_attention_mask(chunk, prefix, None, "cpu"))


def separate_and_fused(module, lengths, chunks):
    """The same state twice: the rows' step and each chunk as their own passes, and all in one
    fused pass -> (separate logits, fused logits, separate caches, fused caches)."""
    tokens = ids(len(lengths), 99).tolist()
    results = []
    for fused in (False, True):
        batch = running_batch(module, lengths)
        groups = [newcomer(module, p, c, 50 + k) for k, (p, c) in enumerate(chunks)]
        with torch.inference_mode():
            if fused:
                logits = batch.step_with(tokens, groups, [True] * len(groups))  # (B + k, V)
            else:
                rows = batch.step(tokens)
                last = [module.logits(module.forward_hidden(g.embeds, g.positions, g.cache, g.mask)[0, -1])
                        for g in groups]
                logits = torch.cat([rows, torch.stack(last)])
        caches = [batch.cache] + [g.cache for g in groups]
        results.append((logits, caches))
    (want, want_caches), (have, have_caches) = results
    return want, have, want_caches, have_caches


def assert_close(want, have, tol, what):
    err = float((have - want).abs().max())
    assert err <= tol * float(want.abs().max()), f"{what}: max error {err}"


def assert_caches_close(want_caches, have_caches, tol):
    for a, b in zip(want_caches, have_caches):
        assert (a.length, a.batch) == (b.length, b.batch)
        for layer in range(a.num_layers):
            for x, y in ((a.k[layer], b.k[layer]), (a.v[layer], b.v[layer])):
                assert_close(x[:, :, :a.length], y[:, :, :a.length], tol, f"layer {layer} cache")


@pytest.mark.parametrize("lengths,chunks", [
    ([6], [(0, 1)]),                # one row, a one-token chunk of a fresh prompt
    ([6], [(0, 32)]),               # one row, a first chunk
    ([5, 9, 7], [(0, 16)]),         # left-padded rows
    ([5, 9, 7], [(20, 16)]),        # a later chunk, after a prefix (reused or prefilled before)
    ([4, 4, 11, 8, 6, 7, 9, 5, 12], [(12, 5)]),  # more rows than the native kernels' 8
    ([8, 3], [(0, 7), (13, 9)]),    # two newcomers' parts in the same pass
])
def test_fused_step_equals_separate_passes(tiny_model, lengths, chunks):
    want, have, want_caches, have_caches = separate_and_fused(tiny_model.module, lengths, chunks)
    assert have.shape == want.shape == (len(lengths) + len(chunks), want.shape[1])
    assert_close(want, have, FLOAT_TOL, "logits")
    assert_caches_close(want_caches, have_caches, FLOAT_TOL)


@pytest.mark.parametrize("scheme", ["int8", "int4", "bf16"])
@pytest.mark.parametrize("lengths,chunks", [([5, 9], [(0, 16)]), ([7, 3, 6], [(24, 30)])])
def test_fused_step_in_reduced_precision(reduced, scheme, lengths, chunks):
    module = reduced[scheme].module
    want, have, want_caches, have_caches = separate_and_fused(module, lengths, chunks)
    assert_close(want, have, QUANT_TOL, f"{scheme} logits")
    assert_caches_close(want_caches, have_caches, QUANT_TOL)
    # bf16 rounding may move a logit, never the picks of these random rows
    assert bool((want.argmax(-1) == have.argmax(-1)).all())


def passes_per_step(model, fuse: bool, reuse_prefix: int):
    """One row decodes; a newcomer (its first `reuse_prefix` tokens cached already) prefills in
    chunks of 8 -> (decoder passes in each step while it prefilled, both rows' tokens)."""
    module = model.module
    calls = []
    hook = module.model.layers[0].self_attn.qkv_proj.register_forward_hook(lambda *_: calls.append(1))
    try:
        loop = DecodeLoop(module, frozenset(), model.config.rope_switch, prefill_chunk=8, fuse_prefill=fuse)
        first = loop.add(Row(ids(6, 1), [], Opts(max_new_tokens=20)))
        loop.step()
        prompt = ids(37, 2)
        cache = None
        if reuse_prefix:
            cache = module.new_cache()
            prefill(module, module.embed(prompt[:reuse_prefix]), 0, cache)
        second = loop.add(Row(prompt, [], Opts(max_new_tokens=6), cache=cache, reuse_prefix=reuse_prefix))
        per_step = []
        while any(r is second for r in loop.waiting):
            calls.clear()
            loop.step()
            per_step.append(len(calls))
        while loop.busy:
            loop.step()
    finally:
        hook.remove()
    return per_step, first.generated, second.generated


def alone(model, prompt, n: int) -> list[int]:
    loop = DecodeLoop(model.module, frozenset(), model.config.rope_switch)
    row = loop.add(Row(prompt, [], Opts(max_new_tokens=n)))
    while loop.busy:
        loop.step()
    return row.generated


@pytest.mark.parametrize("reuse_prefix", [0, 13])
def test_one_decoder_pass_per_step_while_a_newcomer_prefills(tiny_model, reuse_prefix):
    fused, *fused_tokens = passes_per_step(tiny_model, True, reuse_prefix)
    separate, *separate_tokens = passes_per_step(tiny_model, False, reuse_prefix)
    chunks = -(-(37 - reuse_prefix) // 8)
    assert fused == [1] * chunks, "the rows' step and the newcomer's chunk share one pass"
    assert separate == [2] * chunks, "fuse_prefill=False: a pass of its own"
    want = [alone(tiny_model, ids(6, 1), 20), alone(tiny_model, ids(37, 2), 6)]
    assert fused_tokens == separate_tokens == want


def test_serve_separate_prefill_reaches_the_loop(tiny_model_dir):
    """phi3v serve --separate-prefill -> the app's worker runs prefill chunks apart; default fused."""
    from phi3v.cli.main import build_parser
    from phi3v.cli.serve import settings_from_args
    from phi3v.server.app import create_app

    model = phi3v.load(str(tiny_model_dir), device="cpu", dtype="float32", progress=False)  # the app sets its caches
    for argv, fuse in ((["serve"], True), (["serve", "--separate-prefill"], False)):
        settings = settings_from_args(build_parser().parse_args(argv))
        worker = create_app(model, settings).state.worker  # not started: no lifespan here
        assert worker._new_loop().fuse_prefill is fuse


@pytest.mark.parametrize("rope_switch", ["mixed", "recompute"])
def test_fused_steps_keep_the_long_rope_rules(tiny_checkpoint, rope_switch):
    """Phi-3.5-vision with its RoPE boundary at SHORT_ROPE tokens: a running row crosses it while
    newcomers prefill (under "recompute" the crossing step re-prefills it, unfused), one newcomer's
    prompt is past the boundary (prefilled whole, fused, with the long factors), another goes in
    chunks of 16. Every row's greedy tokens equal its run alone."""
    from conftest import SHORT_ROPE

    model = phi3v.load(str(tiny_checkpoint("phi35v", original_max_position_embeddings=SHORT_ROPE)),
                       device="cpu", dtype="float32", progress=False)
    module, switch = model.module, rope_switch
    prompts = [ids(SHORT_ROPE - 3, 5), ids(SHORT_ROPE + 20, 6), ids(70, 7)]
    lengths = [30, 4, 4]

    def run(rows_at: dict[int, list[int]], chunk):
        loop = DecodeLoop(module, frozenset(), switch, prefill_chunk=chunk)
        rows = [Row(p, [], Opts(max_new_tokens=n)) for p, n in zip(prompts, lengths)]
        step = 0
        while step == 0 or loop.busy:
            for k in rows_at.get(step, []):
                loop.add(rows[k])
            loop.step()
            step += 1
        return [r.generated for r in rows]

    want = [run({0: [k]}, None)[k] for k in range(3)]
    assert run({0: [0], 1: [1], 2: [2]}, 16) == want
