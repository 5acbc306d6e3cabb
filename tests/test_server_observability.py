"""/metrics (Prometheus) and the per-request log line, on the real server (tiny model, loopback)."""

from __future__ import annotations

import json
import logging
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from phi3v.errors import Phi3VError
from phi3v.server import ServerSettings, create_app
from phi3v.server.request_log import JsonFormatter
from server_harness import RunningServer, SlowSteps, image_part, png_bytes

IMG = png_bytes(40, 30, seed=21)


def scrape(srv, **headers) -> dict:
    """/metrics -> {(sample name, frozenset(labels)): value}, parsed by prometheus_client's parser."""
    r = httpx.get(srv.base_url + "/metrics", headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def request(model_id, text="What is this?", max_tokens=4, image=True, **extra) -> dict:
    content = ([image_part(IMG)] if image else []) + [{"type": "text", "text": text}]
    return dict(model=model_id, messages=[{"role": "user", "content": content}], max_tokens=max_tokens,
                temperature=0, **extra)


@pytest.fixture(scope="module")
def server(tiny_model):
    with RunningServer(tiny_model, ServerSettings(default_num_crops=1)) as srv:
        srv.model_id = srv.health()["model"]
        yield srv


def wait_for(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ---- /metrics ---------------------------------------------------------------------------------


def test_metrics_counters_and_histograms_move_as_requests_are_served(server):
    before = scrape(server)
    client = server.client()
    plain = client.chat.completions.create(**request(server.model_id, max_tokens=5))
    streamed = list(client.chat.completions.create(**request(server.model_id, "Again?", max_tokens=3),
                                                   stream=True, stream_options={"include_usage": True}))
    usage = streamed[-1].usage
    bad = httpx.post(server.base_url + "/v1/chat/completions", json={**request(server.model_id), "model": "nope"},
                     timeout=10)
    assert bad.status_code == 404
    invalid = httpx.post(server.base_url + "/v1/chat/completions", json={"messages": "x"}, timeout=10)
    assert invalid.status_code == 400
    after = wait_for(lambda: (s := scrape(server)) and
                     value(s, "phi3v_requests_total", endpoint="/v1/chat/completions", status="200")
                     - value(before, "phi3v_requests_total", endpoint="/v1/chat/completions", status="200") == 2
                     and s, what="both 200s counted")

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    chat = "/v1/chat/completions"
    assert delta("phi3v_requests_total", endpoint=chat, status="404") == 1
    assert delta("phi3v_requests_total", endpoint=chat, status="400") == 1
    assert delta("phi3v_prompt_tokens_total") == plain.usage.prompt_tokens + usage.prompt_tokens
    assert delta("phi3v_completion_tokens_total") == plain.usage.completion_tokens + usage.completion_tokens == 8
    assert delta("phi3v_image_tokens_total") == 2 * plain.model_extra["phi3v"]["image_tokens"] > 0
    assert delta("phi3v_generations_total", finish_reason="length") == 2
    for hist in ("phi3v_time_to_first_token_seconds", "phi3v_inter_token_latency_seconds",
                 "phi3v_queue_wait_seconds"):
        assert delta(hist + "_count") == 2, hist
        assert delta(hist + "_bucket", le="+Inf") == 2, hist
        assert delta(hist + "_sum") > 0, hist
    assert delta("phi3v_request_duration_seconds_count") == 4
    # The same image twice: the second request found its pixels and features in the caches.
    assert delta("phi3v_image_cache_hits_total", cache="features") >= 1
    assert delta("phi3v_image_cache_hits_total", cache="pixels") >= 1
    assert value(after, "phi3v_image_cache_bytes", cache="features") > 0
    assert 0 < value(after, "phi3v_image_cache_hit_ratio", cache="features") <= 1
    assert value(after, "phi3v_retained_kv_bytes") > 0  # the last conversation is kept for a follow-up
    assert value(after, "phi3v_batch_running") == 0 and value(after, "phi3v_queue_waiting") == 0
    assert value(after, "phi3v_batch_capacity") == 8 and value(after, "phi3v_queue_capacity") == 16
    assert value(after, "phi3v_state", state="ready") == 1 and value(after, "phi3v_state", state="draining") == 0
    assert value(after, "phi3v_requests_in_flight") == 0
    # A path nobody serves is counted under one label, not one series per URL.
    httpx.get(server.base_url + "/no/such/path/123", timeout=10)
    assert value(scrape(server), "phi3v_requests_total", endpoint="other", status="404") >= 1


def test_batch_size_and_kv_bytes_follow_a_stream_and_a_hang_up(tiny_model):
    """Continuous batching: a running stream shows in the batch size and KV bytes; hanging up
    frees its row, and both go back to 0."""
    with RunningServer(SlowSteps(tiny_model), ServerSettings(default_num_crops=1)) as srv:
        model_id = srv.health()["model"]
        idle = scrape(srv)
        assert value(idle, "phi3v_batch_running") == 0 and value(idle, "phi3v_batch_kv_cache_bytes") == 0
        stream = srv.client().chat.completions.create(**request(model_id, max_tokens=400), stream=True)
        chunks = iter(stream)
        next(chunks), next(chunks)  # the role chunk, then a token: the row is decoding
        busy = wait_for(lambda: (s := scrape(srv)) and value(s, "phi3v_batch_kv_cache_bytes") > 0 and s,
                        what="KV bytes of the running stream")
        assert value(busy, "phi3v_batch_running") == 1
        stream.close()  # the client hangs up mid-answer
        freed = wait_for(lambda: (s := scrape(srv)) and value(s, "phi3v_batch_running") == 0 and s,
                         what="the row to leave")
        assert value(freed, "phi3v_batch_kv_cache_bytes") == 0
        assert value(freed, "phi3v_generations_total", finish_reason="cancelled") == 1


def test_metrics_need_the_api_key_when_one_is_set_unless_public(tiny_model):
    with RunningServer(tiny_model, ServerSettings(api_key="s3cret")) as srv:
        r = httpx.get(srv.base_url + "/metrics", timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
        assert scrape(srv, authorization="Bearer s3cret")
    with RunningServer(tiny_model, ServerSettings(api_key="s3cret", public_metrics=True)) as srv:
        assert scrape(srv)  # --public-metrics: a Prometheus without the key may scrape


def test_apps_in_one_process_have_their_own_registries(tiny_model):
    a, b = create_app(tiny_model), create_app(tiny_model)  # no "Duplicated timeseries" error
    assert a.state.metrics.registry is not b.state.metrics.registry
    a.state.metrics.count_request("/health", 200, 0.0)
    text_b = b.state.metrics.render()[0].decode()
    assert 'endpoint="/health"' not in text_b


# ---- the log line -----------------------------------------------------------------------------


def request_lines(caplog, path="/v1/chat/completions") -> list[dict]:
    return [r.phi3v_request for r in caplog.records
            if r.name == "phi3v.server" and getattr(r, "phi3v_request", None) and r.phi3v_request["path"] == path]


def test_one_log_line_per_request_with_its_fields(server, caplog):
    caplog.set_level(logging.INFO, logger="phi3v.server")
    client = server.client()
    plain = client.chat.completions.with_raw_response.create(**request(server.model_id, max_tokens=4),
                                                             extra_headers={"X-Request-ID": "my-trace.42"})
    assert plain.headers["x-request-id"] == "my-trace.42"  # the client's own id, to find the line
    list(client.chat.completions.create(**request(server.model_id, "Stream?", max_tokens=3), stream=True))
    bad = httpx.post(server.base_url + "/v1/chat/completions", json={**request(server.model_id), "model": "nope"},
                     headers={"X-Request-ID": "bad id with spaces"}, timeout=10)
    assert bad.headers["x-request-id"].startswith("req-")  # not a plain token: replaced by ours
    lines = wait_for(lambda: len(request_lines(caplog)) >= 3 and request_lines(caplog), what="3 log lines")
    time.sleep(0.2)
    assert len(request_lines(caplog)) == 3  # one per request, no more
    by_status = {line["status"]: line for line in lines}
    assert set(by_status) == {200, 404} and len({line["id"] for line in lines}) == 3
    ok = [line for line in lines if line["status"] == 200]
    assert {line["completion_tokens"] for line in ok} == {4, 3}
    mine = next(line for line in ok if line["id"] == "my-trace.42")
    assert mine["completion_tokens"] == 4 and mine["finish_reason"] == "length"
    assert mine["prompt_tokens"] == plain.parse().usage.prompt_tokens and mine["image_tokens"] > 0
    for key in ("queue_s", "ttft_s", "tokens_per_s", "duration_s"):
        assert isinstance(mine[key], float) and mine[key] >= 0, key
    assert mine["duration_s"] >= mine["ttft_s"] > 0
    assert "completion_tokens" not in by_status[404]  # nothing was generated for it
    text = next(r.getMessage() for r in caplog.records if "my-trace.42" in r.getMessage())
    assert text.startswith("request id=my-trace.42 method=POST path=/v1/chat/completions status=200")
    assert "What is this" not in text  # no content in logs
    # Probes and scrapes are logged at DEBUG only.
    httpx.get(server.base_url + "/health", timeout=10)
    time.sleep(0.1)
    assert all(r.levelno == logging.DEBUG for r in caplog.records if getattr(r, "phi3v_request", {}).get("path")
               == "/health")


def test_a_path_cannot_forge_log_lines(server, caplog):
    caplog.set_level(logging.INFO, logger="phi3v.server")
    httpx.get(server.base_url + "/x%0AINFO%20phi3v.server:%20request%20id=forged", timeout=10)
    line = wait_for(lambda: [r.getMessage() for r in caplog.records
                             if getattr(r, "phi3v_request", {}).get("status") == 404], what="the 404's line")[0]
    assert "\n" not in line and 'path="/x\\nINFO phi3v.server: request id=forged"' in line


def test_json_log_format(tiny_model, caplog):
    caplog.set_level(logging.INFO, logger="phi3v.server")
    with RunningServer(tiny_model, ServerSettings(default_num_crops=1, log_format="json")) as srv:
        model_id = srv.health()["model"]
        srv.client().chat.completions.create(**request(model_id, max_tokens=2))
        wait_for(lambda: request_lines(caplog), what="the log line")
    record = next(r for r in caplog.records if getattr(r, "phi3v_request", None))
    line = json.loads(record.getMessage())  # the message itself is JSON
    assert line["event"] == "request" and line["completion_tokens"] == 2 and line["status"] == 200
    formatted = json.loads(JsonFormatter().format(record))  # --log-format json: one object per line
    assert formatted["level"] == "info" and formatted["logger"] == "phi3v.server"
    assert formatted["completion_tokens"] == 2 and "message" not in formatted
    other = json.loads(JsonFormatter().format(logging.LogRecord("x", logging.WARNING, "f", 1, "hi %s", ("you",),
                                                                None)))
    assert other["message"] == "hi you" and other["level"] == "warning"


def test_log_format_is_checked():
    with pytest.raises(Phi3VError, match="log_format"):
        ServerSettings(log_format="xml")


def test_serve_flags(capsys):
    from phi3v.cli.main import build_parser
    from phi3v.cli.serve import settings_from_args

    args = build_parser().parse_args(["serve", "--log-format", "json", "--public-metrics", "--shutdown-timeout-s", "5"])
    settings = settings_from_args(args)
    assert (settings.log_format, settings.public_metrics, settings.shutdown_timeout_s) == ("json", True, 5.0)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--log-format", "xml"])
    assert "invalid choice: 'xml'" in capsys.readouterr().err
