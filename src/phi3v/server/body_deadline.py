"""ASGI middleware: a request's whole body must arrive within a deadline, or the client gets 408.

Uvicorn waits for body bytes as long as the connection stays open, so a client that sends its
headers and then one byte a minute (slow loris) holds a connection and a task forever; a few
thousand of them starve the server. The deadline counts from the moment the headers were read and
covers the whole body, not each read: a trickle cannot keep extending it. Once the body is
complete, receive() is passed through untouched (the app then uses it to notice hang-ups).
"""

from __future__ import annotations

import asyncio
import time

from starlette.exceptions import HTTPException

from .api_errors import APIError


class BodyTimeout(HTTPException):
    # An HTTPException so that FastAPI's body reader re-raises it instead of turning it into a 400.
    def __init__(self, seconds: float):
        super().__init__(408, f"The request body did not arrive within {seconds:g} s.")


class BodyDeadlineMiddleware:
    def __init__(self, app, seconds: float):
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        deadline = time.monotonic() + self.seconds
        body_done = False
        started = False

        async def timed_receive():
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
            except asyncio.TimeoutError:
                raise BodyTimeout(self.seconds) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, timed_receive, tracking_send)
        except BodyTimeout as err:
            if started:
                raise
            response = APIError(408, err.detail, code="request_timeout").response()
            # Connection: close, and uvicorn closes it: the rest of the body is never read.
            await send({"type": "http.response.start", "status": 408,
                        "headers": response.raw_headers + [(b"connection", b"close")]})
            await send({"type": "http.response.body", "body": response.body})
