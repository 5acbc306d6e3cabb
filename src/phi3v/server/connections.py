"""How uvicorn takes connections for `phi3v serve`: limits, and a deadline for a request's headers.

Uvicorn closes idle keep-alive connections (timeout_keep_alive) but has no deadline for the
headers of a request: a client that connects and sends nothing, or half a request line, holds
the connection forever (2,000 of those were held open in a test). HeaderDeadlineProtocol, the h11
protocol with such a deadline, closes them. The body has its own deadline (body_deadline.py).
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

KEEP_ALIVE_S = 5  # idle time between requests on one connection (uvicorn's default)
MAX_HEADER_BYTES = 16 * 1024  # request line + headers (h11's default, said here so it is a decision)


class HeaderDeadlineProtocol(H11Protocol):
    """H11Protocol that closes a connection whose request headers are not complete within
    `header_timeout_s`, counted from the connection's start or the end of its previous response."""

    header_timeout_s = 10.0  # set per server by uvicorn_config (uvicorn instantiates the class itself)

    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the headers are in: the body deadline takes over
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE:  # waiting for the next request's headers
            self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()  # no answer: there is no request to answer yet


def uvicorn_config(app, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **overrides):
    """The uvicorn.Config of `phi3v serve` for `app` (made by create_app: its settings are
    app.state.settings). Tests run the real server with this config too."""
    import uvicorn

    settings = app.state.settings
    protocol = type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,),
                    {"header_timeout_s": settings.header_timeout_s})
    options = dict(
        host=host, port=port, log_level=log_level,
        http=protocol,  # h11 with the header deadline (also where h11_max_incomplete_event_size applies)
        timeout_keep_alive=KEEP_ALIVE_S,
        limit_concurrency=settings.max_connections,  # more connections or tasks: 503
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        timeout_graceful_shutdown=5,
    )
    options.update(overrides)
    return uvicorn.Config(app, **options)
