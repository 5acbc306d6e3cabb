"""Request preparation off the event loop: its own thread pools and a total deadline per request.

Preparation is the blocking work a request needs before it may queue for the engine: data: URIs
decoded, remote images fetched, images and video frames decoded and preprocessed, the prompt tokenized, its fit in
the context checked. It runs in threads, so the event loop keeps answering (/health, other
requests), and in two pools, so slow image work cannot starve text:

- requests with images share `image_threads` threads; a remote server sending 1 byte/s holds one
  for as long as the fetcher's own limits allow (issue 11: two such downloads on the old pool of
  two threads made a text-only request wait 28 s);
- text-only requests have TEXT_THREADS threads of their own: their work is bounded by the
  character budget checked before (text_budget.py) and the tokenizer releases the GIL, so they
  never wait behind an image.

A request's preparation, waiting for a thread included, must end within `timeout_s`; then the
client gets a 408 at once. A preparation still waiting for a thread is dropped without running;
one already running cannot be interrupted (Python threads cannot be killed): it ends in its
thread, bounded by the fetcher's timeouts, and its result is thrown away.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable

from .api_errors import APIError

TEXT_THREADS = 2


class Preparer:
    def __init__(self, image_threads: int, timeout_s: float, text_threads: int = TEXT_THREADS):
        self.timeout_s = timeout_s
        self._image_pool = ThreadPoolExecutor(image_threads, thread_name_prefix="phi3v-prepare-image")
        self._text_pool = ThreadPoolExecutor(text_threads, thread_name_prefix="phi3v-prepare-text")

    async def run(self, work: Callable[..., Awaitable[Any]], *args, images: bool) -> Any:
        """await work(*args, pool=...) with the pool for requests with or without images, within
        the deadline, else APIError 408. `work` runs its blocking steps in `pool`
        (loop.run_in_executor); when the deadline cancels it, a step still queued there is
        taken off the pool (asyncio cancels the executor's future with it)."""
        pool = self._image_pool if images else self._text_pool
        try:
            return await asyncio.wait_for(work(*args, pool=pool), self.timeout_s)
        except asyncio.TimeoutError:
            raise preparation_timeout(self.timeout_s, images) from None

    def close(self) -> None:
        for pool in (self._image_pool, self._text_pool):
            pool.shutdown(wait=False, cancel_futures=True)


def preparation_timeout(timeout_s: float, images: bool) -> APIError:
    what = "fetching and decoding its images and video frames, reading its text" if images else "reading its text"
    hint = (" Send smaller images, fewer video frames, or data: URIs instead of slow URLs." if images else "")
    return APIError(408, f"Preparing the request ({what}) took longer than this server's limit of "
                         f"{timeout_s:g} s.{hint}", param="messages", code="preparation_timeout")
