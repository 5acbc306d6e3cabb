"""The server's app as a Ray Serve deployment: N replicas, each with its own model and engine worker.

    spec = ReplicaSpec(model="/models/phi-3.5-vision", device="cuda", dtype=None, settings=...)
    serve.run(deployment(spec, replicas=2, actor_options={"num_cpus": 1, "num_gpus": 1}).bind(),
              name=APP_NAME, route_prefix="/")

Each replica is one Ray actor (one process) running exactly the app `phi3v serve` runs under
uvicorn: `create_app(model, settings)` with its engine worker and continuous batching, behind Ray
Serve's HTTP proxy. So endpoints, errors, streaming and the API key are the same code, not a copy.

The app is handed to `serve.ingress` as `ReplicaApp`, a small ASGI object that only holds the
ReplicaSpec (picklable, a few strings and the ServerSettings) and builds the real app inside the
replica when Serve runs the ASGI lifespan start-up: the model is never pickled or loaded in the
driver, and every replica loads its own copy with the same load options. Building at lifespan
start-up works with any Ray whose `serve.ingress` accepts an ASGI app (a builder function, the
other way to defer it, needs a newer Ray).

Every response carries `X-Phi3v-Replica: <replica id>` so an operator (and the tests) can see which
replica answered; /health is answered per replica too.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from .settings import ServerSettings

log = logging.getLogger("phi3v.server.ray_serve")

APP_NAME = "phi3v"  # the Serve application (and deployment) name
REPLICA_HEADER = "x-phi3v-replica"
# Requests a replica accepts beyond its engine's own bounds (max_batch running + max_queue waiting):
# the overflow reaches the replica and gets its 429 + Retry-After (as from one server) and /health
# is still answered, instead of both waiting without bound in Serve's router.
HEADROOM = 8


@dataclass(frozen=True)
class ReplicaSpec:
    """What each replica loads and serves: phi3v.load's arguments and the server settings."""

    model: str  # hub id, or a folder path valid on every node (absolute)
    device: str  # as seen inside the replica: "cpu", "cuda" (Ray gives it one GPU), "mps"
    dtype: str | None
    settings: ServerSettings
    quantize: str | None = None
    low_memory: bool | None = None
    revision: str | None = None
    torch_threads: int = 1  # CPU threads the replica reserved; torch's default (all cores) would oversubscribe


def load_replica_app(spec: ReplicaSpec):
    """The app of one replica: its own model, loaded as `phi3v serve` loads it."""
    import torch

    import phi3v

    from . import create_app

    torch.set_num_threads(max(1, spec.torch_threads))
    model = phi3v.load(spec.model, device=spec.device, dtype=spec.dtype, progress=False,
                       quantize=spec.quantize, low_memory=spec.low_memory, revision=spec.revision)
    return create_app(model, spec.settings)


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_tag
    except Exception:  # not inside a Serve replica (a unit test calling the app directly)
        import os

        return f"pid-{os.getpid()}"


class ReplicaApp:
    """ASGI app: builds the replica's phi3v app at lifespan start-up, then forwards everything to it."""

    def __init__(self, spec: ReplicaSpec):
        self.spec = spec
        self.app = None  # the FastAPI app, once built (in the replica, never in the driver)
        self.replica_id = None

    def __getstate__(self):  # only the spec travels to the replicas
        return {"spec": self.spec}

    def __setstate__(self, state):
        self.__init__(state["spec"])

    async def __call__(self, scope, receive, send):
        if self.app is None:
            if scope["type"] != "lifespan":  # Serve runs the lifespan before any request
                raise RuntimeError("the phi3v replica app was called before its lifespan start-up")
            # Off the event loop: loading takes seconds to minutes, Serve's replica loop stays responsive.
            self.app = await asyncio.to_thread(load_replica_app, self.spec)
            self.replica_id = _replica_id()
            log.info("phi3v replica %s loaded %s", self.replica_id, self.spec.model)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        header = (REPLICA_HEADER.encode(), str(self.replica_id).encode())

        async def send_with_replica(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        await self.app(scope, receive, send_with_replica)

    def healthy(self) -> bool:
        """False once the engine worker has stopped for good (Serve then replaces the replica)."""
        worker = getattr(getattr(self.app, "state", None), "worker", None)
        return worker is None or worker.alive


def deployment(spec: ReplicaSpec, *, replicas: int, actor_options: dict):
    """The Serve deployment of `spec`: `replicas` copies, each an actor with `actor_options`."""
    from ray import serve

    asgi = ReplicaApp(spec)

    @serve.ingress(asgi)
    class Phi3VReplica:
        def check_health(self):
            # Serve calls this periodically; an engine worker that died (see engine_worker.py's
            # supervisor) makes the replica unhealthy and Serve starts a fresh one.
            app = getattr(self, "app", None) or getattr(self, "_asgi_app", None)
            if isinstance(app, ReplicaApp) and not app.healthy():
                raise RuntimeError("the phi3v engine worker has stopped")

    settings = spec.settings
    return serve.deployment(
        Phi3VReplica, name=APP_NAME, num_replicas=replicas, ray_actor_options=actor_options,
        max_ongoing_requests=settings.max_batch + settings.max_queue + HEADROOM)
