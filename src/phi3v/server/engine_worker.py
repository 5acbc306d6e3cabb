"""One thread owns the model and runs every request in one continuous batch.

The model is not thread-safe, so all generation happens on this worker thread, in one
`DecodeLoop`: between two decode steps, requests that waited in the bounded queue join, and
requests that finished, failed, or whose client went away leave (their KV cache freed at once).
A newcomer does its work a piece per step while others decode, so their streams keep a token
every step: its images' features one vision piece (`vision_chunk` crops, `vision_layers` of the
tower's layers) per step,
then its prompt `prefill_chunk` tokens per step; then it decodes together with the others. Those
are the smallest pieces: with `step_budget`, a step carries as many vision pieces and as large a
prefill chunk as fit that many times the fastest plain decode step (engine/step_budget.py). With
nothing running, a newcomer's prompt is prefilled whole (its images still a piece per iteration,
so a cancellation is seen between pieces).
Streamed and non-streamed requests are treated alike; rows with different sampling settings and
stop strings decode together. At most `max_batch` rows run at once and their KV caches stay
within `kv_budget_bytes`; the rest wait first come, first served (429 + Retry-After beyond
`max_queue`).

The asyncio side submits a `GenerationJob` and reads its events from an `asyncio.Queue` that the
worker fills through `loop.call_soon_threadsafe`:

    ("delta", str)          a piece of generated text (streaming jobs only)
    ("done", Completion)    the generation finished (text, finish_reason, usage, timings)
    ("error", Exception)    this generation failed; the others go on
    ("cancelled", reason)   the job was dropped: reason "client" (gone) or "shutdown" (server stopping)

Supervision: an exception while starting or stepping concerns only the rows it names (the loop
marks them failed); anything else unexpected fails the running jobs and the worker goes on with a
fresh loop. Only if the worker thread itself cannot continue does /health turn unhealthy and
`on_fatal` end the process (exit code 70), so a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .request_log import current_record

log = logging.getLogger("phi3v.server")

MAX_BATCH = 8  # rows decoding together (measured: 8 bf16 rows give ~5.5x the tokens/s of one)
FATAL_EXIT_CODE = 70  # EX_SOFTWARE


class QueueFullError(Exception):
    def __init__(self, retry_after_s: int):
        super().__init__(f"the request queue is full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclass(eq=False)  # jobs are compared by identity, never by value (they hold tensors)
class GenerationJob:
    prepared: Any  # phi3v PreparedPrompt
    options: Any  # phi3v GenerationOptions
    loop: asyncio.AbstractEventLoop
    stream: bool  # emit ("delta", text) events while generating
    output_format: Any = None  # phi3v OutputFormat constraining the answer (response_format), or None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None  # when the worker picked it up (queue wait = started - submitted)
    row: Any = None  # its engine Row while it runs
    # The log record of the HTTP request that made it (request_log.py), filled when it ends.
    record: Any = field(default_factory=current_record)
    cancel_reason: str = "client"  # why it was cancelled: "client" (went away) or "shutdown"
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self, reason: str = "client") -> None:
        """Ask the worker to drop this job (safe from any thread, idempotent: the first reason stays)."""
        if not self._cancelled.is_set():
            self.cancel_reason = reason
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
    batches: int = 0  # decode steps that served more than one request
    peak_running: int = 0  # most requests decoding together so far
    engine_errors: int = 0  # unexpected failures the supervisor recovered from


def _exit_process() -> None:
    os._exit(FATAL_EXIT_CODE)


class EngineWorker:
    def __init__(self, model, max_queue: int, *, max_batch: int = MAX_BATCH, kv_budget_bytes: int | None = None,
                 prefill_chunk: int | None = None, vision_chunk: int | None = None,
                 vision_layers: int | None = None, fuse_prefill: bool = True, step_budget: float | None = None,
                 on_fatal: Callable[[], None] | None = None):
        """kv_budget_bytes: the KV caches of the rows running together stay under this (each row
        counted at prompt + max_new_tokens); None = no limit beyond max_batch. prefill_chunk: prompt
        tokens a newcomer prefills per decode step of the others (None: its whole prompt at once;
        with none running, always whole). vision_chunk: image crops a newcomer encodes per decode
        step of the others (one vision-tower call; 0: all at once; None: the model's vision_chunk),
        through at most vision_layers of the tower's layers per step (None or 0: all). fuse_prefill:
        a newcomer's prefill chunk goes through the others' decode step (one decoder pass; False:
        a pass of its own). step_budget: a step with newcomer work may take about this many times
        the fastest plain decode step, pieces sized from measured times (engine/step_budget.py;
        None or 0: the fixed pieces above)."""
        self.model = model
        self.max_queue = max_queue
        self.max_batch = max(1, max_batch)
        self.kv_budget_bytes = kv_budget_bytes
        self.prefill_chunk, self.vision_chunk, self.vision_layers = prefill_chunk, vision_chunk, vision_layers
        self.fuse_prefill = fuse_prefill
        self.step_budget = step_budget or None
        self.on_fatal = on_fatal or _exit_process
        # on_finish(job, outcome, payload): called on the worker thread as each job ends, before its
        # row is dropped (metrics.py observes tokens and timings there); its errors are only logged.
        self.on_finish: Callable[[GenerationJob, str, Any], None] | None = None
        self._kv_now = 0  # KV-cache bytes of the loop's rows, measured by the worker thread
        self.stats = WorkerStats()
        self._waiting: collections.deque[GenerationJob] = collections.deque()
        self._cond = threading.Condition()
        self._running: list[GenerationJob] = []
        self._stopping = False
        self._dead = False
        self._avg_job_s = 1.0  # moving average of one job's run time, for Retry-After
        self._kv_per_token = _kv_bytes_per_token(model) if kv_budget_bytes else 0
        self._thread = threading.Thread(target=self._run, name="phi3v-engine", daemon=True)

    # ---- asyncio side -------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            for job in list(self._waiting) + self._running:
                job.cancel("shutdown")
            self._cond.notify_all()
        self._thread.join(timeout)

    def cancel_all(self, reason: str = "shutdown") -> int:
        """Cancel every waiting and running job (their requests are told `reason`); the worker
        goes on. -> how many. Used when a graceful shutdown's time is up (shutdown.py)."""
        with self._cond:
            jobs = list(self._waiting) + self._running
            for job in jobs:
                job.cancel(reason)
            self._cond.notify_all()
        return len(jobs)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping and not self._dead

    def has_room(self) -> bool:
        with self._cond:
            return len(self._waiting) < self.max_queue

    def retry_after_s(self) -> int:
        with self._cond:
            ahead = len(self._waiting) + len(self._running)
        per_slot = self._avg_job_s / self.max_batch
        return int(min(60, max(1, math.ceil(per_slot * ahead))))

    def reject(self) -> QueueFullError:
        with self._cond:
            self.stats.rejected += 1
        return QueueFullError(self.retry_after_s())

    def submit(self, job: GenerationJob) -> None:
        """Queue a job, or raise QueueFullError when max_queue jobs already wait."""
        with self._cond:
            full = len(self._waiting) >= self.max_queue or self._stopping or self._dead
            if full:
                self.stats.rejected += 1
            else:
                self._waiting.append(job)
                self._cond.notify()
        if full:
            raise QueueFullError(self.retry_after_s())

    def snapshot(self) -> dict:
        with self._cond:
            s = self.stats
            return {
                "waiting": len(self._waiting),
                "running": len(self._running),
                "max_queue": self.max_queue,
                "max_batch": self.max_batch,
                "served": s.served,
                "failed": s.failed,
                "cancelled": s.cancelled,
                "rejected": s.rejected,
                "batches": s.batches,
                "peak_running": s.peak_running,
                "engine_errors": s.engine_errors,
                "kv_bytes": self._kv_now,
            }

    # ---- worker thread ------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._serve()
        except BaseException:  # noqa: BLE001 - the worker cannot continue: say so and end the process
            log.critical("engine worker stopped unexpectedly; the server cannot serve", exc_info=True)
            with self._cond:
                self._dead = True
                jobs = list(self._waiting) + self._running
                self._waiting.clear()
                self._running = []
            for job in jobs:
                job.emit("error", RuntimeError("the engine stopped"))
            self.on_fatal()

    def _serve(self) -> None:
        loop = self._new_loop()
        while True:
            newcomers = self._take_jobs(block=not self._running)
            if newcomers is None:  # stopping
                for job in list(self._running):
                    self._end(loop, job, "cancelled")
                return
            try:
                for job in newcomers:
                    self._start(loop, job)
                self._drop_cancelled(loop)
                if loop.busy:
                    self._step(loop)
            except Exception:  # noqa: BLE001 - a scheduling bug: fail what is running, keep serving
                log.exception("engine worker: unexpected failure; failing the running requests")
                with self._cond:
                    self.stats.engine_errors += 1
                for job in list(self._running):
                    self._finish(job, "failed", RuntimeError("internal engine error"))
                loop = self._new_loop()
            self._measure_kv(loop)  # after every step, and after a failure's fresh loop

    def _new_loop(self):
        return self.model.new_loop(prefill_chunk=self.prefill_chunk, vision_chunk=self.vision_chunk,
                                   vision_layers=self.vision_layers, fuse_prefill=self.fuse_prefill,
                                   step_budget=self.step_budget)

    def _take_jobs(self, block: bool) -> list[GenerationJob] | None:
        """Jobs that may join now (first come, first served, within max_batch and the KV
        budget); waits for work when nothing runs. None when the worker is stopping."""
        with self._cond:
            while block and not self._waiting and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            taken: list[GenerationJob] = []
            kv_used = sum(self._kv_bytes(j) for j in self._running)
            while self._waiting and len(self._running) + len(taken) < self.max_batch:
                job = self._waiting[0]
                if job.cancelled:
                    self._waiting.popleft()
                    self._count("cancelled")
                    self._observe(job, "cancelled", None)
                    job.emit("cancelled", job.cancel_reason)
                    continue
                need = self._kv_bytes(job)
                if self.kv_budget_bytes and (self._running or taken) and kv_used + need > self.kv_budget_bytes:
                    break  # the head waits for room (no overtaking: first come, first served)
                self._waiting.popleft()
                kv_used += need
                taken.append(job)
            now = time.perf_counter()
            for job in taken:
                job.started_at = now
            self._running.extend(taken)
            self.stats.peak_running = max(self.stats.peak_running, len(self._running))
            return taken

    def _start(self, loop, job: GenerationJob) -> None:
        """Queue the job's row in the loop (its images are encoded there, a piece per step, unless
        the feature cache has them); a failure fails this job only."""
        try:
            job.row = self.model.start_row(job.prepared, job.options, reuse_conversation=True,
                                           output_format=job.output_format)
            loop.add(job.row)
        except Exception as err:  # noqa: BLE001 - reported to this request only
            log.exception("starting a generation failed")
            self._finish(job, "failed", err)

    def _drop_cancelled(self, loop) -> None:
        for job in list(self._running):
            if job.cancelled and job.row is not None and not job.row.done:
                self._end(loop, job, "cancelled")

    def _step(self, loop) -> None:
        by_row = {id(job.row): job for job in self._running if job.row is not None}
        try:
            events = loop.step()
        except Exception:  # noqa: BLE001 - the loop marked the rows of the failed step
            log.exception("a decode step failed")
            events = [(job.row, "") for job in self._running if job.row is not None and job.row.done]
        if len({id(row) for row, _ in events}) > 1:
            with self._cond:
                self.stats.batches += 1
        for row, delta in events:
            job = by_row.get(id(row))
            if job is None:
                continue
            if delta and job.stream:
                job.emit("delta", delta)
            if row.done:
                self._end(loop, job, None)

    def _end(self, loop, job: GenerationJob, reason: str | None) -> None:
        """Finish a job whose row is done (reason None) or end it now ("cancelled")."""
        row = job.row
        if reason == "cancelled" and row is not None:
            loop.cancel(row)
        if row is not None:
            try:
                self.model.end_row(job.prepared, row)
            except Exception:  # noqa: BLE001 - keeping a cache is an optimisation, never an error
                log.exception("retaining a conversation failed")
        if reason == "cancelled" or job.cancelled or (row is not None and row.finish_reason == "cancelled"):
            self._finish(job, "cancelled")
        elif row is not None and row.finish_reason == "error":
            log.error("generation failed: %r", row.error)
            self._finish(job, "failed", row.error)
        else:
            self._finish(job, "served", row.completion())

    def _measure_kv(self, loop) -> None:
        """KV bytes of the running batch and of the prompts being prefilled (read here, on the
        worker thread: a cache is being rebuilt while rows join, never safe to read from another)."""
        try:
            batch = loop.batch.cache
            total = batch.nbytes() if batch is not None else 0
            total += sum(r.cache.nbytes() for r in loop.waiting if r.cache is not None)
        except Exception:  # noqa: BLE001 - a measurement never stops serving
            log.debug("measuring the KV cache failed", exc_info=True)
            return
        self._kv_now = total

    def _observe(self, job: GenerationJob, outcome: str, payload: Any) -> None:
        if self.on_finish is not None:
            try:
                self.on_finish(job, outcome, payload)
            except Exception:  # noqa: BLE001 - observing never fails a request
                log.exception("observing a finished generation failed")

    def _finish(self, job: GenerationJob, outcome: str, payload: Any = None) -> None:
        self._observe(job, outcome, payload)
        with self._cond:
            self._running = [j for j in self._running if j is not job]
            setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
        if job.started_at is not None and outcome == "served":
            self._avg_job_s = 0.8 * self._avg_job_s + 0.2 * (time.perf_counter() - job.started_at)
        job.prepared = job.row = None  # its pixels and KV cache go now
        if outcome == "served":
            job.emit("done", payload)
        elif outcome == "failed":
            job.emit("error", payload)
        else:
            job.emit("cancelled", job.cancel_reason)

    def _count(self, outcome: str) -> None:
        setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)

    def _kv_bytes(self, job: GenerationJob) -> int:
        if not self._kv_per_token:
            return 0
        return (job.prepared.num_tokens + job.options.max_new_tokens) * self._kv_per_token


def _kv_bytes_per_token(model) -> int:
    """KV-cache bytes one token costs on this model (the engine's own model facts)."""
    from ..engine.facts import model_facts

    return model_facts(model.config).kv_cache_bytes_per_token(model.dtype)
