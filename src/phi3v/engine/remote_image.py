"""Download one remote image (http or https) for `image.open_image`, safely enough for a server.

A server that fetches URLs its clients name can be used to reach what only the server can reach
(server-side request forgery). So, unless the caller allows private addresses:

- the host is resolved once and every address it resolves to must be global (not loopback,
  link-local, private, shared, reserved, multicast or unspecified); the connection then goes to
  the address that was checked, so a DNS answer that changes between check and connect (DNS
  rebinding) cannot swap in another one. Each redirect is checked the same way.
- a failed download says the same thing however it failed (refused, reset, closed, timed out,
  unresolvable, not HTTP): a client must not learn which ports of a host are open.

Limits: one total deadline per download (connect, redirects, headers and body together; a
server sending one byte a second is cut off when it passes, not after each slow read) and the
size cap, checked against Content-Length and again while reading.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
import urllib.parse

from ..errors import ImageError
from .image_source import check_byte_size, short_repr

MAX_REDIRECTS = 5
_CHUNK = 1 << 16


class _Failed(Exception):
    """Any network-level failure; turned into the one message that reveals nothing."""


def fetch_image_bytes(url: str, *, timeout_s: float, max_bytes: int, allow_private: bool,
                      kind: str = "image") -> bytes:
    """The body of `url` after at most MAX_REDIRECTS http(s) redirects, or an ImageError.

    kind: what the URL should hold, for the messages and the Accept header ("image", "video")."""
    name = short_repr(url)
    deadline = _Deadline(timeout_s)
    try:
        for _ in range(MAX_REDIRECTS + 1):
            status, reason, location, body = _get(url, deadline, max_bytes, allow_private, name, kind)
            if location is None:
                if status >= 400:
                    raise ImageError(f"could not download {kind} {name}: HTTP {status} {reason}")
                return body
            target = urllib.parse.urljoin(url, location)
            if urllib.parse.urlsplit(target).scheme.lower() not in ("http", "https"):
                raise ImageError(f"{kind} URL {name} redirects to a non-http(s) URL {short_repr(target)}")
            url = target
        raise ImageError(f"{kind} URL {name} redirects more than {MAX_REDIRECTS} times")
    except _Failed:
        raise ImageError(f"could not download {kind} {name}: no answer with {_a(kind)} within "
                         f"{timeout_s:g} s (the host may be unreachable)") from None


def _a(noun: str) -> str:
    return ("an " if noun[:1] in "aeiou" else "a ") + noun


class _Deadline:
    def __init__(self, seconds: float):
        self.at = time.monotonic() + seconds

    def left(self) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise _Failed()
        return left


def _get(url: str, deadline: _Deadline, max_bytes: int, allow_private: bool, name: str, kind: str = "image"):
    """One GET -> (status, reason, Location of a redirect or None, body of a non-redirect)."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        host, port = parts.hostname, parts.port or (443 if scheme == "https" else 80)
    except ValueError:  # a port that is not a number
        raise ImageError(f"{kind} URL {name} is malformed") from None
    if scheme not in ("http", "https") or not host:
        raise ImageError(f"{kind} URL {name} is malformed")
    address = _checked_address(host, port, deadline, allow_private, name, kind)
    conn = _PinnedConnection(scheme, host, port, address, deadline.left())
    # The deadline is total: when it passes, the socket is shut down under whatever read is waiting
    # (a socket timeout alone restarts with each byte that trickles in).
    watchdog = threading.Timer(deadline.left(), conn.abort)
    watchdog.daemon = True
    watchdog.start()
    try:
        target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        conn.request("GET", target, headers={"User-Agent": "phi3v", "Accept": f"{kind}/*"})
        response = conn.getresponse()
        if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
            return response.status, response.reason, response.getheader("Location"), b""
        if response.status >= 400:
            return response.status, response.reason, None, b""
        length = response.getheader("Content-Length")
        if length is not None and length.strip().isdigit():
            check_byte_size(int(length), name, max_bytes)
        chunks, total = [], 0
        while True:
            chunk = response.read1(_CHUNK)  # returns what one read gives: the size check sees it now
            if not chunk:
                break
            total += len(chunk)
            check_byte_size(total, name, max_bytes)
            chunks.append(chunk)
        if conn.aborted:
            raise _Failed()  # cut off by the deadline: the body is incomplete
        return response.status, response.reason, None, b"".join(chunks)
    except (OSError, http.client.HTTPException, ValueError):
        raise _Failed() from None
    finally:
        watchdog.cancel()
        conn.close()


def _checked_address(host: str, port: int, deadline: _Deadline, allow_private: bool, name: str,
                     kind: str = "image") -> str:
    """The address to connect to: resolved once; with allow_private False, every address the name
    resolves to must be global (one private answer among public ones is enough to refuse)."""
    try:
        infos = _resolve(host, port, deadline.left())
    except OSError:
        raise _Failed() from None
    addresses = [info[4][0] for info in infos]
    if not addresses:
        raise _Failed()
    if not allow_private:
        for address in addresses:
            if not _is_public(address):
                raise ImageError(f"{kind} URL {name} points to a local or private network address; "
                                 "only public addresses are fetched")
    return addresses[0]


def _resolve(host: str, port: int, timeout: float):
    """getaddrinfo with a timeout (it has none of its own): run in a daemon thread, waited for."""
    result: list = []

    def lookup():
        try:
            result.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as err:
            result.append(err)

    thread = threading.Thread(target=lookup, daemon=True, name="phi3v-resolve")
    thread.start()
    thread.join(timeout)
    if not result or isinstance(result[0], OSError):
        raise OSError("could not resolve")
    return result[0]


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 scope (fe80::1%eth0) is link-local
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback
    return ip.is_global and not ip.is_multicast


class _PinnedConnection:
    """http.client connection to `address` for the URL's `host`: the Host header, TLS server name and
    certificate check use the host name; the socket goes to the address that was checked."""

    def __init__(self, scheme: str, host: str, port: int, address: str, timeout: float):
        self.aborted = False
        self._sock: socket.socket | None = None
        cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        kwargs = {"context": ssl.create_default_context()} if scheme == "https" else {}
        self._conn = cls(host, port, timeout=timeout, **kwargs)
        pinned = self

        def connect():  # replaces the connection's own connect(), which would resolve the host again
            sock = socket.create_connection((address, port), timeout)
            pinned._sock = sock
            if pinned.aborted:
                raise OSError("deadline passed")
            if scheme == "https":
                sock = kwargs["context"].wrap_socket(sock, server_hostname=host)
            self._conn.sock = sock

        self._conn.connect = connect

    def request(self, *args, **kwargs):
        self._conn.request(*args, **kwargs)

    def getresponse(self):
        return self._conn.getresponse()

    def abort(self) -> None:
        self.aborted = True
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._conn.close()
