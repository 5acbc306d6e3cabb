"""Graceful shutdown and readiness: SIGTERM drains (503 for newcomers, in-flight requests finish
or are cancelled after --shutdown-timeout-s), /health says loading/ready/draining, exit code 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from phi3v.server import ServerSettings, create_app
from phi3v.server.shutdown import DrainingServer
from server_harness import RunningServer
from server_harness import SlowSteps
from test_server_observability import request


def draining(srv: RunningServer) -> RunningServer:
    """The harness's server as `phi3v serve` runs it: a DrainingServer (shutdown.py)."""
    srv.server = DrainingServer(srv.server.config, srv.app.state.lifecycle)
    srv.thread = threading.Thread(target=srv.server.run, kwargs={"sockets": [srv.sock]}, daemon=True)
    return srv


class Stream:
    """A streamed chat completion read on a thread: its SSE events, as they come."""

    def __init__(self, base_url: str, body: dict):
        self.events: list = []
        self.first = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(base_url, body), daemon=True)
        self.thread.start()

    def _run(self, base_url, body):
        try:
            with httpx.stream("POST", base_url + "/v1/chat/completions", json={**body, "stream": True},
                              timeout=60) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        data = line[6:]
                        self.events.append(data if data == "[DONE]" else json.loads(data))
                        if len(self.events) >= 2:  # the role chunk, then a first token
                            self.first.set()
        except BaseException as err:  # noqa: BLE001 - reported by the test
            self.error = err
        finally:
            self.first.set()

    def result(self, timeout=60) -> list:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the stream never ended"
        assert self.error is None, repr(self.error)
        return self.events

    @staticmethod
    def text(events) -> str:
        return "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                       if isinstance(e, dict) and e.get("choices"))


def wait_for(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not (got := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return got


# ---- in process ---------------------------------------------------------------------------------


def test_health_is_loading_until_the_engine_starts(tiny_model):
    from fastapi.testclient import TestClient

    app = create_app(tiny_model)
    client = TestClient(app, base_url="http://localhost")  # without `with`: the lifespan has not run, the worker not started
    r = client.get("/health")
    assert r.status_code == 503 and r.json()["state"] == "loading" and r.json()["status"] == "loading"
    r = client.post("/v1/chat/completions", json=request("x"))
    assert r.status_code == 503 and r.json()["error"]["code"] == "server_starting" and r.headers["retry-after"]
    with TestClient(app, base_url="http://localhost") as started:
        r = started.get("/health")
        assert r.status_code == 200 and r.json()["state"] == "ready" and r.json()["status"] == "ok"
    assert app.state.lifecycle.state == "stopped"


def test_drain_finishes_the_stream_in_flight_and_refuses_new_requests(tiny_model):
    srv = draining(RunningServer(SlowSteps(tiny_model, 0.05), ServerSettings(default_num_crops=1)))
    with srv:
        model_id = srv.health()["model"]
        stream = Stream(srv.base_url, request(model_id, max_tokens=60))  # 3 s at 50 ms a step
        assert stream.first.wait(30)
        srv.server.should_exit = True  # what uvicorn's SIGTERM handler does
        health = wait_for(lambda: (r := httpx.get(srv.base_url + "/health", timeout=10)).status_code == 503 and r,
                          what="/health to say draining")
        assert health.json()["state"] == "draining" and health.json()["status"] == "draining"
        refused = httpx.post(srv.base_url + "/v1/chat/completions", json=request(model_id), timeout=10)
        assert refused.status_code == 503, refused.text
        err = refused.json()["error"]
        assert err["code"] == "server_shutting_down" and err["type"] == "server_error"
        assert int(refused.headers["retry-after"]) >= 1 and refused.headers["connection"] == "close"
        scraped = httpx.get(srv.base_url + "/metrics", timeout=10)  # still scraped, and shows the drain
        assert scraped.status_code == 200 and 'phi3v_state{state="draining"} 1.0' in scraped.text
        assert "phi3v_requests_in_flight 1.0" in scraped.text
        events = stream.result()
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
        srv.thread.join(20)
        assert not srv.thread.is_alive(), "the server did not stop after the drain"
    with pytest.raises(httpx.TransportError):  # closed: connections are refused now
        httpx.get(srv.base_url + "/health", timeout=2)
    assert Stream.text(events) == tiny_model.chat(
        [{"role": "user", "content": [{"type": "image", "image": _img()}, {"type": "text", "text": "What is this?"}]}],
        max_new_tokens=60, num_crops=1).text  # the whole answer, undisturbed


def _img():
    from test_server_observability import IMG

    return IMG


def test_drain_timeout_cancels_what_is_left(tiny_model):
    # max_batch 1: the stream runs, the other request waits in the queue; both are cancelled.
    settings = ServerSettings(default_num_crops=1, shutdown_timeout_s=0.5, max_batch=1)
    srv = draining(RunningServer(SlowSteps(tiny_model, 0.05), settings))
    with srv:
        model_id = srv.health()["model"]
        stream = Stream(srv.base_url, request(model_id, max_tokens=2000))
        plain = {}
        waiter = threading.Thread(target=lambda: plain.update(r=httpx.post(
            srv.base_url + "/v1/chat/completions", json=request(model_id, "Long?", max_tokens=2000), timeout=60)))
        assert stream.first.wait(30)  # the stream holds the one place in the batch...
        waiter.start()  # ...so this one waits in the queue
        wait_for(lambda: srv.worker.snapshot()["waiting"] == 1, what="the second request waiting")
        t0 = time.monotonic()
        srv.server.should_exit = True
        events = stream.result()
        waiter.join(30)
        assert time.monotonic() - t0 < 10  # cancelled after 0.5 s, not run for 2000 tokens
        srv.thread.join(20)
        assert not srv.thread.is_alive()
    # The stream says why it ended (an OpenAI error event), then [DONE]; the waiting client gets a 503.
    metrics = srv.app.state.metrics.render()[0].decode()
    assert 'phi3v_generations_total{finish_reason="cancelled"} 2.0' in metrics
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "server_shutting_down"
    assert plain["r"].status_code == 503 and plain["r"].json()["error"]["code"] == "server_shutting_down"


# ---- `phi3v serve` in a subprocess, stopped by SIGTERM ---------------------------------------------

LAUNCHER = """
import sys, time
import phi3v.engine.generate as generate
# Each decode step 50 ms longer, so a stream is surely in flight when SIGTERM comes (the tiny
# model generates a token in about a millisecond); everything else is `phi3v serve` as shipped.
step = generate.DecodeLoop.step
def slow_step(self):
    time.sleep(0.05)
    return step(self)
generate.DecodeLoop.step = slow_step
from phi3v.cli.main import main
sys.exit(main(["serve"] + sys.argv[1:]))
"""


def start_serve(tiny_model_dir, tmp_path, *flags):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = tmp_path / "serve_slow.py"
    launcher.write_text(LAUNCHER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PHI3V_API_KEY", None)
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, str(launcher), "--model", str(tiny_model_dir), "--device", "cpu",
                             "--dtype", "float32", "--num-crops", "1", "--port", str(port), *flags],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()
        assert time.monotonic() < deadline, "server did not come up"
        time.sleep(0.2)
    return proc, base, httpx.get(base + "/health", timeout=5).json()["model"]


def test_sigterm_drains_then_exits_0(tiny_model_dir, tmp_path):
    proc, base, model_id = start_serve(tiny_model_dir, tmp_path, "--log-format", "json")
    try:
        stream = Stream(base, request(model_id, max_tokens=40))
        assert stream.first.wait(30)
        proc.send_signal(signal.SIGTERM)
        refused = wait_for(lambda: _post_or_none(base, request(model_id)), what="a refusal")
        # 503 while draining; once closed, connections are refused (_post_or_none -> "refused").
        assert refused == "refused" or (refused.status_code == 503 and
                                         refused.json()["error"]["code"] == "server_shutting_down")
        events = stream.result()
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
        assert len(Stream.text(events)) > 0
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    out = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in out
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    requests = [line for line in lines if line.get("event") == "request" and line["path"] == "/v1/chat/completions"]
    assert any(r["status"] == 200 and r["completion_tokens"] == 40 for r in requests)
    assert any("shutting down" in line.get("message", "") for line in lines)


def test_sigterm_cancels_what_outlasts_the_timeout_then_exits_0(tiny_model_dir, tmp_path):
    proc, base, model_id = start_serve(tiny_model_dir, tmp_path, "--shutdown-timeout-s", "0.5")
    try:
        stream = Stream(base, request(model_id, max_tokens=2000))
        assert stream.first.wait(30)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        events = stream.result()
        assert events[-2]["error"]["code"] == "server_shutting_down" and events[-1] == "[DONE]"
        assert proc.wait(30) == 0
        assert time.monotonic() - t0 < 15
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


def _post_or_none(base, body):
    try:
        r = httpx.post(base + "/v1/chat/completions", json=body, timeout=10)
    except httpx.TransportError:
        return "refused"
    return r if r.status_code == 503 else None
