"""The benchmark's plumbing (no timing assertions): ratio orientation, the plan, the report, and
phi3v's bench engine on the golden tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

from phi3v.bench.report import BASELINE, build_report, markdown_table, ratio, summary
from phi3v.bench.workloads import Plan, bench_image, run_plan

GOLDEN = Path(__file__).parent / "golden" / "models" / "tiny-phi3v"


def test_ratios_say_how_many_times_better_phi3v_is():
    assert ratio("decode_short_tok_s", 6.0, 2.0) == 3.0  # rates: ours / theirs
    assert ratio("ttft_1img_nc16_s", 2.0, 6.0) == 3.0  # seconds: theirs / ours
    assert ratio("x_s", 0.0, 1.0) is None
    assert summary([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}


class FakeEngine:
    def __init__(self):
        self.calls = []

    def encode_crops(self, crops):
        self.calls.append(("vision", crops.shape[0]))

    def first_token(self, messages, num_crops):
        self.calls.append(("ttft", num_crops))
        return 1.0

    def followup_first_token(self, turn1, question, num_crops, answer_tokens):
        return 0.5

    def prefill(self, ids):
        self.calls.append(("prefill", len(ids)))

    def decode_times(self, prompt_ids, n, context=0):
        return [float(i) for i in range(n)]  # one token per second


def test_plan_runs_every_metric_with_its_repeats():
    plan = Plan(repeats=2, heavy_repeats=1, crops=(1, 17), ttft_num_crops=(4,), prefill_tokens=8,
                decode_tokens=5, long_context=64)
    engine = FakeEngine()
    metrics = run_plan(engine, plan, log=lambda m: None)
    assert set(metrics) == {"preprocess_nc4_s", "vision_1crops_s", "vision_17crops_s", "ttft_1img_nc4_s",
                            "prefill_8_tok_s", "decode_short_tok_s", "decode_ctx64_tok_s", "followup_ttft_nc4_s"}
    assert len(metrics["vision_1crops_s"]) == 2 and len(metrics["vision_17crops_s"]) == 1
    assert metrics["decode_short_tok_s"] == [1.0, 1.0]  # (n - 1) tokens over (n - 1) seconds
    assert ("prefill", 8) in engine.calls and ("vision", 17) in engine.calls
    plan.vision = False
    assert not any(m.startswith(("vision", "ttft", "preprocess", "followup"))
                   for m in run_plan(FakeEngine(), plan, log=lambda m: None))


def test_bench_image_gives_the_documented_crop_counts():
    from phi3v.engine.image import crop_grid

    img = bench_image()
    assert crop_grid(*img.size, 4) == (2, 2) and crop_grid(*img.size, 16) == (4, 4)


def _worker(decode: float, ttft: float, peak: float) -> dict:
    return {"load_s": 1.0, "rss_after_load_gib": 1.0, "peak_rss_gib": peak + 1, "peak_rss_e2e_gib": peak,
            "metrics": {"decode_short_tok_s": [decode, decode], "ttft_1img_nc16_s": [ttft]}}


def test_report_ratios_goals_and_table():
    results = {BASELINE: _worker(2.0, 30.0, 9.0), "phi3v-bf16": _worker(3.0, 15.0, 8.5),
               "phi3v-int4": _worker(7.0, 15.0, 3.5)}
    env = {"read_bandwidth_gbs": 20.0, "decode_bytes_per_token": {"int4": 2e9}, "bf16_weight_gib": 8.0}
    report = build_report(results, env)
    assert report["ratios"]["phi3v-bf16"]["decode_short_tok_s"] == pytest.approx(1.5)
    assert report["ratios"]["phi3v-bf16"]["ttft_1img_nc16_s"] == pytest.approx(2.0)
    goals = {g["goal"]: g["met"] for g in report["goals"]}
    assert goals["phi3v-bf16 decode vs transformers bf16"] is True
    assert goals["phi3v-int4 decode vs transformers bf16"] is False  # 3.5x < 4x
    assert goals["phi3v-int4 decode vs its bandwidth bound"] is True  # 7 of 10 tok/s
    assert goals["phi3v-int4 decode vs its bandwidth bound (issue 15)"] is False  # 70% < 80%
    assert goals["phi3v-int4 peak RSS end to end (load + one image, num_crops 16)"] is True
    table = markdown_table(report)
    row = next(line for line in table.splitlines() if line.startswith("| decode_short_tok_s |"))
    assert row.split(" | ")[1:] == ["2.000 (2.000-2.000)", "3.000 (3.000-3.000) **1.50x**",
                                    "7.000 (7.000-7.000) **3.50x** |"]


def test_phi3v_engine_decode_with_a_prefilled_context():
    from phi3v.bench.engines import PhiEngine

    engine = PhiEngine(GOLDEN, "float32", "int4")
    engine.load()
    times = engine.decode_times([1, 2, 3], 4, context=40)
    assert len(times) == 4 and times == sorted(times)
    assert engine.first_token([{"role": "user", "content": "hi"}], 4) > 0
