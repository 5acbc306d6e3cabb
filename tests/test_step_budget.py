"""The step budget: how big a newcomer's pieces are while rows decode, from measured step times
(engine/step_budget.py). Pure arithmetic on given times; the loop's use of it is in
tests/test_vision_pieces.py."""

from __future__ import annotations

import pytest

from phi3v.engine.step_budget import StepBudget


def test_fixed_pieces_until_a_plain_decode_step_is_measured():
    budget = StepBudget(0.5, 32, 1024)
    assert budget.prefill_tokens(fused=True) == 32
    assert not budget.more_vision(0.0, 0.001)
    budget.saw_prefill(32, 0.5)  # a rate alone is not enough: the target is relative to a decode step
    assert budget.prefill_tokens(fused=True) == 32


def test_chunk_is_the_measured_rate_times_the_target_step_time():
    budget = StepBudget(0.5, 16, 1024)
    budget.saw_decode(0.4)
    budget.saw_prefill(100, 1.0)  # 100 tokens/s
    # fused: the chunk's time is the step's, target (1 + 0.5) * 0.4 s = 0.6 s -> 60 tokens
    assert budget.prefill_tokens(fused=True) == 60
    # a pass of its own after the decode step: share * 0.4 s = 0.2 s -> 20 tokens
    assert budget.prefill_tokens(fused=False) == 20


def test_chunk_grows_at_most_twice_the_last_and_stays_within_the_bounds():
    budget = StepBudget(1.0, 16, 200)
    budget.saw_decode(1.0)
    budget.saw_prefill(16, 0.01)  # a fast machine: 1600 tokens/s measured on 16 tokens
    assert budget.prefill_tokens(fused=True) == 32, "twice the last chunk, not 3200"
    budget.saw_prefill(32, 0.02)
    assert budget.prefill_tokens(fused=True) == 64
    budget.saw_prefill(128, 0.08)
    assert budget.prefill_tokens(fused=True) == 200, "never past max_tokens"
    slow = StepBudget(1.0, 16, 200)
    slow.saw_decode(0.1)
    slow.saw_prefill(16, 10.0)  # 1.6 tokens/s
    assert slow.prefill_tokens(fused=True) == 16, "never under the configured minimum"


def test_moving_averages_follow_new_measurements():
    budget = StepBudget(1.0, 1, 10_000)
    budget.saw_decode(1.0)
    budget.saw_decode(3.0)
    assert budget.decode_s == pytest.approx(2.0)
    budget.saw_prefill(100, 1.0)
    budget.saw_prefill(300, 1.0)
    assert budget.rate == pytest.approx(200.0)
    budget.saw_prefill(0, 1.0)  # nothing prefilled: no sample
    budget.saw_prefill(10, 0.0)
    assert budget.rate == pytest.approx(200.0)


def test_vision_pieces_continue_while_the_next_one_fits_the_share():
    budget = StepBudget(0.5, 32, 1024)
    budget.saw_decode(1.0)  # newcomer work may add 0.5 s to a step
    assert budget.more_vision(0.2, 0.2)
    assert budget.more_vision(0.3, 0.2)
    assert not budget.more_vision(0.35, 0.2)


def test_no_share_means_fixed_pieces_and_no_minimum_means_whole_prompts():
    fixed = StepBudget(None, 32, 1024)
    fixed.saw_decode(0.1)
    fixed.saw_prefill(32, 0.01)
    assert fixed.prefill_tokens(fused=True) == 32 and not fixed.more_vision(0.0, 0.0)
    whole = StepBudget(0.5, None, 1024)
    whole.saw_decode(0.1)
    assert whole.prefill_tokens(fused=True) is None and not whole.active


def test_serve_step_budget_reaches_the_loop(tiny_model_dir):
    """phi3v serve --step-budget F -> the worker's loops size pieces with share F; 0 = fixed pieces."""
    import phi3v
    from phi3v.cli.main import build_parser
    from phi3v.cli.serve import settings_from_args
    from phi3v.server.app import create_app

    model = phi3v.load(str(tiny_model_dir), device="cpu", dtype="float32", progress=False)
    for argv, share in ((["serve"], 0.75), (["serve", "--step-budget", "1.5"], 1.5), (["serve", "--step-budget", "0"], None)):
        settings = settings_from_args(build_parser().parse_args(argv))
        loop = create_app(model, settings).state.worker._new_loop()  # not started: no lifespan here
        assert loop.budget.share == share, argv
        assert loop.budget.min_tokens == settings.prefill_chunk == 32
    with pytest.raises(SystemExit):
        settings_from_args(build_parser().parse_args(["serve", "--step-budget", "-1"]))
