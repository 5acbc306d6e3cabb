"""engine/remote_image.py: what a server fetching its clients' image URLs must not do (issue 11).

Loopback servers stand in for a service on the server's private network: refused by default,
fetched with allow_private. A server trickling one byte a second runs into the total deadline.
Failed downloads say the same thing whether the port was closed, the peer hung up or it timed out.
"""

from __future__ import annotations

import http.server
import socket
import threading
import time

import pytest

from phi3v.engine import remote_image
from phi3v.engine.image import ImageSourcePolicy, open_image
from phi3v.errors import ImageError
from server_harness import png_bytes

PNG = png_bytes(12, 8, seed=3)


@pytest.fixture(scope="module")
def image_server():
    """127.0.0.1: /ok.png, /slow.png (headers, then one byte a second), /to-local (redirect)."""
    seen_hosts = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen_hosts.append(self.headers.get("Host"))
            if self.path == "/to-local":
                self.send_response(302)
                self.send_header("Location", f"http://127.0.0.1:{self.server.server_address[1]}/ok.png")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            if self.path == "/slow.png":
                for b in PNG[:20]:
                    try:
                        self.wfile.write(bytes([b]))
                        self.wfile.flush()
                    except OSError:
                        return
                    time.sleep(1)
                return
            self.wfile.write(PNG)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd.server_address[1], seen_hosts
    httpd.shutdown()
    httpd.server_close()


def policy(**kw) -> ImageSourcePolicy:
    return ImageSourcePolicy(allow_paths=False, allow_remote=True, **kw)


def test_loopback_refused_by_default_and_fetched_when_allowed(image_server):
    base, _, _ = image_server
    with pytest.raises(ImageError, match="local or private network address"):
        open_image(base + "/ok.png", policy())
    for host in ("localhost", "[::1]"):  # other spellings of loopback (nothing needs to listen there)
        with pytest.raises(ImageError, match="local or private network address"):
            open_image(f"http://{host}:9/x.png", policy())
    assert open_image(base + "/ok.png", policy(allow_private=True)).size == (12, 8)


def test_redirect_to_a_private_address_refused(image_server, monkeypatch):
    """Each hop is checked: the first (taken as public here) redirects to 127.0.0.1, refused."""
    base, _, seen_hosts = image_server
    verdicts = iter([True])
    monkeypatch.setattr(remote_image, "_is_public", lambda address: next(verdicts, False))
    n = len(seen_hosts)
    with pytest.raises(ImageError, match="local or private network address"):
        remote_image.fetch_image_bytes(base + "/to-local", timeout_s=5, max_bytes=10**6, allow_private=False)
    assert len(seen_hosts) == n + 1  # the redirect was read, its target never asked


def test_every_address_checked_and_the_checked_one_used(image_server, monkeypatch):
    base, port, seen_hosts = image_server
    answers = {"mixed.example": ["93.184.216.34", "10.0.0.7"], "pinned.example": ["127.0.0.1"]}

    def fake_resolve(host, p, timeout):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, p)) for a in answers[host]]

    monkeypatch.setattr(remote_image, "_resolve", fake_resolve)
    with pytest.raises(ImageError, match="local or private"):  # one private answer among public ones
        remote_image.fetch_image_bytes(f"http://mixed.example:{port}/ok.png", timeout_s=5, max_bytes=10**6,
                                       allow_private=False)
    # The connection goes to the resolved address (the name resolves nowhere for real) and the
    # Host header keeps the name.
    body = remote_image.fetch_image_bytes(f"http://pinned.example:{port}/ok.png", timeout_s=5,
                                          max_bytes=10**6, allow_private=True)
    assert body == PNG and seen_hosts[-1] == f"pinned.example:{port}"


@pytest.mark.parametrize("address,public", [
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False),
    ("::1", False), ("fe80::1%eth0", False), ("fc00::1", False), ("::ffff:127.0.0.1", False),
    ("::ffff:10.0.0.1", False), ("8.8.8.8", True), ("2606:4700:4700::1111", True),
])
def test_public_addresses(address, public):
    assert remote_image._is_public(address) is public


def test_total_deadline_cuts_a_trickling_download(image_server):
    base, _, _ = image_server
    t0 = time.monotonic()
    with pytest.raises(ImageError, match="could not download") as e:
        open_image(base + "/slow.png", policy(allow_private=True, timeout_s=2))
    assert time.monotonic() - t0 < 4, "the deadline is per download, not per read"
    assert "Errno" not in str(e.value)


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _server(behaviour) -> tuple[int, socket.socket]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            behaviour(conn)

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1], listener


def test_failures_do_not_reveal_port_state():
    """Closed port, a peer that hangs up, one that never answers, garbage: the same message."""
    held = []
    hang_up_port, l1 = _server(lambda c: c.close())
    silent_port, l2 = _server(held.append)
    garbage_port, l3 = _server(lambda c: (c.sendall(b"SSH-2.0-OpenSSH_9.6\r\n"), c.close()))
    messages = {}
    try:
        for label, port in (("closed", _closed_port()), ("hang-up", hang_up_port), ("silent", silent_port),
                            ("garbage", garbage_port)):
            url = f"http://127.0.0.1:{port}/x.png"
            with pytest.raises(ImageError) as e:
                open_image(url, policy(allow_private=True, timeout_s=1))
            messages[label] = str(e.value).replace(str(port), "PORT")
    finally:
        for s in [l1, l2, l3, *held]:
            s.close()
    assert len(set(messages.values())) == 1, messages
