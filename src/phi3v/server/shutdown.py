"""Readiness and graceful shutdown: loading -> ready -> draining -> stopped.

    loading    the app exists, the engine worker has not started (/health 503)
    ready      serving (/health 200)
    draining   SIGTERM (or SIGINT) came: new requests get 503 + Retry-After with an OpenAI error
               body and `Connection: close`, /health answers 503 "draining" so load balancers
               stop sending; the requests in flight go on, for at most --shutdown-timeout-s
    stopped    the lifespan ended (the engine worker stopped)

Uvicorn alone, on SIGTERM, closes its listening socket at once and gives the requests in flight
`timeout_graceful_shutdown` seconds. `DrainingServer` puts the drain first, while the port is
still open (a client then gets a 503 it can act on, and a probe sees "draining", rather than a
refused connection): once nothing is in flight, or the timeout has passed and the rest were
cancelled (a streamed answer ends with an error event, a waiting one gets 503), uvicorn's own
shutdown runs (closes the socket and idle connections, then the lifespan stops the worker).
After that a SIGTERM shutdown exits 0: uvicorn would re-raise the signal, and a process killed by
its own signal reads as a crash to a supervisor, though this one finished its work.

With `phi3v serve` the port is bound only once the model has loaded: while loading, connections
are refused, which load balancers and Kubernetes probes treat as not ready, as they do "loading".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import time

import uvicorn

from .api_errors import APIError

log = logging.getLogger("phi3v.server")

LOADING, READY, DRAINING, STOPPED = "loading", "ready", "draining", "stopped"
# Paths that work whatever the state: probes must see "draining", scrapes the drain's progress.
ALWAYS_OPEN = frozenset({"/health", "/metrics"})
CANCEL_GRACE_S = 2.0  # after cancelling, time for the cancelled requests to send their error
POLL_S = 0.05


class Lifecycle:
    def __init__(self, shutdown_timeout_s: float = 30.0, on_timeout=None):
        """on_timeout(): cancel what still runs when the drain's time is up (the engine's jobs)."""
        self.state = LOADING
        self.shutdown_timeout_s = shutdown_timeout_s
        self.on_timeout = on_timeout
        self.in_flight = 0  # requests being served (probes and scrapes not counted)
        self._drain_deadline: float | None = None

    @property
    def ready(self) -> bool:
        return self.state == READY

    def started(self) -> None:
        if self.state == LOADING:
            self.state = READY

    def stopped(self) -> None:
        self.state = STOPPED

    def retry_after_s(self) -> int:
        """While draining: the time left to the drain (this process is gone by then; another
        replica, or this one restarted, answers). Loading: a few seconds."""
        if self._drain_deadline is None:
            return 5
        return max(1, math.ceil(self._drain_deadline - time.monotonic()))

    def refusal(self) -> APIError:
        if self.state == LOADING:
            message, code = "The server is starting; retry shortly.", "server_starting"
        else:
            message, code = ("The server is shutting down and accepts no new requests; retry (another "
                             "replica, or this server once restarted).", "server_shutting_down")
        return APIError(503, message, type="server_error", code=code,
                        headers={"Retry-After": str(self.retry_after_s()), "Connection": "close"})

    async def drain(self) -> None:
        """Refuse new requests, wait for those in flight (up to the timeout), then cancel the rest."""
        if self.state == READY or self.state == LOADING:
            self.state = DRAINING
        start = time.monotonic()
        self._drain_deadline = start + self.shutdown_timeout_s
        log.info("shutting down: %d request(s) in flight get up to %g s to finish; new requests get 503",
                 self.in_flight, self.shutdown_timeout_s)
        await self._wait_idle(self._drain_deadline)
        if self.in_flight:
            log.warning("shutdown timeout (%g s): cancelling %d request(s) in flight", self.shutdown_timeout_s,
                        self.in_flight)
            if self.on_timeout is not None:
                self.on_timeout()
            await self._wait_idle(time.monotonic() + CANCEL_GRACE_S)
        log.info("drained in %.2f s%s", time.monotonic() - start,
                 f"; {self.in_flight} request(s) left to uvicorn's shutdown" if self.in_flight else "")

    async def _wait_idle(self, deadline: float) -> None:
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)


class DrainMiddleware:
    """Counts the requests in flight; refuses new ones (503) unless the app is ready."""

    def __init__(self, app, lifecycle: Lifecycle):
        self.app, self.lifecycle = app, lifecycle

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") in ALWAYS_OPEN:
            return await self.app(scope, receive, send)
        if not self.lifecycle.ready:
            return await self.lifecycle.refusal().response()(scope, receive, send)
        self.lifecycle.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.lifecycle.in_flight -= 1


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose shutdown starts with the app's drain (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle):
        super().__init__(config)
        self.lifecycle = lifecycle
        self._drain: asyncio.Task | None = None

    async def on_tick(self, counter: int) -> bool:
        # uvicorn's main loop asks every 0.1 s whether to stop; it stops once the drain is done.
        if not await super().on_tick(counter):
            return False
        if self.force_exit:  # a second Ctrl-C: stop now, as uvicorn does
            return True
        if self._drain is None:
            self._drain = asyncio.ensure_future(self.lifecycle.drain())
        return self._drain.done()

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            try:
                yield
            finally:
                # Uvicorn re-raises the signals it caught once it has shut down; SIGTERM's work
                # (a graceful stop) is done, so the process exits 0 instead of being killed by it.
                # SIGINT is still re-raised: Ctrl-C ends the command as an interrupt.
                caught = getattr(self, "_captured_signals", None)
                if caught is not None:
                    caught[:] = [s for s in caught if s != signal.SIGTERM]
