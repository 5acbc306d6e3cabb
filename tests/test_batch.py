"""Batch jobs: input discovery, the resumable JSONL store, the local runner, run_batch and the CLI.

The runner logic (ordering, batching, error isolation) is checked with a fake model whose
answers are a function of the request; the end-to-end runs use the session's tiny checkpoint
(conftest.tiny_model) and compare each record's greedy text with `model.ask` on the same
request, which is the contract: a batch job gives what the API gives, one record at a time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from phi3v.batch.runner import RESULT_KEYS, iter_job_results, run_batch
from phi3v.batch.records import Record, discover, resolve_jobs
from phi3v.batch.store import ResultStore, done_ids, read_results
from phi3v.errors import ImageError, Phi3VError
from phi3v.options import GenerationOptions
from phi3v.results import Completion, Timings, Usage
from phi3v.tasks import task_prompt

MAX_TOKENS = 6  # tiny model, greedy: short answers keep the tests fast
GEN = {"max_new_tokens": MAX_TOKENS, "num_crops": 1}  # 1 crop = 313 image tokens per image


def write_images(folder: Path, names, seed: int = 0) -> list[Path]:
    """Small random RGB PNG/JPEGs (different sizes so image token counts differ)."""
    rng = np.random.default_rng(seed)
    paths = []
    for k, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (32 + 8 * k, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


# ------------------------------------------------------------------------------------------
# Input discovery
# ------------------------------------------------------------------------------------------


def test_folder_input_is_recursive_image_files_only(tmp_path):
    write_images(tmp_path, ["b.png", "a.jpg", "sub/c.png", "sub/deeper/d.PNG"])
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.png").write_bytes(b"skipped: hidden")
    write_images(tmp_path, [".cache/e.png"])

    found = discover(tmp_path)
    assert found.kind == "folder"
    assert [r.id for r in found.records] == ["a.jpg", "b.png", "sub/c.png", "sub/deeper/d.PNG"]
    c = found.records[2]
    assert c.images == (str(tmp_path / "sub" / "c.png"),)
    assert c.sources == (str((tmp_path / "sub" / "c.png").resolve()),)


def test_glob_input_and_single_image(tmp_path):
    write_images(tmp_path, ["x1.png", "x2.png", "y.png", "sub/x3.png"])
    found = discover(str(tmp_path / "**" / "x*.png"))
    assert found.kind == "glob"
    assert sorted(Path(r.id).name for r in found.records) == ["x1.png", "x2.png", "x3.png"]
    single = discover(tmp_path / "y.png")
    assert [r.id for r in single.records] == ["y.png"]


def test_missing_or_unsupported_input_is_an_error(tmp_path):
    with pytest.raises(Phi3VError, match="does not exist"):
        discover(tmp_path / "nope")
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(Phi3VError, match="neither a folder"):
        discover(tmp_path / "data.csv")


def test_jsonl_records_ids_and_relative_paths(tmp_path):
    write_images(tmp_path / "imgs", ["a.png", "b.png"])
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("\n".join([
        json.dumps({"id": "first", "images": ["imgs/a.png"], "prompt": "What is it?"}),
        "",  # blank lines are skipped
        json.dumps({"id": 17, "image": "imgs/b.png", "task": "ocr"}),
        json.dumps({"images": ["imgs/b.png"]}),
        json.dumps({"images": ["imgs/a.png", "https://example.com/c.png"], "task": "compare"}),
    ]) + "\n")
    records = discover(jsonl).records
    assert [r.id for r in records] == ["first", "17", "imgs/b.png", "line-5"]
    assert records[0].prompt == "What is it?" and records[0].task is None
    assert records[1].task == "ocr"
    assert records[0].sources == (str((tmp_path / "imgs" / "a.png").resolve()),)
    assert records[3].sources[1] == "https://example.com/c.png"  # URLs pass unchanged


@pytest.mark.parametrize("line, message", [
    ("{not json", r"in\.jsonl:1: not valid JSON"),
    (json.dumps({"images": ["a.png"], "promt": "typo"}), r"unknown key\(s\) \['promt'\]"),
    (json.dumps({"images": "a.png", "image": "b.png"}), "not both"),
    (json.dumps({"images": [3]}), "list of non-empty strings"),
    (json.dumps(["a.png"]), "must be a JSON object"),
    (json.dumps({"id": True, "images": []}), "'id' must be"),
])
def test_bad_jsonl_lines_name_the_line(tmp_path, line, message):
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text(line + "\n")
    with pytest.raises(Phi3VError, match=message):
        discover(jsonl)


def test_duplicate_ids_are_rejected(tmp_path):
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text(json.dumps({"id": "x", "images": []}) + "\n"
                     + json.dumps({"id": "x", "images": []}) + "\n")
    with pytest.raises(Phi3VError, match="duplicate record id 'x'"):
        discover(jsonl)


def test_prompt_precedence_and_task_rules():
    def rec(i, images=("a.png",), prompt=None, task=None):
        return Record(id=i, images=images, sources=images, prompt=prompt, task=task)

    records = [
        rec("own-prompt", prompt="Own?", task="ocr"),
        rec("own-task", task="ocr"),
        rec("job-default"),
        rec("compare-one", task="compare"),
        rec("compare-two", images=("a.png", "b.png"), task="compare"),
        rec("ask-no-question", task="ask"),
    ]
    jobs = {j.id: j for j in resolve_jobs(records, task="table", prompt=None, fmt="csv")}
    assert jobs["own-prompt"].prompt == "Own?" and jobs["own-prompt"].task == "ocr"
    assert jobs["own-task"].prompt == task_prompt("ocr")  # a record's task: its default format
    assert jobs["job-default"].prompt == task_prompt("table", "csv")
    assert jobs["job-default"].task == "table"
    assert "compare needs at least 2 images" in jobs["compare-one"].error
    assert jobs["compare-two"].error is None and jobs["compare-two"].prompt == task_prompt("compare")
    assert "needs a question" in jobs["ask-no-question"].error

    asked = resolve_jobs([rec("q")], task="ask", prompt="How many?")
    assert (asked[0].task, asked[0].prompt, asked[0].error) == ("ask", "How many?", None)
    nothing = resolve_jobs([rec("n")], task=None, prompt=None)
    assert nothing[0].task == "ask" and "needs a question" in nothing[0].error


# ------------------------------------------------------------------------------------------
# The output store
# ------------------------------------------------------------------------------------------


def test_store_skips_a_truncated_tail_and_appends_on_a_fresh_line(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"id": "a", "error": None}) + "\n"
                   + json.dumps({"id": "b", "error": "ImageError: x"}) + "\n"
                   + '{"id": "c", "text": "cut by a ki')  # killed mid-write: no newline
    assert set(read_results(out)) == {"a", "b"}
    with ResultStore(out) as store:
        store.append({"id": "c", "error": None})
    text = out.read_text()
    assert text.endswith('"error": null}\n')
    assert set(read_results(out)) == {"a", "b", "c"}
    assert text.count("\n") == 4  # the broken line stays, on its own line


def test_done_ids_latest_line_wins_with_retry_errors(tmp_path):
    out = tmp_path / "out.jsonl"
    with ResultStore(out) as store:
        store.append({"id": "ok", "error": None})
        store.append({"id": "fixed", "error": "ImageError: bad"})
        store.append({"id": "fixed", "error": None})
        store.append({"id": "broken", "error": "ImageError: bad"})
    results = read_results(out)
    assert done_ids(results, retry_errors=False) == {"ok", "fixed", "broken"}
    assert done_ids(results, retry_errors=True) == {"ok", "fixed"}


def test_store_refuses_a_second_writer(tmp_path):
    pytest.importorskip("fcntl")
    out = tmp_path / "out.jsonl"
    with ResultStore(out):
        with pytest.raises(Phi3VError, match="another batch job"):
            ResultStore(out).open()
    with ResultStore(out):  # released on close
        pass


# ------------------------------------------------------------------------------------------
# The local runner, with a fake model
# ------------------------------------------------------------------------------------------


class FakeModel:
    """The engine's prepare/generate shapes; the answer is the prompt and image names."""

    def __init__(self):
        self.generate_calls = 0

    def prepare(self, prompt=None, images=(), num_crops=None, image_policy=None, system=None):
        for image in images:
            if "bad" in image:
                raise ImageError(f"{image} is not an image")
        return SimpleNamespace(prompt=prompt, images=list(images))

    def _complete(self, prepared):
        text = prepared.prompt + "|" + ",".join(Path(i).name for i in prepared.images)
        if "boom" in text:
            raise RuntimeError("generation failed")
        return Completion(text, "stop", Usage(prompt_tokens=3, completion_tokens=2), Timings())

    def generate(self, prepared, options):
        self.generate_calls += 1
        return self._complete(prepared)


class FakeBatchedModel(FakeModel):
    def __init__(self):
        super().__init__()
        self.batch_sizes = []

    def generate_batch(self, prepared_list, options):
        self.batch_sizes.append(len(prepared_list))
        return [self._complete(p) for p in prepared_list]  # one failure fails the whole call


def fake_jobs(names, prompt="Q"):
    records = [Record(id=n, images=(n,), sources=(n,)) for n in names]
    return resolve_jobs(records, task="ask", prompt=prompt)


def test_runner_keeps_input_order_and_isolates_bad_records():
    names = [f"img{k}.png" for k in range(7)] + ["bad.png", "img8.png"]
    results = list(iter_job_results(FakeModel(), fake_jobs(names), GenerationOptions(),
                                    batch_size=1, workers=3))
    assert [r["id"] for r in results] == names
    assert [r["error"] is None for r in results] == [n != "bad.png" for n in names]
    bad = results[names.index("bad.png")]
    assert bad["error"] == "ImageError: bad.png is not an image" and bad["text"] is None
    assert results[0]["text"] == "Q|img0.png"
    assert set(results[0]) == set(RESULT_KEYS)


def test_runner_uses_generate_batch_and_falls_back_per_record():
    model = FakeBatchedModel()
    names = ["a.png", "b.png", "c.png", "d.png", "boom.png", "f.png", "g.png"]
    results = list(iter_job_results(model, fake_jobs(names), GenerationOptions(), batch_size=3))
    assert [r["id"] for r in results] == names
    # groups [a b c] [d boom f] [g]: the second group's batch call fails, so its records are
    # retried one by one and only the bad one is an error; a group of one uses generate().
    assert model.batch_sizes == [3, 3]
    assert model.generate_calls == 3 + 1
    assert [r["error"] for r in results if r["error"]] == ["RuntimeError: generation failed"]
    assert results[5]["text"] == "Q|f.png"


def test_runner_without_generate_batch_goes_one_by_one():
    model = FakeModel()
    results = list(iter_job_results(model, fake_jobs(["a", "b", "c"]), GenerationOptions(),
                                    batch_size=2))
    assert model.generate_calls == 3 and all(r["error"] is None for r in results)


def test_run_batch_accepts_records_and_counts(tmp_path):
    out = tmp_path / "out.jsonl"
    records = [{"id": "one", "images": ["a.png"], "prompt": "P1"},
               {"id": "two", "images": ["bad.png"], "prompt": "P2"}]
    job = run_batch(records, FakeModel(), out=out)
    assert [r["text"] for r in job] == ["P1|a.png", None]
    assert (job.stats.done, job.stats.errors, job.stats.skipped) == (2, 1, 0)
    assert "2 done, 1 errors, 0 skipped" in job.stats.summary(out)
    assert list(job) == []  # a job runs once
    again = run_batch(records, FakeModel(), out=out)
    assert list(again) == [] and again.stats.skipped == 2


def test_stopping_the_iterator_keeps_what_finished(tmp_path):
    out = tmp_path / "out.jsonl"
    records = [{"id": f"r{k}", "images": [f"{k}.png"], "prompt": "P"} for k in range(6)]
    job = run_batch(records, FakeModel(), out=out)
    iterator = iter(job)
    next(iterator), next(iterator)
    iterator.close()  # like a KeyboardInterrupt in the loop body
    assert job.stats.interrupted and [r["id"] for r in lines_of(out)] == ["r0", "r1"]
    resumed = run_batch(records, FakeModel(), out=out).run()
    assert (resumed.skipped, resumed.done) == (2, 4)
    assert sorted(r["id"] for r in lines_of(out)) == [f"r{k}" for k in range(6)]


# ------------------------------------------------------------------------------------------
# End to end on the tiny checkpoint
# ------------------------------------------------------------------------------------------


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "imgs"
    write_images(folder, ["a.png", "b.jpg", "sub/c.png", "sub/d.png"])
    return folder


@pytest.mark.parametrize("batch_size", [1, 2])
def test_full_run_equals_the_api_one_by_one(tiny_model, image_folder, tmp_path, batch_size):
    out = tmp_path / "out.jsonl"
    job = run_batch(image_folder, tiny_model, task="describe", out=out, batch_size=batch_size,
                    **GEN)
    yielded = list(job)
    written = lines_of(out)
    assert written == yielded
    assert [r["id"] for r in written] == ["a.png", "b.jpg", "sub/c.png", "sub/d.png"]
    for r in written:
        assert set(r) == set(RESULT_KEYS) and r["error"] is None
        assert r["task"] == "describe" and r["prompt"] == task_prompt("describe")
        expected = tiny_model.ask(r["prompt"], images=[image_folder / r["id"]], **GEN)
        assert r["text"] == expected.text
        assert r["finish_reason"] == expected.finish_reason
        assert r["usage"] == expected.usage.to_dict()
        assert r["usage"]["image_tokens"] > 0 and r["timings"]["preprocess_s"] > 0
    assert (job.stats.done, job.stats.errors) == (4, 0)


def test_corrupt_image_is_an_error_record_and_retry_errors_reruns_it(tiny_model, image_folder,
                                                                     tmp_path):
    (image_folder / "sub" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    out = tmp_path / "out.jsonl"
    job = run_batch(image_folder, tiny_model, task="ocr", out=out, **GEN)
    by_id = {r["id"]: r for r in job}
    assert (job.stats.done, job.stats.errors) == (5, 1)
    assert by_id["sub/broken.png"]["error"].startswith("ImageError:")
    assert by_id["sub/broken.png"]["text"] is None
    assert all(r["error"] is None for i, r in by_id.items() if i != "sub/broken.png")

    # A plain rerun skips everything, failed records included.
    rerun = run_batch(image_folder, tiny_model, task="ocr", out=out, **GEN)
    assert list(rerun) == [] and rerun.stats.skipped == 5

    # Fix the file; --retry-errors runs only that record, and its new line wins.
    write_images(image_folder, ["sub/broken.png"], seed=3)
    retry = run_batch(image_folder, tiny_model, task="ocr", out=out, retry_errors=True, **GEN)
    assert [r["id"] for r in retry] == ["sub/broken.png"]
    assert retry.stats.skipped == 4
    latest = read_results(out)
    assert latest["sub/broken.png"]["error"] is None and latest["sub/broken.png"]["text"]
    assert [r["id"] for r in lines_of(out)].count("sub/broken.png") == 2


def test_jsonl_input_with_per_record_prompts(tiny_model, image_folder, tmp_path):
    jsonl = tmp_path / "requests.jsonl"
    rows = [
        {"id": "q1", "images": ["imgs/a.png"], "prompt": "What colour dominates?"},
        {"id": "q2", "images": ["imgs/b.jpg"], "task": "ocr"},
        {"id": 3, "image": "imgs/sub/c.png"},  # the job's --prompt
        {"id": "pair", "images": ["imgs/a.png", "imgs/sub/d.png"], "task": "compare"},
        {"id": "lonely", "images": ["imgs/a.png"], "task": "compare"},  # needs two images
        {"id": "text-only", "images": [], "prompt": "Say hi."},
    ]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "answers.jsonl"
    job = run_batch(jsonl, tiny_model, prompt="Count the shapes.", out=out, **GEN)
    by_id = {r["id"]: r for r in job}
    assert list(by_id) == ["q1", "q2", "3", "pair", "lonely", "text-only"]

    expected_prompts = {"q1": "What colour dominates?", "q2": task_prompt("ocr"),
                        "3": "Count the shapes.", "pair": task_prompt("compare"),
                        "text-only": "Say hi."}
    for rid, prompt in expected_prompts.items():
        r = by_id[rid]
        assert r["error"] is None and r["prompt"] == prompt
        images = [tmp_path / i for i in r["images"]]
        assert r["text"] == tiny_model.ask(prompt, images=images, **GEN).text
    assert by_id["pair"]["usage"]["image_tokens"] > by_id["q1"]["usage"]["image_tokens"]
    assert by_id["text-only"]["usage"]["image_tokens"] == 0
    assert "compare needs at least 2 images" in by_id["lonely"]["error"]
    assert job.stats.errors == 1


def test_cli_batch_writes_results_and_a_summary(tiny_model_dir, image_folder, tmp_path, capsys):
    from phi3v.cli.main import main

    (image_folder / "zz-bad.png").write_bytes(b"garbage")
    out = tmp_path / "cli.jsonl"
    argv = ["batch", str(image_folder), "--out", str(out), "--task", "describe", "-q",
            "--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "float32",
            "--num-crops", "1", "--max-tokens", str(MAX_TOKENS)]
    assert main(argv) == 1  # finished, with a failed record
    err = capsys.readouterr().err
    assert "batch finished: 5 done, 1 errors, 0 skipped (of 5)" in err
    assert "--retry-errors" in err
    written = lines_of(out)
    assert [r["id"] for r in written] == ["a.png", "b.jpg", "sub/c.png", "sub/d.png", "zz-bad.png"]

    os.remove(image_folder / "zz-bad.png")
    assert main(argv) == 0  # the failed record is gone from the input: nothing left to do
    assert "0 done, 0 errors, 4 skipped (of 4)" in capsys.readouterr().err


def test_cli_batch_usage_errors(tmp_path, capsys):
    from phi3v.cli.main import main

    assert main(["batch", str(tmp_path), "--out", str(tmp_path / "o.jsonl")]) == 1
    assert "give --task or --prompt" in capsys.readouterr().err
    assert main(["batch", str(tmp_path / "missing"), "--task", "ocr",
                 "--out", str(tmp_path / "o.jsonl")]) == 1
    assert "does not exist" in capsys.readouterr().err
