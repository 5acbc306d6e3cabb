"""Validation that rejects, and request preparation that cannot freeze or poison the server (issue 11).

- values that passed validation and then failed in the engine with a 500 are handled by the
  engine (any integer seed: modulo 2**64 outside torch's range; a temperature or top_p that
  rounds to 0 in float32) or are 400s naming the parameter, streamed or not (a lone surrogate);
- request fields are strict (no coercion), the OpenAPI schema allows only what the server takes,
  and no error body has `code: null`; HEAD /health answers like GET;
- a 10 MB prompt is refused before tokenizing while /health keeps answering;
- slow image preparation neither delays text-only requests nor runs past its deadline;
- a poisoned request fails alone, never with the requests batched next to it.

Raw HTTP (httpx) rather than the openai client: the client would refuse to send some of these.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from phi3v.server import ServerSettings
from server_harness import RunningServer, image_part, png_bytes

IMG = png_bytes(40, 30, seed=21)


@pytest.fixture(scope="module")
def server(tiny_model):
    with RunningServer(tiny_model, ServerSettings(default_num_crops=1)) as srv:
        srv.model_id = srv.health()["model"]
        yield srv


def post(srv, body: dict | bytes, timeout: float = 60) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(srv.base_url + "/v1/chat/completions", content=content,
                      headers={"content-type": "application/json"}, timeout=timeout)


def request(srv, text="Hello", **extra) -> dict:
    return {"model": srv.model_id, "messages": [{"role": "user", "content": text}], "max_tokens": 3, **extra}


def assert_error(r: httpx.Response, status: int, param: str | None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text[:300]
    assert r.headers["content-type"].startswith("application/json")  # never an SSE stream
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["code"] is not None
    assert code is None or err["code"] == code, err
    return err


def sse_events(r: httpx.Response) -> list:
    return [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]


# ---- values that used to pass validation and then 500 ------------------------------------------

SURROGATE = '"x\\ud800y"'  # JSON text for a string holding a lone surrogate


def raw_with(srv, field_json: str, stream: bool) -> bytes:
    """A request body with one member spliced in as JSON text (json.dumps would escape it)."""
    base = json.dumps(request(srv, stream=stream))
    return (base[:-1] + ", " + field_json + "}").encode()


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("raw_member, param, code", [
    (f'"stop": {SURROGATE}', "stop", "invalid_unicode"),
    (f'"stop": ["a", {SURROGATE}]', "stop.1", "invalid_unicode"),
    (f'"user": {SURROGATE}', "user", "invalid_unicode"),
])
def test_text_the_engine_cannot_take_is_400(server, stream, raw_member, param, code):
    assert_error(post(server, raw_with(server, raw_member, stream)), 400, param, code)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("content, param", [
    (SURROGATE, "messages.0.content"),
    ('[{"type": "text", "text": "ok"}, {"type": "text", "text": %s}]' % SURROGATE, "messages.0.content.1.text"),
])
def test_lone_surrogate_in_text_is_400(server, stream, content, param):
    body = ('{"model": "%s", "max_tokens": 2, "stream": %s, "messages": [{"role": "user", "content": %s}]}'
            % (server.model_id, json.dumps(stream), content))
    err = assert_error(post(server, body.encode()), 400, param, "invalid_unicode")
    assert "lone surrogate" in err["message"] and "U+D800" in err["message"]


@pytest.mark.parametrize("extra", [
    {"temperature": 0.7, "seed": 2**64}, {"temperature": 0.7, "seed": -2**63 - 1}, {"temperature": 0.7, "seed": 10**30},
    {"temperature": 1e-300, "seed": 2**64 - 1}, {"temperature": 1.0, "top_p": 1e-300},
    {"temperature": 0.8, "repetition_penalty": 1e-300, "seed": -2**63}],
    ids=["seed-2**64", "seed-below-int64", "seed-10**30", "tiny-temperature", "tiny-top_p", "tiny-penalty"])
def test_extreme_sampling_values_generate(server, extra):
    """Decided per case: these are valid requests, so the engine must sample from them."""
    r = post(server, request(server, **extra))
    assert r.status_code == 200, r.text[:300]
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    r = post(server, request(server, stream=True, **extra))
    events = sse_events(r)
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert not any('"error"' in e for e in events[:-1]), events


# ---- strict types, the schema, error codes, HEAD ------------------------------------------------


@pytest.mark.parametrize("member, param", [
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": "10"}, "max_tokens"),
    ({"max_tokens": 10.0}, "max_tokens"),
    ({"max_completion_tokens": False}, "max_completion_tokens"),
    ({"stream": "yes"}, "stream"),
    ({"stream": 1}, "stream"),
    ({"temperature": "0.5"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"seed": "1"}, "seed"),
    ({"top_p": 0}, "top_p"),
    ({"num_crops": "2"}, "num_crops"),
    ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"stop": 5}, "stop"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": 5}, "model"),
])
def test_request_fields_are_strict(server, member, param):
    err = assert_error(post(server, request(server, **member)), 400, param)
    assert param in err["message"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_400(server, literal):
    for field in ("temperature", "repetition_penalty", "top_p"):
        assert_error(post(server, raw_with(server, f'"{field}": {literal}', False)), 400, field)


@pytest.mark.parametrize("member", [
    {"modalities": []}, {"modalities": ["text", "audio"]}, {"n": 2}, {"logprobs": True}, {"top_logprobs": 1},
    {"frequency_penalty": 0.1}, {"logit_bias": {"1": 2}}, {"tool_choice": "auto"},
    {"tools": [{"type": "function"}]},
])
def test_unsupported_values_are_400_and_outside_the_schema(server, member):
    (name, value), = member.items()
    err = assert_error(post(server, request(server, **member)), 400, name, "unsupported_parameter")
    assert f"Unsupported parameter: {name}=" in err["message"]


def test_supported_values_of_unsupported_parameters_are_accepted(server):
    off = {"modalities": ["text"], "n": 1, "logprobs": False, "top_logprobs": 0, "frequency_penalty": 0,
           "presence_penalty": 0.0, "logit_bias": {}, "tool_choice": "none", "response_format": {"type": "text"},
           "tools": []}
    assert post(server, request(server, **off)).status_code == 200


def test_openapi_schema_allows_only_what_the_server_takes(server):
    schema = httpx.get(server.base_url + "/openapi.json", timeout=10).json()
    props = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]

    def first(name):  # the non-null alternative of an optional field
        return next(alt for alt in props[name]["anyOf"] if alt.get("type") != "null")

    assert first("top_p")["exclusiveMinimum"] == 0 and first("top_p")["maximum"] == 1
    assert first("seed") == {"type": "integer"}  # any integer (the engine reduces it modulo 2**64)
    modalities = first("modalities")
    assert (modalities["minItems"], modalities["maxItems"]) == (1, 1)
    assert modalities["items"] in ({"const": "text", "type": "string"}, {"enum": ["text"], "type": "string"})
    assert (first("n")["minimum"], first("n")["maximum"]) == (1, 1)
    assert first("logprobs") in ({"const": False, "type": "boolean"}, {"enum": [False], "type": "boolean"})
    assert first("tools")["maxItems"] == 0 and first("logit_bias")["maxProperties"] == 0
    assert (first("frequency_penalty")["minimum"], first("frequency_penalty")["maximum"]) == (0, 0)
    stop = [alt for alt in props["stop"]["anyOf"] if alt.get("type") == "array"]
    assert stop and stop[0]["maxItems"] == 4
    assert "head" not in schema["paths"]["/health"]  # one operation per path and method


def test_no_error_has_a_null_code(server):
    url = server.base_url
    responses = [
        httpx.get(url + "/no/such/page", timeout=10),  # 404
        httpx.delete(url + "/health", timeout=10),  # 405
        httpx.post(url + "/v1/models", timeout=10),  # 405
        post(server, b"{not json"),
        post(server, b"[]"),
        post(server, {"model": server.model_id}),  # messages missing
        post(server, request(server, model="gpt-4o")),  # 404 model
    ]
    for r in responses:
        assert r.status_code >= 400
        err = r.json()["error"]
        assert isinstance(err["code"], str) and err["code"], (r.request.method, r.request.url, err)


def test_head_health_answers_like_get(server):
    r = httpx.head(server.base_url + "/health", timeout=10)
    assert r.status_code == 200 and r.content == b""
    assert httpx.get(server.base_url + "/health", timeout=10).json()["status"] == "ok"


# ---- a huge text prompt ---------------------------------------------------------------------------


def test_ten_megabyte_prompt_is_refused_while_health_answers(server):
    big = request(server, text="a b " * 2_500_000)  # 10 MB of text: ~5 million tokens
    result = {}

    def send():
        t0 = time.perf_counter()
        result["response"] = post(server, big, timeout=120)
        result["seconds"] = time.perf_counter() - t0

    sender = threading.Thread(target=send)
    sender.start()
    worst = 0.0
    while sender.is_alive():
        t0 = time.perf_counter()
        assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200
        worst = max(worst, time.perf_counter() - t0)
        time.sleep(0.02)
    sender.join()
    err = assert_error(result["response"], 400, "messages", "context_length_exceeded")
    assert "10000000 characters" in err["message"]
    assert worst < 1.0, f"/health took {worst:.2f} s while a 10 MB prompt was being refused"
    assert result["seconds"] < 5.0  # refused before tokenizing (it used to take seconds to tokenize)


def test_prompt_char_budget_is_a_setting(tiny_model):
    with RunningServer(tiny_model, ServerSettings(default_num_crops=1, max_prompt_chars=100)) as srv:
        srv.model_id = srv.health()["model"]
        ok = {"model": srv.model_id, "max_tokens": 1, "messages": [
            {"role": "system", "content": "s" * 40},
            {"role": "user", "content": [image_part(IMG), {"type": "text", "text": "t" * 60}]}]}
        assert post(srv, ok).status_code == 200  # 100 characters of text; the image is not counted
        ok["messages"][0]["content"] += "s"
        assert_error(post(srv, ok), 400, "messages", "context_length_exceeded")


# ---- slow preparation -------------------------------------------------------------------------------


class SlowImages:
    """The tiny model, except that preparing a request with images takes `delay` seconds
    (a stand-in for a remote image sent at 1 byte/s, or a slow decode)."""

    def __init__(self, model, delay: float):
        self._model, self.delay = model, delay

    def __getattr__(self, name):
        return getattr(self._model, name)

    def prepare(self, messages=None, **kwargs):
        if any(isinstance(m["content"], list) and any(p["type"] != "text" for p in m["content"]) for m in messages):
            time.sleep(self.delay)
        return self._model.prepare(messages=messages, **kwargs)


def image_request(srv) -> dict:
    return {"model": srv.model_id, "max_tokens": 2,
            "messages": [{"role": "user", "content": [image_part(IMG), {"type": "text", "text": "?"}]}]}


def test_slow_image_preparation_does_not_delay_text_requests(tiny_model):
    settings = ServerSettings(default_num_crops=1, prepare_threads=2, prepare_timeout_s=30)
    with RunningServer(SlowImages(tiny_model, delay=4.0), settings) as srv:
        srv.model_id = srv.health()["model"]
        assert post(srv, request(srv, max_tokens=1)).status_code == 200  # warm
        with ThreadPoolExecutor(4) as pool:
            slow = [pool.submit(post, srv, image_request(srv)) for _ in range(4)]  # > the image threads
            time.sleep(0.5)
            t0 = time.perf_counter()
            r = post(srv, request(srv, max_tokens=2))
            text_s = time.perf_counter() - t0
            assert r.status_code == 200 and text_s < 2.0, f"a text request waited {text_s:.2f} s behind images"
            assert [f.result().status_code for f in slow] == [200] * 4  # they are served too, only later


def test_preparation_past_its_deadline_is_408(tiny_model):
    settings = ServerSettings(default_num_crops=1, prepare_threads=1, prepare_timeout_s=1.0)
    with RunningServer(SlowImages(tiny_model, delay=3.0), settings) as srv:
        srv.model_id = srv.health()["model"]
        for stream in (False, True):
            t0 = time.perf_counter()
            r = post(srv, {**image_request(srv), "stream": stream})
            elapsed = time.perf_counter() - t0
            err = assert_error(r, 408, "messages", "preparation_timeout")
            assert "1 s" in err["message"] and elapsed < 2.5, elapsed
        assert post(srv, request(srv, max_tokens=1)).status_code == 200  # text is still served meanwhile
        assert srv.health()["status"] == "ok"


# ---- one bad request never fails the requests batched with it -------------------------------------


def test_poisoned_requests_fail_alone(server):
    """Normal requests sent together with poisoned ones (so they queue and batch together)."""
    before = server.health()["queue"]
    normal = [request(server, text=f"Question {i}?", max_tokens=4, temperature=0) for i in range(5)]
    poisoned = [
        (request(server, max_tokens=4, temperature=0.7, seed=2**64), 200),
        (request(server, max_tokens=4, temperature=0.7, seed="1"), 400),
        (request(server, max_tokens=4, temperature=1e-300), 200),
        (request(server, max_tokens=4, temperature=1.0, top_p=1e-300), 200),
        (raw_with(server, f'"stop": {SURROGATE}', False), 400),
    ]
    bodies = [b for pair in zip(normal, [p for p, _ in poisoned]) for b in pair]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: post(server, b), bodies))
    normal_r, poisoned_r = responses[0::2], responses[1::2]
    assert [r.status_code for r in normal_r] == [200] * 5, [r.text[:200] for r in normal_r]
    assert [r.status_code for r in poisoned_r] == [status for _, status in poisoned]
    after = server.health()
    assert after["status"] == "ok" and after["queue"]["failed"] == before["failed"]
