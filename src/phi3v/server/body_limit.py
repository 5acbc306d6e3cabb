"""ASGI middleware: refuse request bodies over a byte limit with 413, before they are buffered.

Two checks: the declared Content-Length (refused before any byte is buffered), and the bytes as
they arrive (a chunked upload, or a client that lies about its length, is cut off at the limit).
Before answering, the rest of the body is read and thrown away (up to DRAIN_LIMIT bytes): a client
such as httpx writes the whole body before it reads the answer, and would otherwise see a reset
connection instead of the 413.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException

from .api_errors import APIError

DRAIN_LIMIT = 256 * 2**20  # bodies larger than this are not drained: the connection is just closed


class BodyTooLarge(HTTPException):
    # An HTTPException so that FastAPI's body reader re-raises it instead of turning it into a 400.
    def __init__(self, limit: int):
        super().__init__(413, f"Request body too large: the limit is {limit} bytes ({limit / 2**20:g} MiB).")


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            if int(declared) <= DRAIN_LIMIT:
                await _drain(receive)
            return await _send_413(send, self.max_bytes)

        received = 0
        started = False
        body_done = False

        async def limited_receive():
            nonlocal received
            nonlocal body_done
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                if not body_done:
                    await _drain(receive, DRAIN_LIMIT - received)
                await _send_413(send, self.max_bytes)


async def _drain(receive, budget: int = DRAIN_LIMIT) -> None:
    """Read and discard the rest of the request body (at most `budget` bytes)."""
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request":
            return
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def _send_413(send, limit: int) -> None:
    err = APIError(413, BodyTooLarge(limit).detail, code="request_too_large")
    response = err.response()
    headers = response.raw_headers + [(b"connection", b"close")]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})
