"""Batch jobs with structured output: the job's --schema, per-record "schema" in JSONL, the result's
"parsed", a bad schema failing its record alone; on the tiny random checkpoint.
"""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
from PIL import Image

from phi3v.batch.records import Record, resolve_jobs
from phi3v.batch.runner import RESULT_KEYS, run_batch
from phi3v.tasks import TABLE_SCHEMA

GEN = {"max_new_tokens": 400, "num_crops": 1}
SHORT = {"type": "string", "maxLength": 10}
TOTAL = {"type": "object", "additionalProperties": False, "required": ["total", "shop"],
         "properties": {"total": {"type": "integer", "minimum": 0, "maximum": 999}, "shop": SHORT}}
YES_NO = {"type": "string", "enum": ["yes", "no"]}
POINTS = {"type": "array", "maxItems": 3, "items": {"type": "object", "additionalProperties": False,
                                                    "required": ["x"], "properties": {"x": {"type": "integer"}}}}


@pytest.fixture
def inputs(tmp_path):
    rng = np.random.default_rng(2)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(tmp_path / name)
    rows = [
        {"id": "total", "image": "a.png", "prompt": "The total?", "schema": TOTAL},
        {"id": "yes-no", "image": "b.png", "prompt": "A receipt?", "schema": YES_NO},
        {"id": "job-schema", "image": "a.png", "prompt": "Points?"},  # the job's schema (or none)
        {"id": "missing-ref", "image": "b.png", "prompt": "Bad.",
         "schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}}},
        {"id": "not-an-object", "image": "b.png", "prompt": "Bad.", "schema": "yes or no"},
        {"id": "points", "image": "b.png", "prompt": "Points?", "schema": POINTS},
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "points.json").write_text(json.dumps(POINTS))
    return tmp_path


@pytest.mark.parametrize("batch_size", [1, 4])
def test_per_record_schemas_give_parsed_results_and_a_bad_one_fails_alone(tiny_model, inputs, batch_size):
    out = inputs / f"out{batch_size}.jsonl"
    job = run_batch(inputs / "in.jsonl", tiny_model, out=out, batch_size=batch_size, **GEN)
    by_id = {r["id"]: r for r in job}
    assert all(set(r) == set(RESULT_KEYS) for r in by_id.values())
    for rid, schema in (("total", TOTAL), ("yes-no", YES_NO), ("points", POINTS)):
        r = by_id[rid]
        assert r["error"] is None and r["finish_reason"] == "stop", r
        assert r["parsed"] == json.loads(r["text"])
        jsonschema.validate(r["parsed"], schema)
    assert by_id["job-schema"]["error"] is None and by_id["job-schema"]["parsed"] is None  # free text
    assert "Pointer '/$defs/nope' does not exist" in by_id["missing-ref"]["error"]
    assert "'schema' must be a JSON Schema object, got str" in by_id["not-an-object"]["error"]
    assert (job.stats.done, job.stats.errors) == (6, 2)
    written = {json.loads(line)["id"]: json.loads(line) for line in out.read_text().splitlines()}
    assert written == by_id  # "parsed" is in the file too


def test_the_same_record_alone_and_in_a_batch_is_the_same_answer(tiny_model, inputs):
    alone = {r["id"]: r["text"] for r in run_batch(inputs / "in.jsonl", tiny_model, batch_size=1, **GEN)}
    batched = {r["id"]: r["text"] for r in run_batch(inputs / "in.jsonl", tiny_model, batch_size=6, **GEN)}
    assert alone == batched


def test_cli_batch_schema_applies_to_records_without_their_own(run_cli, tiny_model_dir, inputs):
    out = inputs / "cli.jsonl"
    code, _, err = run_cli("batch", inputs / "in.jsonl", "--out", out, "--schema", inputs / "points.json",
                           "--model", tiny_model_dir, "--device", "cpu", "--dtype", "float32",
                           "--num-crops", "1", "--max-tokens", "400", "-q")
    assert code == 1 and "6 done, 2 errors" in err  # the two bad records
    by_id = {json.loads(line)["id"]: json.loads(line) for line in out.read_text().splitlines()}
    jsonschema.validate(by_id["job-schema"]["parsed"], POINTS)
    jsonschema.validate(by_id["yes-no"]["parsed"], YES_NO)  # its own schema wins

    code, _, err = run_cli("batch", inputs / "in.jsonl", "--out", out, "--schema", inputs / "missing.json")
    assert code == 2 and "cannot read" in err


def test_table_json_preset_is_constrained_to_the_table_shape():
    record = Record(id="c", images=("c.png",), sources=("/c.png",))
    (table,) = resolve_jobs([record], task="table", prompt=None, fmt="json")
    assert table.schema == TABLE_SCHEMA
    (csv,) = resolve_jobs([record], task="table", prompt=None, fmt="csv")
    assert csv.schema is None
    (own,) = resolve_jobs([Record(id="c", images=("c.png",), sources=("/c.png",), schema=YES_NO)],
                          task="table", prompt=None, fmt="json")
    assert own.schema == YES_NO
