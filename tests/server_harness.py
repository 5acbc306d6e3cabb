"""Test helpers for the server: run the real app under uvicorn on loopback, make small images.

Not a test module (no test_ prefix); imported by tests/test_server*.py and tests/test_web_page.py.
"""

from __future__ import annotations

import base64
import io
import socket
import threading
import time

import numpy as np
from PIL import Image


def png_bytes(width: int = 48, height: int = 32, seed: int = 0) -> bytes:
    """A small random RGB PNG (lossless, so the server sees exactly these pixels)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def image_part(raw: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_uri(raw)}}


def as_python_api(messages: list[dict]) -> list[dict]:
    """The same conversation for phi3v's Python API: data: URIs become raw image bytes."""
    out = []
    for m in messages:
        if isinstance(m["content"], str):
            out.append(dict(m))
            continue
        parts = []
        for p in m["content"]:
            if p["type"] == "image_url":
                b64 = p["image_url"]["url"].split(",", 1)[1]
                parts.append({"type": "image", "image": base64.b64decode(b64)})
            else:
                parts.append(p)
        out.append({"role": m["role"], "content": parts})
    return out


class RunningServer:
    """`create_app(model, settings)` served by uvicorn in a background thread on 127.0.0.1."""

    def __init__(self, model, settings=None, *, log_level: str = "warning"):
        import uvicorn

        from phi3v.server import create_app
        from phi3v.server.connections import uvicorn_config

        self.app = create_app(model, settings)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))  # a free port, held until uvicorn takes the socket over
        self.port = self.sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        # The config of `phi3v serve` (limits, header deadline); host and port come from the socket.
        config = uvicorn_config(self.app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "RunningServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()

    @property
    def worker(self):
        return self.app.state.worker

    def client(self, api_key: str = "unused", **kwargs):
        import openai

        kwargs.setdefault("max_retries", 0)  # a 429 must reach the test, not be retried
        kwargs.setdefault("timeout", 120)
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key=api_key, **kwargs)

    def health(self) -> dict:
        import httpx

        return httpx.get(self.base_url + "/health", timeout=10).json()

    def wait_health(self, predicate, timeout: float = 30.0) -> dict:
        """Poll /health until predicate(health) is true (liveness, not a timing assertion)."""
        deadline = time.monotonic() + timeout
        while True:
            h = self.health()
            if predicate(h):
                return h
            if time.monotonic() > deadline:
                raise AssertionError(f"server never reached the expected state; last /health: {h}")
            time.sleep(0.05)


class SlowSteps:
    """A model whose decode steps each take `delay` s longer, so requests surely overlap and a
    stream is still running when a test looks at it."""

    def __init__(self, model, delay=0.02):
        self._model, self._delay = model, delay

    def __getattr__(self, name):
        return getattr(self._model, name)

    def new_loop(self, *args, **kwargs):
        loop = self._model.new_loop(*args, **kwargs)
        step = loop.step

        def slow_step():
            time.sleep(self._delay)
            return step()

        loop.step = slow_step
        return loop
