"""OpenAI's `response_format` on the server (issue 13): json_schema and json_object, streamed and not.

The real server on loopback with the tiny random model, driven by the official `openai` client.
Random weights produce garbage, so every answer that ends must still parse and validate
(jsonschema); the schemas bound their strings and arrays so that garbage ends (as in
tests/test_structured_output.py, whose schemas these are). A schema the grammar engine cannot use
is a 400 before any generation; an answer cut by max_tokens says "length".
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pydantic
import pytest

from phi3v.server import ServerSettings
from server_harness import RunningServer, image_part, png_bytes
from test_structured_output import MAX_TOKENS, SCHEMAS

IMG = png_bytes(40, 30, seed=13)


class GatedModel:
    """The tiny model, except that the next start_row can be held until `gate` opens, so that the
    requests sent meanwhile queue up and join the batch together."""

    def __init__(self, model):
        self._model = model
        self.hold_next = False
        self.gate = threading.Event()

    def __getattr__(self, name):
        return getattr(self._model, name)

    def start_row(self, prepared, options, **kw):
        if self.hold_next:
            self.hold_next = False
            self.gate.wait(60)
        return self._model.start_row(prepared, options, **kw)


@pytest.fixture(scope="module")
def gated(tiny_model):
    return GatedModel(tiny_model)


@pytest.fixture(scope="module")
def server(gated):
    with RunningServer(gated, ServerSettings(default_num_crops=1)) as srv:
        srv.model_id = srv.health()["model"]
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def schema_format(name: str) -> dict:
    return {"type": "json_schema",
            "json_schema": {"name": name.replace(" ", "_"), "schema": SCHEMAS[name], "strict": True}}


def ask(client, model_id, response_format=None, *, stream=False, text="Read the receipt.", **kw):
    """-> (content, finish_reason) of one request; streamed ones are reassembled from their deltas."""
    if response_format is not None:
        kw["response_format"] = response_format
    kw.setdefault("max_tokens", MAX_TOKENS)
    messages = [{"role": "user", "content": text}]
    if not stream:
        reply = client.chat.completions.create(model=model_id, messages=messages, **kw)
        return reply.choices[0].message.content, reply.choices[0].finish_reason
    pieces, finish = [], None
    for chunk in client.chat.completions.create(model=model_id, messages=messages, stream=True, **kw):
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(pieces), finish


def assert_valid(content: str, finish: str, schema: dict) -> None:
    assert finish == "stop", f"ended by {finish}: {content!r}"
    jsonschema.validate(json.loads(content), schema)


def queue(server) -> dict:
    return server.health()["queue"]


# ---- answers that follow the schema -------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("name", ["receipt", "defs", "table", "enum", "nullable", "string pattern"])
def test_json_schema_answers_validate(server, client, name, stream):
    fmt = schema_format(name)
    assert_valid(*ask(client, server.model_id, fmt, stream=stream), SCHEMAS[name])  # greedy
    for seed in (1, 2):
        assert_valid(*ask(client, server.model_id, fmt, stream=stream, temperature=1.0, seed=seed), SCHEMAS[name])


def test_json_schema_with_an_image(server, client):
    messages = [{"role": "user", "content": [image_part(IMG), {"type": "text", "text": "The receipt's fields?"}]}]
    reply = client.chat.completions.create(model=server.model_id, messages=messages, max_tokens=MAX_TOKENS,
                                           response_format=schema_format("receipt"))
    assert_valid(reply.choices[0].message.content, reply.choices[0].finish_reason, SCHEMAS["receipt"])


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_json_object_parses(server, client, stream):
    content, finish = ask(client, server.model_id, {"type": "json_object"}, stream=stream)
    assert finish == "stop" and isinstance(json.loads(content), dict), (finish, content)


def test_text_format_is_free_text(server, client):
    content, finish = ask(client, server.model_id, {"type": "text"}, max_tokens=5)
    assert finish == "length" and content


class Item(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=10)
    price: float


class Receipt(pydantic.BaseModel):
    merchant: str = pydantic.Field(max_length=12)
    items: list[Item] = pydantic.Field(max_length=3)
    total: float


def parse_methods(client):
    """The client's parse helpers: chat.completions.parse and (older clients) beta.chat.completions.parse."""
    found = [getattr(c.completions, "parse", None) for c in (client.chat, getattr(getattr(client, "beta", None),
                                                                                   "chat", None)) if c is not None]
    return [m for m in found if m is not None]


def test_openai_parse_with_a_pydantic_model(server, client):
    methods = parse_methods(client)
    assert methods, "this openai client has no parse helper"
    for parse in methods:
        for kw in ({}, {"temperature": 0.9, "seed": 3}):
            reply = parse(model=server.model_id, messages=[{"role": "user", "content": "The receipt?"}],
                          response_format=Receipt, max_tokens=MAX_TOKENS, **kw)
            message = reply.choices[0].message
            assert isinstance(message.parsed, Receipt), message.content
            assert message.parsed == Receipt.model_validate_json(message.content)


def test_openai_stream_helper_with_a_pydantic_model(server, client):
    with client.chat.completions.stream(model=server.model_id, messages=[{"role": "user", "content": "Receipt?"}],
                                        response_format=Receipt, max_tokens=MAX_TOKENS, temperature=0.7,
                                        seed=11) as stream:
        final = stream.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, Receipt)


# ---- max_tokens before the structure ends ------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_max_tokens_first_gives_length(server, client, stream):
    content, finish = ask(client, server.model_id, schema_format("receipt"), stream=stream, max_tokens=3)
    assert finish == "length" and content.startswith("{")


def test_openai_parse_says_length(server, client):
    with pytest.raises(openai.LengthFinishReasonError):
        client.chat.completions.parse(model=server.model_id, messages=[{"role": "user", "content": "x"}],
                                      response_format=Receipt, max_tokens=3)


# ---- refused before any generation ---------------------------------------------------------------


def post(server, **fields) -> httpx.Response:
    body = {"model": server.model_id, "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, **fields}
    return httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=60)


BAD_SCHEMAS = [
    ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum (5) is greater than maximum (1)"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "missing"),
    ({"type": "string", "pattern": "(("}, "unclosed group"),
    ({"not": {"type": "string"}}, "not"),
    ({"type": "spaceship"}, "spaceship"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("schema, words", BAD_SCHEMAS, ids=[w for _, w in BAD_SCHEMAS])
def test_unusable_schema_is_400_before_generation(server, schema, words, stream):
    before = queue(server)
    r = post(server, stream=stream, response_format={"type": "json_schema", "json_schema": {"name": "x",
                                                                                           "schema": schema}})
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json"), r.text
    err = r.json()["error"]
    assert err["param"] == "response_format" and err["code"] == "invalid_response_format", err
    assert words in err["message"] and err["message"].startswith("response_format: "), err
    after = queue(server)
    assert (after["served"], after["failed"], after["cancelled"]) == (before["served"], before["failed"],
                                                                      before["cancelled"])


@pytest.mark.parametrize("schema_json", ['{"type": "string", "const": "x\\ud800"}', '{"\\udfff": {}}',
                                         '{"type": "number", "maximum": NaN}'])
def test_schema_json_python_accepts_but_no_grammar_can_is_400(server, schema_json):
    """A lone surrogate or a NaN inside the schema (Python's JSON parser takes both): 400, never 500."""
    body = json.dumps({"model": server.model_id, "messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
                       "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "S"}}})
    r = httpx.post(server.base_url + "/v1/chat/completions", content=body.replace('"S"', schema_json),
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith("response_format"), r.text


@pytest.mark.parametrize("response_format, param, code", [
    ({"type": "xml"}, "response_format", "invalid_value"),
    ("json", "response_format", "invalid_value"),
    ({"type": "json_schema"}, "response_format.json_schema", "invalid_value"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "response_format.json_schema.name", "invalid_value"),
    ({"type": "json_schema", "json_schema": {"name": "a b"}}, "response_format.json_schema.name", "invalid_value"),
    ({"type": "json_schema", "json_schema": {"name": "x" * 65}}, "response_format.json_schema.name", "invalid_value"),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": "{}"}}, "response_format.json_schema.schema",
     "invalid_value"),
    ({"type": "json_schema", "json_schema": {"name": "a", "strict": "true"}}, "response_format.json_schema.strict",
     "invalid_value"),
    ({"type": "json_schema", "json_schema": {"name": "a", "format": "x"}}, "response_format.json_schema.format",
     "unrecognized_argument"),
    ({"type": "json_object", "schema": {}}, "response_format.schema", "unrecognized_argument"),
])
def test_malformed_response_format_is_400_naming_the_field(server, response_format, param, code):
    r = post(server, response_format=response_format)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"]) == (param, code), err


def test_schema_defaults_and_optional_fields(server):
    """`schema` may be left out (any JSON value); description and strict are accepted."""
    r = post(server, max_tokens=MAX_TOKENS, response_format={"type": "json_schema", "json_schema": {"name": "any"}})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    json.loads(choice["message"]["content"])
    r = post(server, max_tokens=MAX_TOKENS, response_format={"type": "json_schema", "json_schema": {
        "name": "yes_no", "description": "Is it?", "strict": False, "schema": SCHEMAS["boolean"]}})
    assert json.loads(r.json()["choices"][0]["message"]["content"]) in (True, False)


def test_openapi_lists_the_response_formats(server):
    schema = httpx.get(server.base_url + "/openapi.json", timeout=10).json()
    names = set(schema["components"]["schemas"])
    assert {"ResponseFormatText", "ResponseFormatJSONObject", "ResponseFormatJSONSchema"} <= names
    assert "schema" in schema["components"]["schemas"]["JSONSchemaFormat"]["properties"]


# ---- mixed formats in one batch ---------------------------------------------------------------


def test_concurrent_requests_with_different_formats_batch_together(server, client, gated):
    jobs = [
        ({"response_format": schema_format("receipt")}, "receipt"),
        ({"response_format": schema_format("defs"), "stream": True}, "defs"),
        ({"response_format": {"type": "json_object"}, "temperature": 0.8, "seed": 7}, "object"),
        ({"response_format": schema_format("table"), "stream": True, "temperature": 1.0, "seed": 2}, "table"),
        ({"max_tokens": 40}, None),
        ({"response_format": schema_format("enum")}, "enum"),
    ]
    batches = queue(server)["batches"]
    gated.gate.clear()
    gated.hold_next = True  # the first request holds the engine until all the others wait behind it

    def run(job):
        kw, _ = job
        return ask(client, server.model_id, kw.pop("response_format", None), **kw)

    with ThreadPoolExecutor(len(jobs)) as pool:
        first = pool.submit(run, jobs[0])
        server.wait_health(lambda h: h["queue"]["running"] == 1)
        rest = [pool.submit(run, job) for job in jobs[1:]]
        server.wait_health(lambda h: h["queue"]["waiting"] == len(jobs) - 1)
        gated.gate.set()
        results = [first.result()] + [f.result() for f in rest]
    for (kw, name), (content, finish) in zip(jobs, results):
        if name is None:
            assert finish == "length" and content
        elif name == "object":
            assert finish == "stop" and isinstance(json.loads(content), dict), (finish, content)
        else:
            assert_valid(content, finish, SCHEMAS[name])
    assert queue(server)["batches"] > batches
