"""Structured output on the command line: --schema / --regex / --choices, `phi3v extract`,
`phi3v table --format json`, on the tiny random checkpoint (every output must still validate).

In-process (conftest.run_cli). The schemas bound their strings and arrays so that random weights
finish the structure well within --max-tokens.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from phi3v import tasks

GEN = ["--device", "cpu", "--dtype", "float32", "--num-crops", "1", "--max-tokens", "400", "--quiet"]
SHORT = {"type": "string", "maxLength": 12}
RECEIPT = {"type": "object", "additionalProperties": False, "required": ["merchant", "items", "total"],
           "properties": {"merchant": SHORT, "total": {"type": "number", "minimum": 0},
                          "currency": {"type": "string", "enum": ["EUR", "USD"]},
                          "items": {"type": "array", "maxItems": 3, "items": {
                              "type": "object", "additionalProperties": False, "required": ["name", "price"],
                              "properties": {"name": SHORT, "price": {"type": "number"}}}}}}
# the shape `table --format json` promises (tasks.TABLE_SCHEMA, written out here)
TABLE_SHAPE = {"type": "object", "required": ["columns", "rows"], "additionalProperties": False,
               "properties": {"columns": {"type": "array", "items": {"type": "string"}},
                              "rows": {"type": "array", "items": {"type": "array",
                                                                  "items": {"type": ["string", "number"]}}}}}
COMMANDS = ("ask", "describe", "ocr", "table", "compare", "chat")


@pytest.fixture
def cli(run_cli, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("PHI3V_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("NO_COLOR", "1")
    return run_cli


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("structured")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (60, 40, 3), dtype=np.uint8)).save(folder / "receipt.png")
    (folder / "receipt.json").write_text(json.dumps(RECEIPT, indent=2))
    (folder / "list.json").write_text("[1, 2]")
    (folder / "broken.json").write_text("{not json")
    (folder / "refused.json").write_text(json.dumps({"type": "object", "properties": {"a": {"$ref": "#/$defs/x"}}}))
    return folder


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if "error:" in line]


def test_the_flags_are_on_every_answer_command(cli):
    for name in COMMANDS:
        code, out, _ = cli(name, "--help")
        assert code == 0 and all(flag in out for flag in ("--schema", "--regex", "--choices")), name
    code, out, _ = cli("extract", "--help")
    assert code == 0 and "--schema FILE.json" in out and "examples:" in out


@pytest.mark.parametrize("args, needle", [
    (["--schema", "missing.json"], "cannot read missing.json"),
    (["--schema", "broken.json"], "broken.json is not valid JSON"),
    (["--schema", "list.json"], "must hold a JSON Schema object, got list"),
    (["--choices", "yes"], "two or more comma-separated choices"),
    (["--schema", "receipt.json", "--regex", "a+"], "not allowed with argument"),
])
def test_bad_flags_are_usage_errors(cli, files, args, needle):
    code, out, err = cli("ask", "-p", "Total?", *args, *GEN, cwd=files)
    assert code == 2 and out == "" and needle in error_lines(err)[-1]


def test_a_schema_the_grammar_engine_refuses_is_one_error_line(cli, files):
    code, out, err = cli("describe", files / "receipt.png", "--schema", files / "refused.json", *GEN)
    assert code == 1 and out == ""
    assert error_lines(err) == ["phi3v: error: cannot use this json schema: Pointer '/$defs/x' does not exist"]


def test_extract_prints_exactly_a_valid_json_object(cli, files):
    for extra in ([], ["--temperature", "1", "--seed", "3"]):
        code, out, err = cli("extract", files / "receipt.png", "--schema", files / "receipt.json", *GEN, *extra)
        assert code == 0, err
        assert out.count("\n") == 1 and out.endswith("\n")
        jsonschema.validate(json.loads(out), RECEIPT)

    code, out, err = cli("extract", files / "receipt.png", "--schema", files / "receipt.json", "--json", *GEN)
    envelope = json.loads(out)
    assert envelope["command"] == "extract" and envelope["finish_reason"] == "stop"
    assert envelope["parsed"] == json.loads(envelope["text"])
    jsonschema.validate(envelope["parsed"], RECEIPT)
    assert json.dumps(RECEIPT, separators=(",", ":")) in envelope["prompt"]  # the model sees the fields


def test_extract_cut_short_prints_nothing_and_fails(cli, files):
    code, out, err = cli("extract", files / "receipt.png", "--schema", files / "receipt.json", *GEN,
                         "--max-tokens", "3")
    assert code == 1 and out == ""
    assert "the JSON is incomplete" in error_lines(err)[0] and "raise --max-tokens" in err


def test_table_format_json_has_the_table_shape(cli, files):
    assert tasks.task_schema("table", "json") == TABLE_SHAPE == tasks.TABLE_SCHEMA
    code, out, err = cli("table", files / "receipt.png", "--format", "json", *GEN)
    assert code == 0, err
    jsonschema.validate(json.loads(out), TABLE_SHAPE)
    code, out, err = cli("table", files / "receipt.png", "--format", "json", "--json", *GEN,
                         "--temperature", "0.8", "--seed", "2")
    envelope = json.loads(out)
    jsonschema.validate(envelope["parsed"], TABLE_SHAPE)
    code, out, _ = cli("table", files / "receipt.png", "--format", "csv", "--json", *GEN, "--max-tokens", "4")
    assert "parsed" not in json.loads(out)  # other formats stay free text


def test_ask_schema_regex_and_choices(cli, files):
    code, out, err = cli("ask", files / "receipt.png", "-p", "Read it.", "--schema", files / "receipt.json", *GEN)
    assert code == 0, err
    jsonschema.validate(json.loads(out), RECEIPT)
    code, out, _ = cli("ask", "-p", "A code?", "--regex", "[0-9]{3}-[A-Z]{2}", "--no-stream", *GEN)
    assert code == 0 and re.fullmatch(r"[0-9]{3}-[A-Z]{2}\n", out)
    code, out, _ = cli("compare", files / "receipt.png", files / "receipt.png", "--choices", "same, different",
                       "--json", *GEN)
    envelope = json.loads(out)
    assert envelope["text"] in ("same", "different") and envelope["parsed"] == envelope["text"]


def test_chat_answers_follow_the_constraint_every_turn(cli, files):
    code, out, err = cli("chat", files / "receipt.png", "--choices", "yes,no,maybe", *GEN,
                         stdin="Is it a receipt?\nAre you sure?\n")
    assert code == 0, err
    assert out.split() and all(answer in ("yes", "no", "maybe") for answer in out.split())
    assert len(out.split()) == 2
