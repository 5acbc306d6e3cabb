"""A memory budget for requests being prepared: concurrent large requests queue instead of
exhausting RAM.

Preparing a request (decoding its images, the HD transform) takes memory in proportion to the
decoded pixels, which a 500 KB PNG can make a gigabyte. The pixel budgets of ImageSourcePolicy
bound one request; this bounds all of them together. Before a request is prepared its peak is
estimated from its image headers (nothing decoded), and it waits, first come first served,
until that estimate fits next to the preparations in flight. Text-only requests never wait.

The budget is held until the preparation thread has finished, not merely until the waiting
coroutine gives up (a deadline or a hang-up cannot free memory a thread still uses).
"""

from __future__ import annotations

import asyncio
import collections
from concurrent.futures import Executor
from typing import Callable

from ..engine.image import ImageSourcePolicy, decoded_pixels

# Peak bytes per decoded pixel while an image is prepared: the decoded image (Pillow keeps RGB and
# RGBA in 4 bytes per pixel, L/P/1 in 1), its RGB conversion (4), a transposed copy for portrait
# images in the HD transform (4). Images are decoded one at a time (image.open_images), so a
# request's peak is its largest image's.
BYTES_PER_PIXEL = 12


def estimate_prepare_bytes(messages: list, policy: ImageSourcePolicy, num_crops: int | None) -> int:
    """Peak memory of preparing these phi3v messages: BYTES_PER_PIXEL x the largest image's
    decoded pixels (from its header; a remote URL counts as the largest image allowed)."""
    largest = 0
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if part.get("type") == "image" and isinstance(part.get("image"), (bytes, bytearray)):
                pixels = decoded_pixels(bytes(part["image"]), num_crops)
                # Unreadable or over budget: refused from its header, before decoding.
                pixels = min(pixels or 0, policy.max_pixels)
            elif part.get("type") in ("image", "image_url"):
                pixels = policy.max_pixels  # fetched later: its size is not known yet
            else:
                continue
            largest = max(largest, pixels)
    return largest * BYTES_PER_PIXEL


def _has_images(messages: list) -> bool:
    return any(isinstance(m.get("content"), list) and any(p.get("type") != "text" for p in m["content"])
               for m in messages)


class PrepareBudget:
    """An asyncio byte semaphore (FIFO) around preparation jobs run in an executor.

    Used from the event loop only (no lock needed); the preparation threads release through
    call_soon_threadsafe. A request estimated above the whole budget runs alone.
    """

    def __init__(self, max_bytes: int, policy: ImageSourcePolicy, default_num_crops: int | None):
        self.max_bytes = int(max_bytes)
        self.policy, self.default_num_crops = policy, default_num_crops
        self.in_use = 0
        self._waiting: collections.deque = collections.deque()  # (bytes, future), in arrival order

    async def run(self, executor: Executor, prepare: Callable, plan):
        """prepare(plan) in `executor` once the plan's estimated memory fits; -> its result."""
        loop = asyncio.get_running_loop()
        if not _has_images(plan.messages):  # nothing to estimate: no extra trip through the pool
            return await loop.run_in_executor(executor, prepare, plan)
        num_crops = plan.num_crops or self.default_num_crops
        estimate = await loop.run_in_executor(executor, estimate_prepare_bytes, plan.messages, self.policy,
                                              num_crops)
        nbytes = min(estimate, self.max_bytes)
        if nbytes <= 0:
            return await loop.run_in_executor(executor, prepare, plan)
        await self.acquire(nbytes)
        try:
            job = executor.submit(prepare, plan)
        except BaseException:
            self.release(nbytes)
            raise
        job.add_done_callback(lambda _: loop.call_soon_threadsafe(self.release, nbytes))
        return await asyncio.wrap_future(job)

    async def acquire(self, nbytes: int) -> None:
        if not self._waiting and self.in_use + nbytes <= self.max_bytes:
            self.in_use += nbytes
            return
        granted = asyncio.get_running_loop().create_future()
        entry = (nbytes, granted)
        self._waiting.append(entry)
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.release(nbytes)  # granted just as it was cancelled: give it back
            else:
                try:
                    self._waiting.remove(entry)
                except ValueError:  # _wake already dropped it as done
                    pass
                self._wake()  # it may have held back smaller requests behind it
            raise

    def release(self, nbytes: int) -> None:
        self.in_use -= nbytes
        self._wake()

    def _wake(self) -> None:
        while self._waiting and self.in_use + self._waiting[0][0] <= self.max_bytes:
            nbytes, granted = self._waiting.popleft()
            if granted.done():
                continue
            self.in_use += nbytes
            granted.set_result(None)

    def snapshot(self) -> dict:
        return {"in_use_bytes": self.in_use, "waiting": len(self._waiting)}
