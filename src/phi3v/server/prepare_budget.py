"""A memory budget for requests being prepared: concurrent large requests queue instead of
exhausting RAM.

Preparing a request (decoding its images, the HD transform) takes memory in proportion to the
decoded pixels, which a 500 KB PNG can make a gigabyte. The pixel budgets of ImageSourcePolicy
bound one request; this bounds all of them together. Before a request is prepared its peak is
estimated from its image headers (nothing decoded), and it waits, first come first served,
until that estimate fits next to the preparations in flight. Text-only requests never wait.
A video counts its decoder's frames, one decoded frame and its chosen frames' pixel_values,
from its container header (video_budget.py).

The budget is held until the preparation thread has finished, not merely until the waiting
coroutine gives up (a deadline or a hang-up cannot free memory a thread still uses).
"""

from __future__ import annotations

import asyncio
import collections
from concurrent.futures import Executor
from typing import Callable

from ..engine.frame_select import DEFAULT_MAX_FRAMES, VIDEO_NUM_CROPS
from ..engine.image import ImageSourcePolicy, decoded_pixels
from .video_budget import video_prepare_bytes

# Peak bytes per decoded pixel while an image is prepared: the decoded image (Pillow keeps RGB and
# RGBA in 4 bytes per pixel, L/P/1 in 1), its RGB conversion (4), a transposed copy for portrait
# images in the HD transform (4). Images are decoded one at a time (image.open_images), so a
# request's peak is its largest image's.
BYTES_PER_PIXEL = 12


def estimate_prepare_bytes(messages: list, policy: ImageSourcePolicy, num_crops: int | None,
                           video_num_crops: int = VIDEO_NUM_CROPS, max_frames: int = DEFAULT_MAX_FRAMES) -> int:
    """Peak memory of preparing these phi3v messages: BYTES_PER_PIXEL x the largest image's
    decoded pixels (from its header; a remote URL counts as the largest image allowed), or a
    video's decoding if larger, plus what every video keeps (its bytes, its frames' pixel_values:
    video_budget.py; `frames` of the part, else max_frames)."""
    largest = videos = 0
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
            elif part.get("type") == "video" and isinstance(part.get("video"), (bytes, bytearray)):
                frames = min(part.get("frames") or max_frames, max_frames)
                # summed: conservative (videos are decoded one after another, but their frames all stay)
                videos += video_prepare_bytes(bytes(part["video"]), frames, video_num_crops, policy.max_pixels,
                                              BYTES_PER_PIXEL)
                continue
            else:
                continue
            largest = max(largest, pixels)
    return largest * BYTES_PER_PIXEL + videos


def _has_images(messages: list) -> bool:
    return any(isinstance(m.get("content"), list) and any(p.get("type") != "text" for p in m["content"])
               for m in messages)


class PrepareBudget:
    """An asyncio byte semaphore (FIFO) around preparation jobs run in an executor.

    Used from the event loop only (no lock needed); the preparation threads release through
    call_soon_threadsafe. A request estimated above the whole budget runs alone.
    """

    def __init__(self, max_bytes: int, policy: ImageSourcePolicy, default_num_crops: int | None,
                 max_frames: int = DEFAULT_MAX_FRAMES):
        self.max_bytes = int(max_bytes)
        self.policy, self.default_num_crops = policy, default_num_crops
        self.max_frames = max_frames  # frames of a video whose part does not say (--max-images)
        self.in_use = 0
        self._waiting: collections.deque = collections.deque()  # (bytes, future), in arrival order

    async def run(self, executor: Executor, prepare: Callable, plan):
        """prepare(plan) in `executor` once the plan's estimated memory fits; -> its result."""
        loop = asyncio.get_running_loop()
        if not _has_images(plan.messages):  # nothing to estimate: no extra trip through the pool
            return await loop.run_in_executor(executor, prepare, plan)
        num_crops = plan.num_crops or self.default_num_crops
        estimate = await loop.run_in_executor(executor, estimate_prepare_bytes, plan.messages, self.policy,
                                              num_crops, plan.num_crops or VIDEO_NUM_CROPS, self.max_frames)
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
