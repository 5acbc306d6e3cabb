"""Structured output: every answer follows its JSON Schema, regex or choice list.

Random weights produce garbage, which makes them the hardest test: each output must still parse
and validate (jsonschema), greedy and sampled, streamed and not, alone and batched with rows that
have other constraints or none. Strings and arrays carry length bounds so that garbage ends.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

import phi3v
from phi3v.engine.constraints import OutputFormat, OutputFormatError
from phi3v.options import GenerationOptions as Opts

SHORT = {"type": "string", "maxLength": 12}

SCHEMAS = {
    "flat object": {"type": "object", "properties": {"name": SHORT, "total": {"type": "number"}},
                    "required": ["name", "total"], "additionalProperties": False},
    "receipt": {"type": "object", "additionalProperties": False, "required": ["merchant", "items", "total"],
                "properties": {"merchant": SHORT, "total": {"type": "number", "minimum": 0},
                               "items": {"type": "array", "maxItems": 3, "items": {
                                   "type": "object", "additionalProperties": False, "required": ["name", "price"],
                                   "properties": {"name": SHORT, "price": {"type": "number"}}}}}},
    "enum": {"type": "string", "enum": ["yes", "no", "unsure"]},
    "integer range": {"type": "integer", "minimum": 1, "maximum": 5},
    "boolean": {"type": "boolean"},
    "array of numbers": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 4},
    "optional fields": {"type": "object", "additionalProperties": False, "required": ["a"],
                        "properties": {"a": {"type": "integer"}, "b": SHORT, "c": {"type": "boolean"}}},
    "string pattern": {"type": "object", "additionalProperties": False, "required": ["date"],
                       "properties": {"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}}},
    "defs": {"$defs": {"point": {"type": "object", "additionalProperties": False, "required": ["x", "y"],
                                 "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}}}},
             "type": "object", "additionalProperties": False, "required": ["start", "end"],
             "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}}},
    "table": {"type": "object", "additionalProperties": False, "required": ["columns", "rows"],
              "properties": {"columns": {"type": "array", "items": SHORT, "minItems": 1, "maxItems": 3},
                             "rows": {"type": "array", "maxItems": 2,
                                      "items": {"type": "array", "items": SHORT, "maxItems": 3}}}},
    "nullable": {"type": "object", "additionalProperties": False, "required": ["v"],
                 "properties": {"v": {"anyOf": [{"type": "null"}, {"type": "integer"}]}}},
}
MAX_TOKENS = 400  # the bounds above make every structure end well before this


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return phi3v.load(str(tiny_model_dir), device="cpu", dtype="float32", progress=False, prefix_cache=False)


def check(reply, schema):
    assert reply.finish_reason == "stop", f"ended by {reply.finish_reason}: {reply.text!r}"
    value = json.loads(reply.text)
    jsonschema.validate(value, schema)
    assert reply.parsed == value


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_greedy_and_sampled_answers_validate(model, name):
    schema = SCHEMAS[name]
    check(model.ask("Describe the receipt.", json_schema=schema, max_new_tokens=MAX_TOKENS), schema)
    for seed in (1, 2):
        check(model.ask("Describe the receipt.", json_schema=schema, max_new_tokens=MAX_TOKENS,
                        temperature=1.0, seed=seed), schema)


def test_every_streamed_prefix_is_a_prefix_of_the_valid_whole(model):
    schema = SCHEMAS["receipt"]
    stream = model.stream("Read it.", json_schema=schema, max_new_tokens=MAX_TOKENS, temperature=0.8, seed=5)
    pieces = list(stream)
    check(stream.completion, schema)
    assert "".join(pieces) == stream.completion.text


def test_batched_rows_with_different_constraints_or_none(model):
    prompts = [model.prepare(prompt=f"Question {i}") for i in range(4)]
    formats = [OutputFormat.json_schema(SCHEMAS["defs"]), None, OutputFormat.regex(r"[A-Z][a-z]{2,8}"),
               OutputFormat.json_schema(SCHEMAS["enum"])]
    replies = model.generate_batch(prompts, Opts(max_new_tokens=MAX_TOKENS), output_formats=formats)
    check(replies[0], SCHEMAS["defs"])
    assert replies[1].parsed is None and replies[1].usage.completion_tokens > 0
    assert re.fullmatch(r"[A-Z][a-z]{2,8}", replies[2].text) and replies[2].finish_reason == "stop"
    check(replies[3], SCHEMAS["enum"])
    alone = model.generate(prompts[0], Opts(max_new_tokens=MAX_TOKENS), output_format=formats[0])
    assert replies[0].text == alone.text  # greedy: the batch changes nothing


def test_regex_choices_json_object_and_pydantic(model):
    pydantic = pytest.importorskip("pydantic")

    reply = model.ask("A code?", regex=r"[0-9]{3}-[A-Z]{2}", temperature=1.0, seed=9)
    assert re.fullmatch(r"[0-9]{3}-[A-Z]{2}", reply.text) and reply.parsed == reply.text
    reply = model.ask("Is it a cat?", choices=["yes", "no", "a cat (maybe)"])
    assert reply.text in ("yes", "no", "a cat (maybe)") and reply.finish_reason == "stop"
    reply = model.ask("Any JSON.", json_schema="json_object", max_new_tokens=MAX_TOKENS, temperature=0.5, seed=4)
    if reply.finish_reason == "stop":  # an unbounded object may run out of tokens: then it says so
        assert isinstance(json.loads(reply.text), dict)
    else:
        assert reply.finish_reason == "length" and reply.parsed is None

    class Point(pydantic.BaseModel):
        x: int
        y: int
        label: str = pydantic.Field(max_length=8)

    reply = model.ask("Where?", json_schema=Point, max_new_tokens=MAX_TOKENS)
    assert reply.finish_reason == "stop" and isinstance(reply.parsed, Point)


def test_max_new_tokens_first_gives_length_and_no_data(model):
    reply = model.ask("Long.", json_schema=SCHEMAS["receipt"], max_new_tokens=3)
    assert reply.finish_reason == "length" and reply.parsed is None and len(reply.token_ids) == 3


def test_bad_constraints_are_clear_errors_before_generation(model):
    with pytest.raises(OutputFormatError, match="one output constraint"):
        model.ask("x", regex="a", choices=["a"])
    with pytest.raises(OutputFormatError, match="not valid JSON"):
        model.ask("x", json_schema="{not json")
    with pytest.raises(OutputFormatError, match="cannot use this regex"):
        model.ask("x", regex="(unclosed")
    with pytest.raises(OutputFormatError, match="cannot use this json schema"):
        model.ask("x", json_schema={"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}})
    with pytest.raises(OutputFormatError, match="non-empty strings"):
        model.ask("x", choices=[])


def test_a_schema_compiles_once(model):
    fmt = OutputFormat.json_schema(SCHEMAS["table"])
    model.grammars.check(fmt)
    compiled = dict(model.grammars._compiled)
    model.grammars.check(OutputFormat.json_schema(json.dumps(SCHEMAS["table"])))  # same content, other spelling
    assert model.grammars._compiled.keys() == compiled.keys()


def test_objects_come_in_the_schemas_key_order(model):
    schema = {"type": "object", "additionalProperties": False, "required": ["zeta", "alpha", "mid"],
              "properties": {"zeta": {"type": "integer"}, "alpha": {"type": "boolean"}, "mid": SHORT}}
    reply = model.ask("Fields.", json_schema=schema, max_new_tokens=MAX_TOKENS)
    check(reply, schema)
    assert list(json.loads(reply.text)) == ["zeta", "alpha", "mid"]
