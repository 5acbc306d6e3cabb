"""ObserverMiddleware: follows each HTTP request from its headers to the end of its response.

It is the outermost middleware, so what it sees is what the client got, whoever answered (a
route, the host guard's 400, the body limit's 413, the drain's 503): it counts the request by
endpoint and status code (metrics.py), writes its log line (request_log.py) and answers with its
request id in `X-Request-ID` (the client's own, when it sent a plain one), to find the line again.

A pure ASGI middleware (not BaseHTTPMiddleware): a streamed response passes through untouched and
the line is written when its last byte has been sent (or the client went away).
"""

from __future__ import annotations

import logging
import time

from .request_log import begin_request, end_request, log_request

log = logging.getLogger("phi3v.server")


class ObserverMiddleware:
    def __init__(self, app, metrics, log_format: str = "text"):
        self.app, self.metrics, self.log_format = app, metrics, log_format

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        client_id = _header(scope, b"x-request-id")
        record, token = begin_request(scope.get("method", ""), scope.get("path", ""), client_id)

        async def send_observed(message):
            if message["type"] == "http.response.start":
                record.status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": headers + [(b"x-request-id", record.id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            end_request(token)
            try:  # observing must never turn a served request into a failed one
                self.metrics.count_request(record.path, record.status, time.perf_counter() - record.started)
                log_request(record, self.log_format)
            except Exception:  # noqa: BLE001
                log.exception("recording a request failed")


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None
