"""ASGI middleware: answer only requests addressed to this server, and browsers only from allowed pages.

DNS rebinding: a web page on evil.example makes its own name resolve to 127.0.0.1, and the
browser then lets it talk to a local server (no API key by default) as if same-origin. The
browser still sends `Host: evil.example`, so a server that accepts only its own names (localhost,
127.0.0.1, [::1] when it listens on loopback) is out of reach. Other deployments list their names
with --allowed-hosts, or `*`.

Cross-site requests: any page can make the browser POST to http://127.0.0.1:8000/v1/... (it cannot
read the answer, but the model runs). Browsers name the page in the Origin header, so a /v1
request whose Origin is neither this server (the chat page at /) nor listed in --allowed-origins
is refused. Clients that are not browsers send no Origin and are not affected.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from .api_errors import APIError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def parse_list(text: str | None) -> tuple[str, ...]:
    """A comma-separated setting -> its non-empty items, lower-cased."""
    return tuple(item.strip().lower() for item in (text or "").split(",") if item.strip())


def loopback_bind(host: str) -> bool:
    """True when a server bound to `host` can only be reached from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(value: str) -> str | None:
    """The name of a Host header (or an origin's netloc) without the port, lower-cased, IPv6 in
    brackets; None when it is not a valid host."""
    value = value.strip().lower()
    if value.startswith("["):  # [::1] or [::1]:8000
        end = value.find("]")
        if end < 0 or (value[end + 1:] and not _is_port(value[end + 1:])):
            return None
        return value[: end + 1]
    name, colon, port = value.rpartition(":") if ":" in value else (value, "", "")
    if colon and not _is_port(":" + port):
        return None
    name = name.rstrip(".")  # "localhost." is localhost
    return name or None


def _is_port(text: str) -> bool:
    return text.startswith(":") and text[1:].isdigit() and len(text) <= 6


class HostGuardMiddleware:
    """allowed_hosts: names (no port), `*.example.com` for subdomains, `*` for any.
    allowed_origins: scheme://host[:port] origins besides the server's own, `*` for any."""

    def __init__(self, app, allowed_hosts: tuple[str, ...], allowed_origins: tuple[str, ...] = ()):
        self.app = app
        self.any_host = "*" in allowed_hosts
        self.hosts = frozenset(h for h in allowed_hosts if not h.startswith("*."))
        self.suffixes = tuple(h[1:] for h in allowed_hosts if h.startswith("*."))  # ".example.com"
        self.any_origin = "*" in allowed_origins
        self.origins = frozenset(o.rstrip("/") for o in allowed_origins)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1")
        if not self.any_host and not self._host_allowed(host):
            # No echo of the name: it is whatever the client (or attacker's page) put there.
            err = APIError(400, "Invalid Host header: this server does not answer to that name (see "
                                "`phi3v serve --allowed-hosts`).", code="invalid_host")
            return await _send(err, send)
        origin = headers.get(b"origin")
        if origin is not None and scope["path"].startswith("/v1") and not self._origin_allowed(
                origin.decode("latin-1"), host):
            err = APIError(403, "Requests from web pages of other origins are not allowed (see "
                                "`phi3v serve --allowed-origins`).", code="origin_not_allowed")
            return await _send(err, send)
        return await self.app(scope, receive, send)

    def _host_allowed(self, host: str) -> bool:
        name = host_name(host) if host else None
        if name is None:
            return False
        return name in self.hosts or any(name.endswith(s) for s in self.suffixes)

    def _origin_allowed(self, origin: str, host: str) -> bool:
        origin = origin.strip().lower().rstrip("/")
        if self.any_origin or origin in self.origins:
            return True
        parts = urlsplit(origin)  # "null" (sandboxed frames, file: pages) has no netloc: refused
        # The same origin: the page at / calling its own server (http, or https behind a proxy).
        return parts.scheme in ("http", "https") and bool(parts.netloc) and parts.netloc == host.strip().lower()


async def _send(err: APIError, send) -> None:
    # The body is not read: the connection is closed after the answer so unread bytes cannot be
    # taken for the next request.
    response = err.response()
    await send({"type": "http.response.start", "status": response.status_code,
                "headers": response.raw_headers + [(b"connection", b"close")]})
    await send({"type": "http.response.body", "body": response.body})
