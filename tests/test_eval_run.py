"""`phi3v eval` end to end on the tiny random checkpoint: two variants, the store, the reports.

Random weights answer nonsense, so accuracy is near 0: what is checked is the plumbing (every
record answered under every variant, resume, features reused across variants), the agreement
figures against the answers themselves, and the HTML page (self-contained; no console errors in
headless Chromium).
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest

from phi3v.eval.records import EvalRecord
from phi3v.eval.summary import summarise
from phi3v.eval.variants import parse_variants

try:
    import matplotlib  # noqa: F401  (the eval extra: the sample set's charts)
except ImportError:  # in CI (CI=true) a missing extra fails instead of skipping
    if os.environ.get("CI", "").lower() in ("1", "true"):
        raise
    pytest.skip("the sample set needs matplotlib: pip install 'phi3v[eval]'", allow_module_level=True)


@pytest.fixture(scope="module")
def evaluated(tiny_model_dir, tmp_path_factory):
    """The sample set (seed 5), its first 6 records under bf16 and int8, through the CLI."""
    from phi3v.cli.main import main

    folder = tmp_path_factory.mktemp("eval")
    assert main(["eval", "--make-sample", str(folder / "sample"), "--seed", "5"]) == 0
    argv = ["eval", str(folder / "sample" / "records.jsonl"), "--out", str(folder / "report.json"),
            "--variants", "bf16,int8", "--model", str(tiny_model_dir), "--device", "cpu", "--max-tokens", "4",
            "--limit", "6", "--quiet"]
    assert main(argv) == 0
    return folder, argv


def test_every_record_is_answered_under_both_variants(evaluated):
    folder, _ = evaluated
    report = json.loads((folder / "report.json").read_text())
    assert report["records"] == 6 and [v["name"] for v in report["variants"]] == ["bf16", "int8"]
    lines = [json.loads(x) for x in (folder / "report.results.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and all(x["error"] is None for x in lines)
    assert {(x["variant"], x["record"]) for x in lines} == {(v, r["id"]) for v in ("bf16", "int8")
                                                           for r in report["rows"]}
    for v in report["variants"]:
        assert v["answered"] == 6 and v["errors"] == 0
        assert 0 < v["mean_tokens"] <= 4 and v["ttft_s"] > 0 and v["seconds_per_record"] > 0
        assert set(v["accuracy"]) == {r["metric"] for r in report["rows"]}
        assert 0.0 <= v["score"] <= 1.0


def test_agreement_matches_the_answers(evaluated):
    folder, _ = evaluated
    report = json.loads((folder / "report.json").read_text())
    rows = report["rows"]
    same = [r["predictions"]["bf16"]["key"] == r["predictions"]["int8"]["key"] for r in rows]
    assert report["variants"][0]["agreement"] == 1.0  # the reference agrees with itself
    assert report["variants"][1]["agreement"] == pytest.approx(sum(same) / len(rows))
    assert report["disagreements"] == [r["id"] for r, s in zip(rows, same) if not s]


def test_int8_reuses_the_bf16_image_features(evaluated):
    folder, _ = evaluated
    report = json.loads((folder / "report.json").read_text())
    bf16, int8 = report["variants"]
    assert int8["features_reused"] == 1.0  # same vision tower, same dtype: every image from the cache
    assert bf16["features_reused"] < 1.0  # the first question about each image computed them
    assert int8["vision_s"] < bf16["vision_s"]


def test_features_skip_a_variant_of_another_dtype(evaluated, tiny_model_dir, run_cli):
    """bf16, fp32, int8: fp32 encodes its own features, int8 still takes bf16's."""
    folder, _ = evaluated
    code, _, err = run_cli("eval", folder / "sample" / "records.jsonl", "--out", folder / "dtypes.json",
                           "--variants", "bf16,fp32,int8", "--model", tiny_model_dir, "--device", "cpu",
                           "--max-tokens", "2", "--limit", "3", "--quiet")
    assert code == 0, err
    bf16, fp32, int8 = json.loads((folder / "dtypes.json").read_text())["variants"]
    assert int8["features_reused"] == 1.0
    assert fp32["features_reused"] == bf16["features_reused"] < 1.0  # the same within-variant reuse only


def test_rerun_resumes_and_a_changed_setting_asks_again(evaluated, run_cli):
    folder, argv = evaluated
    store = folder / "report.results.jsonl"
    before = store.read_text()
    code, out, err = run_cli(*argv[:-1])  # same command (not quiet): nothing left to ask
    assert code == 0 and store.read_text() == before
    assert "0 answers" in err and "12 already" in err
    assert re.search(r"^bf16\s+6/6", out, re.M) and re.search(r"^int8\s+6/6", out, re.M)
    code, out, err = run_cli(*argv[:-5], "--max-tokens", "3", "--limit", "6", "--quiet")
    assert code == 0 and "12 answers" in err  # a new setting: new keys in the store


def test_html_is_self_contained(evaluated):
    folder, _ = evaluated
    page = (folder / "report.html").read_text()
    report = json.loads((folder / "report.json").read_text())
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page
    assert "<svg" in page and page.count('<circle class="point"') == 2  # one point per variant
    assert "<th>variant</th>" in page and "bf16" in page and "int8" in page
    shown = report["disagreements"]
    assert f"disagree ({len(shown)} of 6)" in page
    for rid in shown:
        assert f'id="r-{rid}"' in page
    if shown:
        assert "data:image/jpeg;base64," in page


def test_video_records_reach_the_engine_video_input(tiny_model, tmp_path):
    """A folder-of-frames "video" goes through prepare(video=...): all its frames become images."""
    from PIL import Image

    from phi3v.eval.readers import read_data
    from phi3v.eval.runner import EvalRun

    for i in range(3):
        (tmp_path / "frames").mkdir(exist_ok=True)
        Image.new("RGB", (40, 30), (60 * i, 90, 30)).save(tmp_path / "frames" / f"{i}.png")
    data = tmp_path / "v.jsonl"
    data.write_text(json.dumps({"id": "clip", "video": "frames", "question": "q", "answers": ["a"]}) + "\n"
                    + json.dumps({"id": "one", "images": ["frames/0.png"], "question": "q", "answers": ["a"]}) + "\n"
                    + json.dumps({"id": "gone", "images": ["nope.png"], "question": "q", "answers": ["a"]}) + "\n")
    run = EvalRun(read_data(data), parse_variants("fp32", "2"), model="tiny", results=tmp_path / "r.jsonl",
                  load=lambda variant: tiny_model, max_new_tokens=2)
    run.run()
    answers = run.answers()
    clip, one = answers[("fp32", "clip")], answers[("fp32", "one")]
    assert clip["error"] is None and one["error"] is None
    assert clip["usage"]["image_tokens"] == 3 * one["usage"]["image_tokens"]  # three frames, same size
    assert answers[("fp32", "gone")]["error"].startswith("ImageError")  # a bad record fails alone
    from phi3v.eval.report_html import render_html
    from phi3v.eval.summary import summarise

    report = summarise(run.records, run.variants, answers)
    assert report["variants"][0]["errors"] == 1 and report["variants"][0]["answered"] == 2
    assert "ImageError" in render_html(report)


def test_num_crops_and_prompt_variants(evaluated, tiny_model_dir, run_cli):
    folder, _ = evaluated
    code, out, err = run_cli("eval", folder / "sample" / "records.jsonl", "--out", folder / "grid.json",
                             "--variants", "fp32", "--num-crops", "1,4", "--prompt", "{question}",
                             "--prompt", "Q: {question} A:", "--model", tiny_model_dir, "--device", "cpu",
                             "--max-tokens", "2", "--limit", "2", "--quiet")
    assert code == 0, err
    report = json.loads((folder / "grid.json").read_text())
    names = [v["name"] for v in report["variants"]]
    assert names == ["fp32/c1/p1", "fp32/c1/p2", "fp32/c4/p1", "fp32/c4/p2"]
    assert "fp32/c4/p2: num_crops 4, prompt 'Q: {question} A:'" in out
    lines = [json.loads(x) for x in (folder / "grid.results.jsonl").read_text().splitlines()]
    by = {(x["variant"], x["record"]): x for x in lines}
    rid = report["rows"][0]["id"]
    assert by[("fp32/c1/p2", rid)]["prompt"] == "Q: " + report["rows"][0]["question"] + " A:"
    assert by[("fp32/c1/p1", rid)]["usage"]["image_tokens"] < by[("fp32/c4/p1", rid)]["usage"]["image_tokens"]
    # the same pixels and features serve both prompts of one num_crops
    assert report["variants"][1]["features_reused"] == 1.0


def test_summary_agreement_and_disagreements_by_hand():
    records = [EvalRecord(id=str(i), images=(), sources=(), question="q", answers=("A",), metric="choice",
                          choices=("x", "y")) for i in range(4)]
    variants = parse_variants("bf16,int4")

    def line(text):
        return {"text": text, "error": None, "usage": {"completion_tokens": 2},
                "timings": {"preprocess_s": 0.1, "vision_s": 0.05, "prefill_s": 0.35,
                            "first_token_s": 0.5, "decode_s": 0.25, "decode_tokens_per_s": 4.0}}

    answers = {("bf16", "0"): line("A"), ("int4", "0"): line("(A)"),  # same letter
               ("bf16", "1"): line("A"), ("int4", "1"): line("B"),
               ("bf16", "2"): line("B"), ("int4", "2"): line("It is y"),  # y = B
               ("bf16", "3"): line("A"), ("int4", "3"): {"error": "ImageError: x", "text": None}}
    report = summarise(records, variants, answers)
    bf16, int4 = report["variants"]
    assert bf16["accuracy"] == {"choice": 0.75} and int4["accuracy"] == {"choice": pytest.approx(1 / 3)}
    assert int4["score"] == pytest.approx(1 / 4)  # the error scores 0
    assert int4["agreement"] == pytest.approx(2 / 3)  # over the 3 records both answered
    assert int4["errors"] == 1 and int4["answered"] == 3
    assert report["disagreements"] == ["1"]
    assert bf16["ttft_s"] == 0.5 and bf16["tokens_per_s"] == 4.0 and bf16["seconds_per_record"] == 0.75


# -- the page in a real browser ------------------------------------------------------------------

CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--no-first-run"]


def _chromium() -> str | None:
    for candidate in (os.environ.get("PHI3V_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def test_html_opens_in_chromium_without_console_errors(evaluated):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail("playwright is required in CI")
        pytest.skip("playwright is not installed")
    exe = _chromium()
    if exe is None:
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail("Debian's chromium is required in CI")
        pytest.skip("chromium is not installed")
    folder, _ = evaluated
    problems, requests = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto((folder / "report.html").as_uri())
            page.wait_for_load_state("load")
            assert page.locator("svg circle.point").count() == 2
            assert page.locator("table").first.locator("tr").count() == 3  # header + 2 variants
            broken = page.evaluate("[...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).length")
            assert broken == 0
            page.set_viewport_size({"width": 1280, "height": 900})
            page.click("summary")  # every record's answers unfolded: long answers wrap, no sideways scroll
            assert page.evaluate("document.documentElement.scrollWidth") <= 1280
        finally:
            browser.close()
    assert problems == []
    assert all(u.startswith(("file:", "data:")) for u in requests)  # nothing from the network


@pytest.mark.slow
def test_ray_gives_the_local_answers(evaluated, monkeypatch):
    """--ray: each variant's records on a fresh local Ray cluster (Ray Data actors loading the
    variant's weights); greedy answers equal the local run's, into the same kind of store."""
    pytest.importorskip("ray.data", reason="Ray Data is not installed: pip install 'phi3v[ray]'")
    from phi3v.cli.main import main

    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    folder, argv = evaluated
    out = folder / "ray" / "report.json"
    ray_argv = [a for a in argv if a != "--quiet"]
    ray_argv[ray_argv.index("--out") + 1] = str(out)
    ray_argv[ray_argv.index("--limit") + 1] = "2"
    assert main(ray_argv + ["--ray", "--ray-actors", "1", "--quiet"]) == 0

    def texts(path):  # the first answer per (variant, record): the max-tokens-4 run's
        out = {}
        for x in map(json.loads, path.read_text().splitlines()):
            out.setdefault((x["variant"], x["record"]), x["text"])
        return out

    remote, local = texts(folder / "ray" / "report.results.jsonl"), texts(folder / "report.results.jsonl")
    assert len(remote) == 4 and all(remote[k] == local[k] for k in remote)
    report = json.loads(out.read_text())
    assert [v["answered"] for v in report["variants"]] == [2, 2]
