"""Prometheus metrics of one app (GET /metrics), with prometheus-client.

Each app has its own CollectorRegistry: several apps in one process (tests, Ray Serve replicas
sharing a worker process) never clash over metric names, and a scrape sees this app only.

Two kinds of metric:
- events, counted as they happen: HTTP requests by endpoint and status code (ObserverMiddleware),
  and per generation (engine worker thread, `observe_generation`): tokens (prompt, image,
  completion), outcome, time to first token, inter-token latency, queue wait;
- state, read at scrape time (`EngineCollector`): readiness and requests in flight, queue depth,
  running batch size, the running batch's KV-cache bytes, the image caches (bytes, hits, misses),
  the retained conversations' KV bytes. Reading them when scraped costs nothing between scrapes
  and is never stale.

Time to first token is the queue wait plus the engine's first_token_s, which counts from the
start of the prompt's preparation (image decoding and tokenizing) through the vision tower,
prefill and the first step; what it leaves out is receiving the body and waiting for a
preparation thread. Inter-token latency is one observation per request, its mean:
decode_s / (completion_tokens - 1).

Metrics show load (how many requests, how long, how many tokens), never content; see
docs/server.md for who may read them (settings.public_metrics).
"""

from __future__ import annotations

import logging

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .request_log import generation_fields

log = logging.getLogger("phi3v.server")

# Seconds. TTFT spans a text prompt on a GPU (tens of ms) to many images on a CPU (a minute).
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
# Seconds per token: 5 ms (a GPU alone) to 2 s (a large CPU batch).
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.0)
QUEUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)

# Paths as they are labelled: a fixed set, so a client probing random URLs cannot create series.
ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/models", "/health", "/metrics", "/", "/openapi.json"})


def endpoint_label(path: str) -> str:
    if path in ENDPOINTS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


class ServerMetrics:
    def __init__(self, worker, model, lifecycle=None):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("phi3v_requests", "HTTP requests answered, by endpoint and status code "
                                "(status \"none\": no response was started)", ["endpoint", "status"], registry=r)
        self.request_duration = Histogram("phi3v_request_duration_seconds", "chat completion requests, "
                                          "from their headers to the end of their response",
                                          buckets=DURATION_BUCKETS, registry=r)
        self.prompt_tokens = Counter("phi3v_prompt_tokens", "prompt tokens of started generations "
                                     "(image tokens included)", registry=r)
        self.image_tokens = Counter("phi3v_image_tokens", "image tokens of started generations", registry=r)
        self.completion_tokens = Counter("phi3v_completion_tokens", "tokens generated", registry=r)
        self.generations = Counter("phi3v_generations", "generations ended, by finish reason "
                                   "(stop, length, cancelled, error)", ["finish_reason"], registry=r)
        self.ttft = Histogram("phi3v_time_to_first_token_seconds", "queue wait + the engine's time to the "
                              "first token, per request", buckets=TTFT_BUCKETS, registry=r)
        self.inter_token = Histogram("phi3v_inter_token_latency_seconds", "mean time between two tokens of "
                                     "a request (requests of 2 tokens or more)", buckets=ITL_BUCKETS, registry=r)
        self.queue_wait = Histogram("phi3v_queue_wait_seconds", "time a request waited for a place in the "
                                    "running batch", buckets=QUEUE_BUCKETS, registry=r)
        r.register(EngineCollector(worker, model, lifecycle))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def count_request(self, path: str, status: int | None, seconds: float) -> None:
        endpoint = endpoint_label(path)
        self.requests.labels(endpoint, "none" if status is None else str(status)).inc()
        if endpoint == "/v1/chat/completions":
            self.request_duration.observe(seconds)

    def observe_generation(self, job, outcome: str, payload) -> None:
        """EngineWorker.on_finish: called on the worker thread when a job ends, before its row is
        dropped. Counts its tokens and times, and hands them to its request's log record."""
        row = job.row
        if row is None:  # cancelled while waiting, or failed to start: nothing was generated
            self.generations.labels("cancelled" if outcome == "cancelled" else "error").inc()
            return
        timings = row.timings
        prompt = int(row.prompt_ids.numel())
        images = int((row.prompt_ids < 0).sum())
        completion = len(row.generated)
        finish = row.finish_reason or ("cancelled" if outcome == "cancelled" else "error")
        queue_s = max(0.0, (job.started_at or job.submitted_at) - job.submitted_at)
        self.prompt_tokens.inc(prompt)
        self.image_tokens.inc(images)
        self.completion_tokens.inc(completion)
        self.generations.labels(finish).inc()
        self.queue_wait.observe(queue_s)
        ttft = None
        if completion:
            ttft = queue_s + timings.first_token_s
            self.ttft.observe(ttft)
        if completion >= 2 and timings.decode_s > 0:
            self.inter_token.observe(timings.decode_s / (completion - 1))
        record = getattr(job, "record", None)
        if record is not None:
            record.generation = generation_fields(completion, prompt, images, queue_s, ttft,
                                                  timings.decode_tokens_per_s, finish)


class EngineCollector:
    """The engine's state, read when /metrics is scraped."""

    def __init__(self, worker, model, lifecycle=None):
        self.worker, self.model, self.lifecycle = worker, model, lifecycle

    def describe(self):
        return []  # the families are made at collect time

    def collect(self):
        snap = self.worker.snapshot()
        if self.lifecycle is not None:  # readiness (shutdown.py): a drain shows as state "draining"
            state = GaugeMetricFamily("phi3v_state", "1 for the server's current state", labels=["state"])
            for name in ("loading", "ready", "draining", "stopped"):
                state.add_metric([name], 1.0 if self.lifecycle.state == name else 0.0)
            yield state
            yield _gauge("phi3v_requests_in_flight", "HTTP requests being served (probes and scrapes not "
                         "counted)", self.lifecycle.in_flight)
        yield _gauge("phi3v_queue_waiting", "requests waiting for a place in the running batch", snap["waiting"])
        yield _gauge("phi3v_queue_capacity", "requests that may wait (--max-queue)", snap["max_queue"])
        yield _gauge("phi3v_batch_running", "requests in the running batch (prefilling or decoding)",
                     snap["running"])
        yield _gauge("phi3v_batch_capacity", "requests that may run together (--max-batch)", snap["max_batch"])
        yield _gauge("phi3v_batch_kv_cache_bytes", "KV-cache memory of the running batch (and of prompts "
                     "being prefilled)", snap.get("kv_bytes", 0))
        yield _counter("phi3v_rejected_requests", "requests refused with 429 (queue full)", snap["rejected"])
        yield _counter("phi3v_engine_errors", "unexpected engine failures the worker recovered from",
                       snap["engine_errors"])
        images = getattr(self.model, "images", None)
        if images is not None:
            size = GaugeMetricFamily("phi3v_image_cache_bytes", "memory held by an image cache",
                                     labels=["cache"])
            budget = GaugeMetricFamily("phi3v_image_cache_budget_bytes", "byte budget of an image cache",
                                       labels=["cache"])
            hits = CounterMetricFamily("phi3v_image_cache_hits", "image cache lookups that hit", labels=["cache"])
            misses = CounterMetricFamily("phi3v_image_cache_misses", "image cache lookups that missed",
                                         labels=["cache"])
            ratio = GaugeMetricFamily("phi3v_image_cache_hit_ratio", "hits / lookups since start "
                                      "(rate() of the counters gives it over a window)", labels=["cache"])
            for name, cache in (("pixels", images.pixel_cache), ("features", images.feature_cache)):
                size.add_metric([name], cache.nbytes)
                budget.add_metric([name], cache.max_bytes)
                hits.add_metric([name], cache.hits)
                misses.add_metric([name], cache.misses)
                lookups = cache.hits + cache.misses
                ratio.add_metric([name], cache.hits / lookups if lookups else 0.0)
            yield from (size, budget, hits, misses, ratio)
        conversation = getattr(self.model, "conversation", None)
        if conversation is not None:
            yield _gauge("phi3v_retained_kv_bytes", "KV-cache memory of retained conversations (prefix reuse)",
                         conversation.nbytes())


def _gauge(name: str, doc: str, value) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)
