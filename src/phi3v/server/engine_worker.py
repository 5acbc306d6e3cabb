"""One thread owns the model; requests wait for it in a bounded queue.

The model object is not thread-safe, so every generation runs on this worker thread, one at a
time (or several non-streaming ones together when the model offers `generate_batch`). The
asyncio side submits a `GenerationJob` and reads its events from an `asyncio.Queue` that the
worker fills through `loop.call_soon_threadsafe`:

    ("delta", str)          a piece of generated text (streaming jobs only)
    ("done", Completion)    the generation finished (text, finish_reason, usage, timings)
    ("error", Exception)    the generation raised; the worker carries on with the next job

A job whose client went away is cancelled: if it is still waiting it is skipped, if it is
running the worker closes its TextStream after the next token, which ends the generation and
drops its KV cache.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("phi3v.server")

MAX_BATCH = 8  # non-streaming jobs handed to model.generate_batch(_stream) at once


class QueueFullError(Exception):
    def __init__(self, retry_after_s: int):
        super().__init__(f"the request queue is full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclass
class GenerationJob:
    prepared: Any  # phi3v PreparedPrompt
    options: Any  # phi3v GenerationOptions
    loop: asyncio.AbstractEventLoop
    stream: bool  # emit ("delta", text) events while generating
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None  # when the worker picked it up (queue wait = started - submitted)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Ask the worker to drop this job (safe from any thread, idempotent)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, kind: str, payload: Any) -> None:
        """Called on the worker thread: hand one event to the request's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the loop is closed: the server is shutting down
            self.cancel()


@dataclass
class WorkerStats:
    served: int = 0  # finished generations (any finish reason but "cancelled")
    failed: int = 0  # generations that raised
    cancelled: int = 0  # dropped or stopped because the client went away
    rejected: int = 0  # 429s
    batches: int = 0  # generate_batch calls


class EngineWorker:
    def __init__(self, model, max_queue: int, *, max_batch: int = MAX_BATCH):
        self.model = model
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.stats = WorkerStats()
        self._waiting: collections.deque[GenerationJob] = collections.deque()
        self._cond = threading.Condition()
        self._running: list[GenerationJob] = []
        self._stopping = False
        self._avg_job_s = 1.0  # moving average of one job's run time, for Retry-After
        self._thread = threading.Thread(target=self._run, name="phi3v-engine", daemon=True)

    # ---- asyncio side -------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            for job in list(self._waiting) + self._running:
                job.cancel()
            self._cond.notify_all()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def has_room(self) -> bool:
        with self._cond:
            return len(self._waiting) < self.max_queue

    def retry_after_s(self) -> int:
        with self._cond:
            ahead = len(self._waiting) + len(self._running)
        return int(min(60, max(1, math.ceil(self._avg_job_s * ahead))))

    def reject(self) -> QueueFullError:
        with self._cond:
            self.stats.rejected += 1
        return QueueFullError(self.retry_after_s())

    def submit(self, job: GenerationJob) -> None:
        """Queue a job, or raise QueueFullError when max_queue jobs already wait."""
        with self._cond:
            if len(self._waiting) >= self.max_queue or self._stopping:
                self.stats.rejected += 1
                full = True
            else:
                self._waiting.append(job)
                self._cond.notify()
                full = False
        if full:
            raise QueueFullError(self.retry_after_s())

    def snapshot(self) -> dict:
        with self._cond:
            s = self.stats
            return {
                "waiting": len(self._waiting),
                "running": len(self._running),
                "max_queue": self.max_queue,
                "served": s.served,
                "failed": s.failed,
                "cancelled": s.cancelled,
                "rejected": s.rejected,
                "batches": s.batches,
            }

    # ---- worker thread ------------------------------------------------------------------
    def _next_jobs(self) -> list[GenerationJob] | None:
        """Wait for work; return one job, or several batchable ones; None when stopping."""
        with self._cond:
            while not self._waiting and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            first = self._waiting.popleft()
            jobs = [first]
            if not first.stream and self.max_batch > 1 and hasattr(self.model, "generate_batch"):
                # Streaming jobs stay out of batches: a batch cannot stop one row when its client
                # hangs up, and a streamed answer must stop then.
                for job in list(self._waiting):
                    if len(jobs) >= self.max_batch:
                        break
                    if not job.stream and not job.cancelled:
                        self._waiting.remove(job)
                        jobs.append(job)
            self._running = jobs
            return jobs

    def _run(self) -> None:
        while True:
            jobs = self._next_jobs()
            if jobs is None:
                return
            started = time.perf_counter()
            for job in jobs:
                job.started_at = started
            live = [j for j in jobs if not j.cancelled]
            for job in jobs:
                if job.cancelled:
                    self._finish(job, "cancelled")
            try:
                if len(live) > 1:
                    self._run_batch(live)
                elif live:
                    self._run_one(live[0])
            except BaseException:  # never let one request kill the worker
                log.exception("engine worker: unexpected failure")
            finally:
                elapsed = time.perf_counter() - started
                with self._cond:
                    self._running = []
                if live:
                    self._avg_job_s = 0.8 * self._avg_job_s + 0.2 * elapsed / len(live)

    def _run_one(self, job: GenerationJob) -> None:
        stream = None
        try:
            stream = self.model.generate_stream(job.prepared, job.options)
            for delta in stream:
                if job.cancelled:
                    break
                if job.stream and delta:
                    job.emit("delta", delta)
            if job.cancelled:
                stream.close()  # stops the token loop here, on the thread that runs it
                self._finish(job, "cancelled")
                return
            completion = stream.completion
        except Exception as err:  # reported to this request only
            log.exception("generation failed")
            self._finish(job, "failed", err)
            return
        finally:
            stream = None  # drop the stream (and its KV cache) before waiting for the next job
            job.prepared = None
        self._finish(job, "served", completion)

    def _run_batch(self, jobs: list[GenerationJob]) -> None:
        """Several non-streaming jobs in one batched generation (model.generate_batch[_stream])."""
        with self._cond:
            self.stats.batches += 1
        prepared, options = [j.prepared for j in jobs], [j.options for j in jobs]
        try:
            batch_stream = getattr(self.model, "generate_batch_stream", None)
            if batch_stream is not None:
                stream = batch_stream(prepared, options)
                for _row, _delta in stream:  # (row, text delta); only to notice hang-ups between steps
                    if all(j.cancelled for j in jobs):
                        stream.close()
                        break
                completions = list(stream.completions)
            else:
                completions = list(self.model.generate_batch(prepared, options))
        except Exception as err:
            log.exception("batched generation failed")
            for job in jobs:
                self._finish(job, "failed", err)
            return
        finally:
            prepared = None
        for job, completion in zip(jobs, completions):
            job.prepared = None
            done = completion is not None and completion.finish_reason != "cancelled" and not job.cancelled
            self._finish(job, "served" if done else "cancelled", completion)

    def _finish(self, job: GenerationJob, outcome: str, payload: Any = None) -> None:
        with self._cond:
            setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
        if outcome == "served":
            job.emit("done", payload)
        elif outcome == "failed":
            job.emit("error", payload)
        else:
            job.emit("cancelled", None)
