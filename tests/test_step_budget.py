"""The step budget: how big a newcomer's pieces are while rows decode, from measured step times
(engine/step_budget.py). Pure arithmetic on given times; the loop's use of it is in
tests/test_vision_pieces.py."""

from __future__ import annotations

import pytest

from phi3v.engine.step_budget import StepBudget


def test_fixed_pieces_until_a_plain_decode_step_is_measured():
    budget = StepBudget(2.5, 32, 1024)
    assert budget.prefill_tokens() == 32 and budget.budget_s() == 0.0
    assert not budget.more_vision(0.0, 0.001)
    budget.saw_prefill(32, 0.5, fused=False)  # a rate alone is not enough: the budget is relative to decode
    assert budget.prefill_tokens() == 32
    budget.saw_prefill(32, 0.5, fused=True)  # and a fused step's rate needs the decode time it contains
    assert budget.rate == pytest.approx(64.0)


def test_budget_is_a_multiple_of_the_fastest_decode_step_less_the_current_one():
    budget = StepBudget(2.5, 16, 1024)
    budget.saw_decode(0.4)  # one row
    assert budget.budget_s() == pytest.approx(2.5 * 0.4 - 0.4)
    budget.saw_decode(0.8)  # more rows: the average rises, the fastest stays
    assert budget.fastest_s == pytest.approx(0.4) and budget.decode_s == pytest.approx(0.6)
    assert budget.budget_s() == pytest.approx(1.0 - 0.6)
    for _ in range(10):
        budget.saw_decode(1.2)  # so many rows that a plain step already takes 3x: no room
    assert budget.budget_s() == 0.0 and not budget.more_vision(0.0, 0.0001)


def test_chunk_is_the_marginal_prefill_rate_times_the_budget():
    budget = StepBudget(2.0, 16, 1024)
    budget.saw_decode(0.4)  # budget 0.4 s
    budget.saw_prefill(32, 0.72, fused=True)  # 0.72 s = 0.4 s of decode + 32 tokens at 100 tokens/s
    assert budget.rate == pytest.approx(100.0)
    assert budget.prefill_tokens() == 40
    separate = StepBudget(2.0, 16, 1024)
    separate.saw_decode(0.4)
    separate.saw_prefill(32, 0.32, fused=False)  # a pass of its own: all of it is prefill
    assert separate.prefill_tokens() == 40


def test_chunk_grows_at_most_twice_the_last_and_stays_within_the_bounds():
    budget = StepBudget(3.0, 16, 200)
    budget.saw_decode(0.5)  # budget 1 s
    budget.saw_prefill(16, 0.51, fused=True)  # a fast machine: 1600 tokens/s measured on 16 tokens
    assert budget.prefill_tokens() == 32, "twice the last chunk, not 1600"
    budget.saw_prefill(32, 0.52, fused=True)
    assert budget.prefill_tokens() == 64
    budget.saw_prefill(128, 0.58, fused=True)
    assert budget.prefill_tokens() == 200, "never past max_tokens"
    slow = StepBudget(3.0, 16, 200)
    slow.saw_decode(0.1)
    slow.saw_prefill(16, 10.0, fused=False)  # 1.6 tokens/s
    assert slow.prefill_tokens() == 16, "never under the configured minimum"


def test_moving_averages_follow_new_measurements():
    budget = StepBudget(3.0, 1, 10_000)
    budget.saw_decode(1.0)
    budget.saw_decode(3.0)
    assert budget.decode_s == pytest.approx(2.0) and budget.fastest_s == pytest.approx(1.0)
    budget.saw_prefill(100, 1.0, fused=False)
    budget.saw_prefill(300, 1.0, fused=False)
    assert budget.rate == pytest.approx(200.0)
    budget.saw_prefill(0, 1.0, fused=False)  # nothing prefilled: no sample
    budget.saw_prefill(10, 1.5, fused=True)  # faster than the decode it contains: no sample
    assert budget.rate == pytest.approx(200.0)


def test_vision_pieces_continue_while_the_next_one_fits_the_budget():
    budget = StepBudget(1.5, 32, 1024)
    budget.saw_decode(1.0)  # newcomer work may add 0.5 s to a step
    assert budget.more_vision(0.2, 0.2)
    assert budget.more_vision(0.3, 0.2)
    assert not budget.more_vision(0.35, 0.2)


def test_no_factor_means_fixed_pieces_and_no_minimum_means_whole_prompts():
    fixed = StepBudget(None, 32, 1024)
    fixed.saw_decode(0.1)
    fixed.saw_prefill(32, 0.01, fused=False)
    assert fixed.prefill_tokens() == 32 and not fixed.more_vision(0.0, 0.0)
    whole = StepBudget(2.5, None, 1024)
    whole.saw_decode(0.1)
    assert whole.prefill_tokens() is None and not whole.active


def test_serve_step_budget_reaches_the_loop(tiny_model_dir):
    """phi3v serve --step-budget F -> the worker's loops size pieces with factor F; 0 = fixed pieces."""
    import phi3v
    from phi3v.cli.main import build_parser
    from phi3v.cli.serve import settings_from_args
    from phi3v.server.app import create_app

    model = phi3v.load(str(tiny_model_dir), device="cpu", dtype="float32", progress=False)
    for argv, factor in ((["serve"], 2.5), (["serve", "--step-budget", "1.5"], 1.5),
                         (["serve", "--step-budget", "0"], None)):
        settings = settings_from_args(build_parser().parse_args(argv))
        loop = create_app(model, settings).state.worker._new_loop()  # not started: no lifespan here
        assert loop.budget.factor == factor, argv
        assert loop.budget.min_tokens == settings.prefill_chunk == 32
    with pytest.raises(SystemExit):
        settings_from_args(build_parser().parse_args(["serve", "--step-budget", "-1"]))
