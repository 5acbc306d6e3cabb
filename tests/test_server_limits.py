"""Server limits: API key, a full queue under 32 concurrent clients, clients that hang up, the CLI.

Run with `pytest -s` to see the concurrency figures (served / rejected, latency median and max).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from phi3v.server import ServerSettings
from server_harness import RunningServer, SlowSteps, image_part, png_bytes

IMG = png_bytes(40, 30, seed=11)
N_CLIENTS = 32
MAX_QUEUE = 4


def small_request(model_id, i=0, max_tokens=4):
    content = [image_part(IMG), {"type": "text", "text": f"Question {i}: what is this?"}]
    return dict(model=model_id, messages=[{"role": "user", "content": content}], max_tokens=max_tokens,
                temperature=0)


@pytest.fixture(scope="module")
def server(tiny_model):
    # max_batch=1: one request decodes at a time, so a long stream holds the engine and the queue's
    # bound is what the tests below count (continuous batching has its own tests).
    settings = ServerSettings(max_queue=MAX_QUEUE, max_batch=1, default_num_crops=1)
    with RunningServer(tiny_model, settings) as srv:
        srv.model_id = srv.health()["model"]
        yield srv


# ---- API key ----------------------------------------------------------------------------------


def test_api_key_required_when_set(tiny_model):
    with RunningServer(tiny_model, ServerSettings(api_key="s3cret", default_num_crops=1)) as srv:
        model_id = srv.health()["model"]  # /health stays open (load balancers), and says auth is on
        assert srv.health()["auth"] is True

        with pytest.raises(openai.AuthenticationError) as e:
            srv.client(api_key="wrong").chat.completions.create(model=model_id, max_tokens=1,
                                                                messages=[{"role": "user", "content": "x"}])
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        assert "s3cret" not in e.value.response.text

        r = httpx.get(srv.base_url + "/v1/models", timeout=10)  # no Authorization header at all
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
        assert r.headers["www-authenticate"] == "Bearer"

        good = srv.client(api_key="s3cret")
        assert [m.id for m in good.models.list().data] == [model_id]
        out = good.chat.completions.create(model=model_id, max_tokens=2, messages=[{"role": "user", "content": "x"}])
        assert out.usage.completion_tokens == 2
        assert httpx.get(srv.base_url + "/", timeout=10).status_code == 200  # the page itself is public


# ---- concurrency ----------------------------------------------------------------------------------


def _run_clients(srv, n, max_tokens=4):
    """n clients at once; -> list of (status, seconds, text or None, headers)."""
    client = srv.client()
    start_gate = threading.Barrier(n)

    def one(i):
        start_gate.wait()
        t0 = time.perf_counter()
        try:
            r = client.chat.completions.create(**small_request(srv.model_id, i, max_tokens))
            return 200, time.perf_counter() - t0, r.choices[0].message.content, {}
        except openai.RateLimitError as err:
            return 429, time.perf_counter() - t0, err.body, dict(err.response.headers)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def _report(label, results):
    served = [r for r in results if r[0] == 200]
    rejected = [r for r in results if r[0] == 429]
    lat = sorted(r[1] for r in served)
    print(f"\n[{label}] {len(results)} clients: served {len(served)}, rejected (429) {len(rejected)}; "
          f"served latency median {statistics.median(lat):.3f} s, max {max(lat):.3f} s"
          + (f"; 429 latency max {max(r[1] for r in rejected):.3f} s" if rejected else ""))
    return served, rejected


def test_32_concurrent_clients_get_an_answer_or_429(server, tiny_model):
    before = server.health()["queue"]
    results = _run_clients(server, N_CLIENTS)
    served, rejected = _report("free-running, max_queue=4", results)

    assert len(served) + len(rejected) == N_CLIENTS  # nothing else: no 5xx, no dropped connection
    assert len(served) >= 1  # the first arrival always finds an empty queue
    expected = tiny_model.chat(
        [{"role": "user", "content": [{"type": "image", "image": IMG},
                                      {"type": "text", "text": "Question 0: what is this?"}]}],
        max_new_tokens=4, num_crops=1)
    texts = {r[2] for r in served}
    assert all(isinstance(t, str) and t for t in texts)
    for status, _, body, headers in rejected:
        assert body["code"] == "queue_full" and int(headers["retry-after"]) >= 1
    health = server.wait_health(lambda h: h["queue"]["waiting"] == 0 and h["queue"]["running"] == 0)
    assert health["status"] == "ok"
    assert health["queue"]["served"] - before["served"] == len(served)
    assert health["queue"]["rejected"] - before["rejected"] == len(rejected)
    # the server still answers correctly afterwards
    r = server.client().chat.completions.create(**small_request(server.model_id, 0))
    assert r.choices[0].message.content == expected.text


def test_queue_full_while_engine_busy_exact_counts(server):
    """A long generation holds the engine: exactly MAX_QUEUE of 32 clients are queued, the rest get 429."""
    client = server.client()
    blocker = client.chat.completions.create(model=server.model_id, messages=[{"role": "user", "content": "go"}],
                                             max_tokens=20_000, stream=True)
    it = iter(blocker)
    next(it), next(it)  # role chunk, then the first text: the engine is now busy with it
    before = server.health()["queue"]

    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(_run_clients, server, N_CLIENTS)
        # wait until every client is either queued or rejected, then free the engine
        server.wait_health(lambda h: h["queue"]["waiting"] == MAX_QUEUE
                           and h["queue"]["rejected"] - before["rejected"] == N_CLIENTS - MAX_QUEUE, timeout=60)
        blocker.close()  # hang up: the long generation stops, the queued requests run
        results = future.result(timeout=120)
    served, rejected = _report("engine held busy, max_queue=4", results)
    assert len(served) == MAX_QUEUE and len(rejected) == N_CLIENTS - MAX_QUEUE
    health = server.wait_health(lambda h: h["queue"]["running"] == 0 and h["queue"]["waiting"] == 0)
    assert health["queue"]["cancelled"] - before["cancelled"] == 1  # the blocker, not run to its end


# ---- clients that hang up ---------------------------------------------------------------------------


def test_client_hanging_up_mid_stream_stops_generation(server):
    before = server.health()["queue"]
    body = {"model": server.model_id, "messages": [{"role": "user", "content": "talk"}], "max_tokens": 20_000,
            "stream": True}
    received = 0
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server.base_url + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    received += 1
                if received == 3:
                    break  # leaving the with-blocks closes the connection mid-stream
    assert received == 3
    health = server.wait_health(lambda h: h["queue"]["cancelled"] > before["cancelled"] and h["queue"]["running"] == 0)
    assert health["queue"]["served"] == before["served"]  # it did not run on to 20000 tokens
    r = server.client().chat.completions.create(**small_request(server.model_id))
    assert r.usage.completion_tokens == 4


def test_client_hanging_up_before_non_streamed_answer(server):
    """A non-streamed request whose client leaves while it is generating is cancelled too."""
    before = server.health()["queue"]
    body = {"model": server.model_id, "messages": [{"role": "user", "content": "talk"}], "max_tokens": 20_000}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=1.0))
    health = server.wait_health(lambda h: h["queue"]["cancelled"] > before["cancelled"] and h["queue"]["running"] == 0)
    assert health["queue"]["served"] == before["served"]


# ---- the command line ---------------------------------------------------------------------------------


def test_cli_serve_subprocess(tiny_model_dir, tmp_path):
    """`python -m phi3v.server` (= `phi3v serve`) on its default loopback host, then SIGTERM."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PHI3V_API_KEY", None)
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "phi3v.server", "--model", str(tiny_model_dir), "--device", "cpu",
                             "--dtype", "float32", "--num-crops", "1", "--port", str(port), "--max-queue", "2",
                             "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
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
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        model_id = client.models.list().data[0].id
        assert model_id == tiny_model_dir.name
        r = client.chat.completions.create(**small_request(model_id, max_tokens=3))
        assert r.usage.completion_tokens == 3 and r.model_extra["phi3v"]["num_crops"] == 1
    finally:
        proc.terminate()
        proc.wait(30)
    out = (tmp_path / "serve.log").read_text()
    assert f"http://127.0.0.1:{port}/" in out and "Traceback" not in out


# ---- continuous batching: every request joins the running batch ---------------------------------


def test_requests_join_a_running_stream_and_keep_their_solo_answers(tiny_model):
    """A long stream runs; streamed and non-streamed requests with other lengths join it, decode
    together, and every text (the long stream's included) equals the request's run alone."""
    with RunningServer(SlowSteps(tiny_model), ServerSettings(max_queue=8, default_num_crops=1)) as srv:
        model_id = srv.health()["model"]
        client = srv.client()
        long_request = small_request(model_id, 9, max_tokens=60)
        blocker = iter(client.chat.completions.create(**long_request, stream=True))
        pieces = [next(blocker).choices[0].delta.content or ""]  # the engine is busy with it now
        lengths = (4, 3, 2)
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(client.chat.completions.create, **small_request(model_id, i, n))
                       for i, n in enumerate(lengths)]
            streamed = pool.submit(lambda: "".join(
                chunk.choices[0].delta.content or "" for chunk in
                client.chat.completions.create(**small_request(model_id, 5, 6), stream=True) if chunk.choices))
            answers = [f.result(timeout=60) for f in futures]
            streamed_text = streamed.result(timeout=60)
        pieces += [chunk.choices[0].delta.content or "" for chunk in blocker if chunk.choices]
        health = srv.wait_health(lambda h: h["queue"]["running"] == 0)
        assert health["queue"]["peak_running"] >= 3 and health["queue"]["batches"] > 0
        assert health["queue"]["served"] >= 5

    def alone(i, n):
        return tiny_model.chat([{"role": "user", "content": [{"type": "image", "image": IMG},
                                {"type": "text", "text": f"Question {i}: what is this?"}]}],
                               max_new_tokens=n, num_crops=1)

    assert "".join(pieces) == alone(9, 60).text
    assert streamed_text == alone(5, 6).text
    for i, (n, answer) in enumerate(zip(lengths, answers)):
        ref = alone(i, n)
        assert answer.choices[0].message.content == ref.text
        assert answer.usage.completion_tokens == ref.usage.completion_tokens == n
