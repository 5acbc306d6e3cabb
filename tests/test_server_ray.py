"""`phi3v serve --ray ADDRESS --replicas 2`: the same server as replicas on Ray Serve.

One module-scoped local Ray cluster on 127.0.0.1 (test_batch_ray's fixture: `ray start --head` with
2 CPUs in its own session, stopped at the end) and one real `phi3v serve --ray` process deploying 2
replicas of the tiny checkpoint, each loading its own model, behind Ray Serve's HTTP proxy on a free
loopback port. The official openai client talks to the proxy: greedy texts (streamed and not) must
equal phi3v's Python API, the API key is enforced, bad requests get exactly the single server's
OpenAI-shaped errors, and both replicas answer (each response names its replica in X-Phi3v-Replica).
Ctrl-C (SIGINT) on the serve process removes the app and exits 0.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'phi3v[ray]'")

from phi3v.server import ServerSettings  # noqa: E402
from phi3v.server.ray_serve import REPLICA_HEADER  # noqa: E402
from server_harness import RunningServer, as_python_api, image_part, png_bytes  # noqa: E402
from test_batch_ray import env, free_port, ray_address  # noqa: E402,F401  (the module-scoped cluster)

KEY = "ray-test-key"
IMG = png_bytes(48, 32, seed=5)
START_TIMEOUT_S = 150  # Ray Serve start-up plus two replicas importing torch and loading, on 2 shared cores


class ServeProcess:
    def __init__(self, proc: subprocess.Popen, log: Path, port: int):
        self.proc, self.log, self.base_url = proc, log, f"http://127.0.0.1:{port}"

    def client(self, api_key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key=api_key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def served(ray_address, tiny_model_dir, tmp_path_factory):  # noqa: F811
    port = free_port()
    log = tmp_path_factory.mktemp("serve-ray") / "serve.log"
    command = [sys.executable, "-m", "phi3v", "serve", "--model", str(tiny_model_dir), "--device", "cpu",
               "--dtype", "float32", "--num-crops", "1", "--api-key", KEY, "--ray", ray_address,
               "--replicas", "2", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env(), start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "phi3v: serving" not in log.read_text():  # printed once serve.run saw every replica start
            assert proc.poll() is None, f"phi3v serve --ray exited {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"phi3v serve --ray did not start:\n{log.read_text()}"
            time.sleep(0.5)
        yield ServeProcess(proc, log, port)
    finally:
        proc.send_signal(signal.SIGINT)  # as Ctrl-C: the app is deleted from the cluster, then exit
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
    assert code == 0, f"phi3v serve --ray exited {code} on Ctrl-C:\n{log.read_text()}"
    assert "stopping the replicas" in log.read_text()


def greedy(tiny_model, messages, max_tokens):
    return tiny_model.chat(as_python_api(messages), max_new_tokens=max_tokens, num_crops=1, temperature=0.0).text


CASES = [  # (messages, max_tokens, stream)
    ([{"role": "user", "content": [image_part(IMG), {"type": "text", "text": "What is this?"}]}], 6, False),
    ([{"role": "user", "content": [image_part(IMG), {"type": "text", "text": "Describe it."}]}], 8, True),
    ([{"role": "user", "content": "Say hello."}], 5, True),
    ([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Why?"}], 7, False),
    ([{"role": "user", "content": [{"type": "text", "text": "Count."}]}], 4, True),
    ([{"role": "user", "content": "A story, please."}], 8, False),
]


def ask(client: openai.OpenAI, model: str, messages, max_tokens: int, stream: bool) -> tuple[str, str]:
    """(text, replica id) of one greedy request, streamed or not."""
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=stream)
    replica = raw.headers.get(REPLICA_HEADER)
    if not stream:
        return raw.parse().choices[0].message.content, replica
    chunks = list(raw.parse())
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return "".join(pieces), replica


def test_texts_equal_python_api_and_both_replicas_answer(served, tiny_model, tiny_model_dir):
    client = served.client()
    model = tiny_model_dir.name
    assert [m.id for m in client.models.list().data] == [model]
    # Concurrent, so the proxy spreads them and each replica batches several at once.
    with ThreadPoolExecutor(len(CASES)) as pool:
        answers = list(pool.map(lambda case: ask(client, model, *case), CASES))
    for (messages, max_tokens, _), (text, replica) in zip(CASES, answers):
        assert text == greedy(tiny_model, messages, max_tokens)
        assert replica
    replicas = {replica for _, replica in answers}
    # Which replica answers is the router's choice: ask /health (each replica answers it) until both did.
    for _ in range(60):
        if len(replicas) == 2:
            break
        replicas.add(httpx.get(served.base_url + "/health", timeout=10).headers[REPLICA_HEADER])
    assert len(replicas) == 2, replicas


def test_endpoints_of_the_single_server(served):
    health = httpx.get(served.base_url + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["auth"] is True
    schema = httpx.get(served.base_url + "/openapi.json", timeout=10).json()
    assert "/v1/chat/completions" in schema["paths"]
    page = httpx.get(served.base_url + "/", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]


def test_api_key_is_enforced(served, tiny_model_dir):
    with pytest.raises(openai.AuthenticationError) as err:
        served.client(api_key="wrong").models.list()
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    missing = httpx.post(served.base_url + "/v1/chat/completions", timeout=10,
                         json={"model": tiny_model_dir.name, "messages": [{"role": "user", "content": "hi"}]})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"


BAD_REQUESTS = [  # (method, path, JSON body or raw bytes)
    ("POST", "/v1/chat/completions", {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/v1/chat/completions", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}],
                                      "temperature": "hot"}),
    ("POST", "/v1/chat/completions", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "n": 3}),
    ("POST", "/v1/chat/completions", {"model": "MODEL", "messages": []}),
    ("POST", "/v1/chat/completions", b"{not json"),
    ("GET", "/v1/no-such-route", None),
]


def test_bad_requests_get_the_single_servers_errors(served, tiny_model, tiny_model_dir):
    model = tiny_model_dir.name
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    with RunningServer(tiny_model, ServerSettings(api_key=KEY, default_num_crops=1)) as single:
        for method, path, body in BAD_REQUESTS:
            if isinstance(body, dict):
                body = httpx.Request("POST", "/", json={k: model if v == "MODEL" else v
                                                       for k, v in body.items()}).content
            got = [httpx.request(method, base + path, content=body, headers=headers, timeout=10)
                   for base in (served.base_url, single.base_url)]
            assert 400 <= got[0].status_code < 500, (path, body, got[0].text)
            assert got[0].status_code == got[1].status_code, (path, body)
            assert got[0].json() == got[1].json(), (path, body)
            assert set(got[0].json()) == {"error"}
