"""Server hardening (issue 11): Host/Origin allow-lists, header and body deadlines, private image URLs.

The server runs for real on loopback (tests/server_harness.py, with the uvicorn config of
`phi3v serve`); slow clients are raw sockets, so nothing in between buffers or retries.
"""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from phi3v.cli.main import build_parser
from phi3v.cli.serve import served_settings
from phi3v.server import ServerSettings
from phi3v.server.host_guard import host_name
from server_harness import RunningServer

DEADLINE_S = 1.0  # header and body deadlines of the test server
SLACK_S = 2.0  # scheduling slack on 2 busy cores: the deadline passes well before this margin ends


@pytest.fixture(scope="module")
def server(tiny_model):
    settings = ServerSettings(default_num_crops=1, header_timeout_s=DEADLINE_S, body_timeout_s=DEADLINE_S)
    with RunningServer(tiny_model, settings) as srv:
        srv.model_id = srv.health()["model"]
        yield srv


def get(srv, path, **headers):
    return httpx.get(srv.base_url + path, headers=headers, timeout=10)


def assert_openai_error(r, status, code):
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and set(r.json()["error"]) == {"message", "type", "param", "code"}


# ---- Host ------------------------------------------------------------------------------------


def test_localhost_names_accepted_others_refused(server):
    port = server.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST", "localhost."):
        assert get(server, "/health", host=host).status_code == 200, host
    for host in (f"evil.example:{port}", "rebind.attacker.test", "127.0.0.1.nip.io", "localhost.evil.example",
                 "[::1]x", "localhost:http"):
        r = get(server, "/v1/models", host=host)
        assert_openai_error(r, 400, "invalid_host")
        assert "evil" not in r.text  # the name is not echoed back
    assert_openai_error(get(server, "/", host="evil.example"), 400, "invalid_host")


def test_request_without_host_refused(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        assert b" 400 " in _read_all(s).split(b"\r\n", 1)[0]


def test_allowed_hosts_setting(tiny_model):
    settings = ServerSettings(default_num_crops=1, allowed_hosts="api.example.com, *.corp.example")
    with RunningServer(tiny_model, settings) as srv:
        for host in ("api.example.com", "API.example.com:8443", "gpu1.corp.example"):
            assert get(srv, "/health", host=host).status_code == 200, host
        for host in ("localhost", "corp.example", "example.com"):
            assert get(srv, "/health", host=host).status_code == 400, host
    with RunningServer(tiny_model, ServerSettings(default_num_crops=1, allowed_hosts="*")) as srv:
        assert get(srv, "/health", host="anything.example").status_code == 200


@pytest.mark.parametrize("value,name", [("localhost:8000", "localhost"), ("[::1]:80", "[::1]"),
                                        ("Example.COM.", "example.com"), ("a:b", None), ("[::1", None)])
def test_host_name(value, name):
    assert host_name(value) == name


def test_serve_defaults_allowed_hosts_by_bind_address():
    def settings(*argv):
        return served_settings(build_parser().parse_args(["serve", "--model", "m", *argv]))

    assert settings().allowed_hosts is None  # loopback: localhost names only
    assert settings("--host", "0.0.0.0").allowed_hosts == "*"
    assert settings("--host", "0.0.0.0", "--allowed-hosts", "a.example").allowed_hosts == "a.example"
    s = settings("--allowed-origins", "https://app.example", "--header-timeout-s", "3", "--body-timeout-s", "4",
                 "--max-connections", "9", "--allow-private-image-urls")
    assert (s.allowed_origins, s.header_timeout_s, s.body_timeout_s, s.max_connections, s.allow_private_image_urls) \
        == ("https://app.example", 3.0, 4.0, 9, True)


# ---- Origin ----------------------------------------------------------------------------------


def test_foreign_origin_refused_on_v1(server):
    body = {"model": server.model_id, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    url = server.base_url + "/v1/chat/completions"
    for origin in ("http://evil.example", "null", f"http://localhost:{server.port}"):  # another origin, too
        r = httpx.post(url, json=body, headers={"origin": origin}, timeout=30)
        assert_openai_error(r, 403, "origin_not_allowed")
    assert_openai_error(get(server, "/v1/models", origin="http://evil.example"), 403, "origin_not_allowed")
    # the page at / calling its own server (same origin), and clients that send no Origin
    assert httpx.post(url, json=body, headers={"origin": server.base_url}, timeout=60).status_code == 200
    assert httpx.post(url, json=body, timeout=60).status_code == 200
    assert get(server, "/health", origin="http://evil.example").status_code == 200  # not /v1


def test_allowed_origins_setting_answers_cors(tiny_model):
    settings = ServerSettings(default_num_crops=1, allowed_origins="https://app.example")
    with RunningServer(tiny_model, settings) as srv:
        r = get(srv, "/v1/models", origin="https://app.example")
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        pre = httpx.options(srv.base_url + "/v1/chat/completions", timeout=10, headers={
            "origin": "https://app.example", "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://app.example"
        assert get(srv, "/v1/models", origin="https://other.example").status_code == 403


# ---- header and body deadlines ---------------------------------------------------------------


def _read_all(s: socket.socket) -> bytes:
    """Everything until the server closes the connection (or the socket timeout)."""
    out = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return out
        out += chunk


def _closed_within(s: socket.socket, seconds: float) -> tuple[bytes, float]:
    t0 = time.monotonic()
    s.settimeout(seconds)
    data = _read_all(s)  # a socket.timeout here means the server held the connection
    return data, time.monotonic() - t0


@pytest.mark.parametrize("sent", [b"", b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le"])
def test_stalled_headers_closed(server, sent):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(sent)
        data, took = _closed_within(s, DEADLINE_S + SLACK_S)
        assert data == b"" and took >= DEADLINE_S * 0.5


def test_stalled_headers_after_a_keep_alive_request_closed(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        first = s.recv(65536)
        while b"\r\n\r\n" not in first:
            first += s.recv(65536)
        head, _, body = first.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(
            b"content-length")))
        while len(body) < length:
            body += s.recv(65536)
        assert head.startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /health HTTP/1.1\r\nHo")  # then nothing: the keep-alive timer no longer applies
        data, _ = _closed_within(s, DEADLINE_S + SLACK_S)
        assert data == b""


def _post_head(port: int, length: int) -> bytes:
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def test_stalled_body_gets_408_and_close(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(_post_head(server.port, 1000) + b'{"model": ')
        data, took = _closed_within(s, DEADLINE_S + SLACK_S)
    status_line = data.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 408"), data[:200]
    assert b'"code":"request_timeout"' in data.replace(b" ", b"") and took >= DEADLINE_S * 0.5


def test_trickled_body_gets_408_at_the_total_deadline(server):
    """One byte every 0.2 s never lets a single read wait long: only a total deadline stops it."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(_post_head(server.port, 1000))
        t0 = time.monotonic()
        answered = b""
        s.settimeout(0.2)
        while time.monotonic() - t0 < DEADLINE_S + SLACK_S:
            try:
                s.sendall(b" ")
                answered += s.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            if answered:
                break
    assert answered.startswith(b"HTTP/1.1 408"), answered[:200]


def test_uvicorn_config_limits(tiny_model):
    from phi3v.server import create_app
    from phi3v.server.connections import HeaderDeadlineProtocol, uvicorn_config

    app = create_app(tiny_model, ServerSettings(max_connections=7, header_timeout_s=3))
    config = uvicorn_config(app, host="127.0.0.1", port=1)
    assert config.limit_concurrency == 7 and config.timeout_keep_alive == 5
    assert config.h11_max_incomplete_event_size == 16 * 1024
    assert issubclass(config.http, HeaderDeadlineProtocol) and config.http.header_timeout_s == 3


# ---- remote images: private addresses off unless the operator allows them ----------------------


def test_private_image_urls_refused_by_default(tiny_model):
    settings = ServerSettings(default_num_crops=1, allow_remote_images=True)
    with RunningServer(tiny_model, settings) as srv:
        model_id = srv.health()["model"]
        # The server's own port on loopback stands in for any service on its network.
        url = f"{srv.base_url}/health"
        r = httpx.post(srv.base_url + "/v1/chat/completions", timeout=30, json={
            "model": model_id, "max_tokens": 1,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]})
        assert_openai_error(r, 400, "invalid_image")
        assert "private network address" in r.json()["error"]["message"]
