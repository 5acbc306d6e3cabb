"""The OpenAI-compatible server, driven by the official `openai` client against a real uvicorn.

Greedy answers are compared with phi3v's Python API for the same conversation (the tiny random
model's text is meaningless but deterministic). Small images, num_crops 1, max_tokens <= 8.
"""

from __future__ import annotations

import base64
import urllib.parse

import httpx
import openai
import pytest

from phi3v.server import ServerSettings
from server_harness import RunningServer, as_python_api, data_uri, image_part, png_bytes

IMG_A = png_bytes(48, 32, seed=1)
IMG_B = png_bytes(30, 60, seed=2)
IMG_C = png_bytes(40, 40, seed=3)


class FlakyModel:
    """The tiny model, except that generation can be told to fail once (an engine bug stand-in)."""

    def __init__(self, model):
        self._model = model
        self.fail_next = False

    def __getattr__(self, name):
        return getattr(self._model, name)

    def start_row(self, prepared, options, **kw):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("simulated engine failure /secret/path/in/traceback")
        return self._model.start_row(prepared, options, **kw)


@pytest.fixture(scope="module")
def flaky(tiny_model):
    return FlakyModel(tiny_model)


@pytest.fixture(scope="module")
def server(flaky):
    settings = ServerSettings(max_images=3, max_body_bytes=256 * 1024, default_num_crops=1)
    with RunningServer(flaky, settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def model_id(server):
    return server.health()["model"]


def greedy(tiny_model, messages, max_tokens, num_crops=1):
    return tiny_model.chat(as_python_api(messages), max_new_tokens=max_tokens, num_crops=num_crops, temperature=0.0)


def one_image_messages(question="What is in this picture?"):
    return [{"role": "user", "content": [image_part(IMG_A), {"type": "text", "text": question}]}]


# ---- happy paths -----------------------------------------------------------------------------


def test_health_models_and_openapi(server, client, tiny_model_dir):
    health = server.health()
    assert health["status"] == "ok"
    assert health["model"] == tiny_model_dir.name  # a local folder is listed by its name, not its path
    assert [m.id for m in client.models.list().data] == [tiny_model_dir.name]
    assert client.models.retrieve(tiny_model_dir.name).id == tiny_model_dir.name
    schema = httpx.get(server.base_url + "/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"]
    props = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"messages", "model", "max_tokens", "max_completion_tokens", "stream", "num_crops"} <= set(props)


def test_plain_completion_equals_python_api(client, model_id, tiny_model):
    messages = one_image_messages()
    r = client.chat.completions.create(model=model_id, messages=messages, max_tokens=6, temperature=0,
                                       extra_body={"num_crops": 1})
    ref = greedy(tiny_model, messages, 6)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.model == model_id
    assert len(r.choices) == 1 and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == ("length" if ref.finish_reason == "length" else "stop")
    assert r.usage.prompt_tokens == ref.usage.prompt_tokens
    assert r.usage.completion_tokens == ref.usage.completion_tokens
    assert r.usage.total_tokens == ref.usage.prompt_tokens + ref.usage.completion_tokens
    ext = r.model_extra["phi3v"]
    assert ext["image_tokens"] == ref.usage.image_tokens > 0
    assert ext["num_crops"] == 1
    assert set(ext["timings"]) >= {"prefill_s", "decode_s", "first_token_s"}


def test_streamed_completion_equals_python_api(client, model_id, tiny_model):
    messages = one_image_messages("Describe it.")
    stream = client.chat.completions.create(model=model_id, messages=messages, max_completion_tokens=8,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    ref = greedy(tiny_model, messages, 8)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1  # really streamed, one chunk per piece of text
    assert "".join(pieces) == ref.text
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length" if ref.finish_reason == "length" else "stop"]
    last = chunks[-1]
    assert last.choices == [] and last.usage.prompt_tokens == ref.usage.prompt_tokens
    assert last.usage.completion_tokens == ref.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_usage_ends_with_done(server, model_id):
    body = {"model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert '"usage"' not in "".join(events)


def test_several_images_turns_and_system(client, model_id, tiny_model):
    messages = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": [image_part(IMG_A), image_part(IMG_B), {"type": "text", "text": "Compare them."}]},
        {"role": "assistant", "content": "The first is wider."},
        {"role": "user", "content": [image_part(IMG_C), {"type": "text", "text": "And this one?"}]},
    ]
    r = client.chat.completions.create(model=model_id, messages=messages, max_tokens=5, temperature=0)
    ref = greedy(tiny_model, messages, 5)
    assert r.choices[0].message.content == ref.text
    assert r.usage.prompt_tokens == ref.usage.prompt_tokens
    assert r.model_extra["phi3v"]["image_tokens"] == ref.usage.image_tokens
    # three images' tokens: more than twice what one image costs
    one = greedy(tiny_model, one_image_messages(), 1).usage.image_tokens
    assert ref.usage.image_tokens > 2 * one


def test_text_only_string_content_and_developer_role(client, model_id, tiny_model):
    messages = [{"role": "developer", "content": "Be terse."}, {"role": "user", "content": "Say hello."}]
    r = client.chat.completions.create(model=model_id, messages=messages, max_tokens=4, temperature=0)
    ref = tiny_model.chat([{"role": "system", "content": "Be terse."}, messages[1]], max_new_tokens=4)
    assert r.choices[0].message.content == ref.text
    assert r.model_extra["phi3v"]["image_tokens"] == 0


def test_seeded_sampling_is_reproducible(client, model_id):
    def ask():
        return client.chat.completions.create(model=model_id, messages=one_image_messages(), max_tokens=6,
                                              temperature=1.0, top_p=0.9, seed=7).choices[0].message.content
    assert ask() == ask()


def test_model_name_basename_and_full_path_accepted(client, tiny_model_dir):
    for name in (tiny_model_dir.name, str(tiny_model_dir)):
        r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}], max_tokens=1)
        assert r.usage.completion_tokens == 1


# ---- errors ----------------------------------------------------------------------------------


def _error(exc_info):
    err = exc_info.value
    return err.status_code, err.body  # body is the "error" object of the OpenAI shape


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    status, body = _error(e)
    assert status == 404 and body["code"] == "model_not_found" and "gpt-4o" in body["message"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


@pytest.mark.parametrize("url, code, words", [
    ("data:image/png;base64,@@not base64@@", "invalid_base64", "base64"),
    (data_uri(b"this is not an image at all, just some bytes......"), "invalid_image", ""),
    ("file:///etc/passwd", "invalid_image", "data: URI"),
    ("/etc/passwd", "invalid_image", "data: URI"),
    ("https://example.com/cat.png", "invalid_image", "--allow-remote-images"),
    ("data:text/plain;base64,aGVsbG8=", "invalid_image", "image/*"),
    # percent-encoded data: URIs are refused, as open_image refuses them (one rule: docs/images.md)
    ("data:image/png," + urllib.parse.quote_from_bytes(IMG_A), "invalid_image", "must be base64"),
    ("data:image/png;base64,", "invalid_image", "no image data"),
])
def test_bad_images_are_400(client, model_id, url, code, words):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "what?"}]}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_id, messages=messages, max_tokens=1)
    status, body = _error(e)
    assert status == 400 and body["code"] == code and body["type"] == "invalid_request_error"
    assert words in body["message"]
    assert "Traceback" not in body["message"]


def test_url_safe_base64_data_uri_is_accepted_like_open_image(client, model_id):
    """The server decodes data: URIs with the engine's rules, which accept the URL-safe alphabet."""
    raw = next(png for png in (png_bytes(48, 32, seed=s) for s in range(50))
               if "+" in base64.b64encode(png).decode() or "/" in base64.b64encode(png).decode())
    answers = []
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        url = "data:image/png;base64," + encode(raw).decode()
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": "what?"}]}]
        answers.append(client.chat.completions.create(model=model_id, messages=messages, max_tokens=3,
                                                      temperature=0).choices[0].message.content)
    assert answers[0] == answers[1]


def test_too_many_images_is_400(client, model_id):
    content = [image_part(png_bytes(8, 8, seed=i)) for i in range(4)] + [{"type": "text", "text": "x"}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": content}], max_tokens=1)
    status, body = _error(e)
    assert body["code"] == "too_many_images" and "at most 3 images" in body["message"]


def test_prompt_longer_than_context_is_400_with_counts(client, model_id, tiny_model):
    limit = tiny_model.context_length
    with pytest.raises(openai.BadRequestError) as e:  # prompt + max_tokens over the context
        client.chat.completions.create(model=model_id, messages=one_image_messages(), max_tokens=limit)
    status, body = _error(e)
    prompt = greedy(tiny_model, one_image_messages(), 1).usage
    assert body["code"] == "context_length_exceeded" and body["param"] == "messages"
    assert f"maximum context length is {limit} tokens" in body["message"]
    assert f"{prompt.prompt_tokens} in the messages, {prompt.image_tokens} of them image tokens" in body["message"]
    assert f"{limit} in the completion" in body["message"]


def test_prompt_alone_longer_than_context_is_400(model_id, tiny_model_dir):
    import phi3v

    small = phi3v.load(str(tiny_model_dir), device="cpu", dtype="float32", progress=False, max_context=500)
    with RunningServer(small, ServerSettings(default_num_crops=1)) as srv:
        messages = [{"role": "user", "content": [image_part(IMG_A), image_part(IMG_B), {"type": "text", "text": "?"}]}]
        with pytest.raises(openai.BadRequestError) as e:  # two 1-crop images are > 600 tokens
            srv.client().chat.completions.create(model=model_id, messages=messages)
        status, body = _error(e)
        assert body["code"] == "context_length_exceeded"
        assert "maximum context length is 500 tokens" in body["message"]
        assert srv.health()["queue"]["served"] == 0  # refused before it reached the engine


@pytest.mark.parametrize("kwargs, param", [
    ({"n": 2}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
])
def test_unsupported_parameters_are_400(client, model_id, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "x"}], max_tokens=1,
                                       **kwargs)
    status, body = _error(e)
    assert body["param"] == param and body["code"] == "unsupported_parameter" and param in body["message"]


@pytest.mark.parametrize("kwargs, param, words", [
    ({"extra_body": {"best_of": 3}}, "best_of", "Unrecognized request argument supplied: best_of"),
    ({"temperature": 3}, "temperature", "less than or equal to 2"),
    ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"extra_body": {"num_crops": 0}}, "num_crops", "greater than or equal to 1"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
])
def test_invalid_values_are_400(client, model_id, kwargs, param, words):
    request = {"max_tokens": 1, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "x"}], **request)
    status, body = _error(e)
    assert body["param"] == param and words in body["message"]


def test_malformed_messages_are_400(server, model_id):
    url = server.base_url + "/v1/chat/completions"
    cases = [
        (b"{not json", "not valid JSON"),
        (b'{"model": "%s", "messages": []}' % model_id.encode(), "messages"),
        (b'{"model": "%s", "messages": [{"role": "tool", "content": "x"}]}' % model_id.encode(), "messages.0.role"),
    ]
    for raw, words in cases:
        r = httpx.post(url, content=raw, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 400, raw
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and words in err["message"]


def test_image_in_assistant_turn_is_400(client, model_id):
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": [image_part(IMG_A)]},
                {"role": "user", "content": "y"}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_id, messages=messages, max_tokens=1)
    assert "only allowed in user messages" in e.value.body["message"]


def test_body_over_limit_is_413(server, client, model_id):
    big = png_bytes(400, 400, seed=5)  # ~480 KB of PNG noise, over the 256 KiB limit
    assert len(big) > 256 * 1024
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": [image_part(big)]}])
    assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"
    assert "256 KiB" in e.value.body["message"] or "262144 bytes" in e.value.body["message"]

    def chunks():  # no Content-Length: the limit is counted as the bytes arrive
        yield b'{"model": "x", "messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"a" * 10_000
        yield b'"}]}'
    r = httpx.post(server.base_url + "/v1/chat/completions", content=chunks(),
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert server.health()["status"] == "ok"


def test_engine_failure_is_500_without_traceback_and_server_survives(server, client, flaky, model_id):
    flaky.fail_next = True
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert e.value.status_code == 500 and e.value.body["type"] == "server_error"
    assert "secret" not in e.value.response.text and "Traceback" not in e.value.response.text

    flaky.fail_next = True  # while streaming: an error event, then the stream ends
    with pytest.raises(openai.APIError) as e:
        for _ in client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "x"}],
                                                max_tokens=2, stream=True):
            pass
    assert "secret" not in str(e.value)

    r = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert r.usage.completion_tokens == 2
    health = server.health()
    assert health["status"] == "ok" and health["queue"]["failed"] == 2


def test_unknown_route_is_404_in_openai_shape(server):
    r = httpx.get(server.base_url + "/v1/nothing-here", timeout=10)
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_remote_images_only_when_allowed(tiny_model, model_id):
    """--allow-remote-images: http URLs are fetched (here from a loopback file server) with a size cap."""
    import http.server
    import threading

    small, big = png_bytes(8, 8, seed=7), png_bytes(64, 64, seed=8)
    files = {"/small.png": small, "/big.png": big}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = files.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    settings = ServerSettings(allow_remote_images=True, remote_max_bytes=2000, remote_timeout_s=5, default_num_crops=1,
                              allow_private_image_urls=True)  # the file server is on loopback
    assert len(small) < 2000 < len(big)
    try:
        with RunningServer(tiny_model, settings) as srv:
            client = srv.client()

            def ask(url):
                return client.chat.completions.create(model=model_id, max_tokens=4, messages=[
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": "What is it?"}]}])

            r = ask(base + "/small.png")
            ref = tiny_model.chat([{"role": "user", "content": [{"type": "image", "image": small},
                                                                {"type": "text", "text": "What is it?"}]}],
                                  max_new_tokens=4, num_crops=1)
            assert r.choices[0].message.content == ref.text
            for path in ("/big.png", "/missing.png"):  # over the size cap; a 404 upstream
                with pytest.raises(openai.BadRequestError) as e:
                    ask(base + path)
                assert e.value.body["code"] == "invalid_image"
            with pytest.raises(openai.BadRequestError):  # still never a local file
                ask("file:///etc/hostname")
    finally:
        httpd.shutdown()
