"""What the operator chose when starting `phi3v serve` (one frozen object shared by every request).

Each setting is declared once, as a field of ServerSettings; its metadata (made by `setting`)
carries what `phi3v serve` needs to offer it as a flag: the flag name, help, allowed range,
unit and environment variable. phi3v.cli.serve builds the flags from these fields and the
settings from the parsed flags, so a new field here is a new flag there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

from ..errors import Phi3VError
from ..options import ANY, OPTION_BY_NAME, Bounds


def setting(default, help: str, flag: str, *, bounds: Bounds = ANY, unit: int = 1, metavar: str | None = None,
            env: str | None = None, default_text: str | None = None, model_option: bool = False,
            choices: tuple[str, ...] | None = None):
    """A ServerSettings field and how `phi3v serve` offers it.

    flag: the CLI flag. bounds: the allowed values of the field. unit: the flag counts in units
    of this many (--max-body-mb: 2**20 bytes). env: an environment variable that gives the flag's
    default. default_text: the default in words. model_option: the flag is one of the model
    options every model command has (--num-crops), not added again by serve. choices: the
    values a text setting may take.
    """
    return field(default=default, metadata={
        "help": help, "flag": flag, "bounds": bounds, "unit": unit, "metavar": metavar, "env": env,
        "default_text": default_text, "model_option": model_option, "choices": choices,
    })


MIB = 2**20
MPX = 1_000_000  # a megapixel
POSITIVE = Bounds(1)


@dataclass(frozen=True)
class ServerSettings:
    api_key: str | None = setting(
        None, "require `Authorization: Bearer KEY` on /v1/*", "--api-key", metavar="KEY", env="PHI3V_API_KEY",
        default_text="$PHI3V_API_KEY, else none")
    allow_remote_images: bool = setting(
        False, "let clients send http(s) image URLs, fetched by the server with a timeout and size cap "
               "(otherwise data: URIs only)", "--allow-remote-images", default_text="off")
    max_images: int = setting(8, "images per request, over all messages", "--max-images", bounds=POSITIVE,
                              metavar="N")
    max_queue: int = setting(16, "requests waiting for the model; more get 429 + Retry-After", "--max-queue",
                             bounds=POSITIVE, metavar="N")
    max_batch: int = setting(8, "requests decoding together in the continuous batch; the rest wait in the queue",
                             "--max-batch", bounds=POSITIVE, metavar="N")
    kv_budget_bytes: int | None = setting(
        None, "KV-cache memory in MiB the running requests may take together (each counted at prompt + "
              "max_tokens); the next waits for room", "--kv-budget-mb", bounds=POSITIVE, unit=MIB, metavar="N",
        default_text="no limit beyond --max-batch")
    prefill_chunk: int | None = setting(
        32, "prompt tokens a joining request prefills per decode step of the running ones, so a long image "
            "prompt does not stall their streams (with none running, its whole prompt at once)", "--prefill-chunk",
        bounds=POSITIVE, metavar="N")
    vision_chunk: int = setting(
        1, "image crops a joining request sends through the vision tower per decode step of the running ones "
           "(one tower call; an image is 1 + num_crops-or-fewer crops); 0 = all of a request's crops in one call",
        "--vision-chunk", bounds=Bounds(0), metavar="N")
    vision_layers: int = setting(
        12, "vision-tower layers such a piece goes through per decode step of the running ones (the full-size "
            "tower uses 23: 12 = a crop in two steps); 0 = all of them", "--vision-layers", bounds=Bounds(0),
        metavar="N")
    step_budget: float = setting(
        2.5, "a decode step that also carries a joining request's work may take about this many times the "
             "fastest plain decode step (one running request's): vision pieces back to back and prefill chunks "
             "sized from measured times, --prefill-chunk and one --vision-chunk/--vision-layers piece the "
             "smallest; 0 = those fixed pieces per step",
        "--step-budget", bounds=Bounds(0), metavar="F")
    separate_prefill: bool = setting(
        False, "run a joining request's prefill chunks as decoder passes of their own, after the running "
               "requests' step, instead of inside it (one pass reads the weights once for both); for comparisons",
        "--separate-prefill", default_text="off")
    retained_conversations: int = setting(
        8, "finished conversations whose KV caches are kept (within --retained-kv-mb) for follow-up "
           "requests that continue them", "--retained-conversations", bounds=POSITIVE, metavar="N")
    max_body_bytes: int = setting(20 * MIB, "largest request body in MiB; larger ones get 413", "--max-body-mb",
                                  bounds=Bounds(0, lo_open=True), unit=MIB, metavar="N")
    default_num_crops: int | None = setting(
        None, "default HD crops per image; a request may override it with num_crops", "--num-crops",
        bounds=OPTION_BY_NAME["num_crops"].bounds, model_option=True)
    default_max_tokens: int = setting(
        512, "max_tokens of a request that names neither max_tokens nor max_completion_tokens (less when "
             "the context leaves less room)", "--default-max-tokens", bounds=POSITIVE, metavar="N")
    remote_timeout_s: float = setting(10.0, "seconds to fetch one remote image", "--remote-timeout-s",
                                      bounds=Bounds(0, lo_open=True), metavar="S")
    remote_max_bytes: int = setting(20 * MIB, "largest remote image in MiB", "--remote-max-mb",
                                    bounds=Bounds(0, lo_open=True), unit=MIB, metavar="N")
    max_video_bytes: int = setting(
        20 * MIB, "largest video in MiB (the file's bytes: a data: URI's decoded payload, or a remote video with "
                  "--allow-remote-images); its frames count against --max-images. A data: URI is also bound by "
                  "--max-body-mb", "--max-video-mb", bounds=Bounds(0, lo_open=True), unit=MIB, metavar="N")
    prepare_threads: int = setting(4, "threads fetching and decoding the images of requests, off the event loop "
                                      "(requests without images have 2 threads of their own)",
                                   "--prepare-threads", bounds=POSITIVE, metavar="N")
    prepare_timeout_s: float = setting(
        30.0, "seconds a request may take to be prepared (waiting for a thread, fetching and decoding its "
              "images, tokenizing); then 408", "--prepare-timeout-s", bounds=Bounds(0, lo_open=True), metavar="S")
    max_prompt_chars: int = setting(
        0, "characters of text per request, over all messages, checked before tokenizing; more get 400",
        "--max-prompt-chars", bounds=Bounds(0), metavar="N",
        default_text="0 = 16 x the model's context: no token spells more than 16 characters, so longer text "
                     "cannot fit")
    # Memory budgets (docs: ImageSourcePolicy, server/prepare_budget.py): all checked before the
    # memory is used, from image headers, so one request cannot take the machine's RAM.
    max_image_pixels: int = setting(
        40 * MPX, "decoded pixels per image in megapixels, checked from the header before decoding (large "
                  "JPEGs are decoded at reduced scale first)", "--max-image-mpx", bounds=POSITIVE, unit=MPX,
        metavar="N")
    max_request_pixels: int = setting(120 * MPX, "decoded pixels per request (all its images) in megapixels",
                                      "--max-request-mpx", bounds=POSITIVE, unit=MPX, metavar="N")
    prepare_memory_bytes: int = setting(
        2048 * MIB, "memory in MiB that requests being prepared (images decoded) may take together, "
                    "estimated from image headers; more wait their turn", "--prepare-memory-mb",
        bounds=POSITIVE, unit=MIB, metavar="N")
    image_cache_bytes: int = setting(512 * MIB, "byte budget of the image caches (preprocessed pixels and "
                                                "features) in MiB; 0 = off", "--image-cache-mb",
                                     bounds=Bounds(0), unit=MIB, metavar="N", model_option=True)
    retained_kv_bytes: int = setting(
        4096 * MIB, "largest KV cache in MiB kept for the next request's shared prefix (the last "
                    "conversation); 0 = keep none", "--retained-kv-mb", bounds=Bounds(0), unit=MIB, metavar="N")
    heap_trim_s: float = setting(5.0, "seconds between returns of freed heap memory to the OS (glibc malloc_trim, "
                                      "server/heap_trim.py); 0 = never", "--heap-trim-s", bounds=Bounds(0),
                                 metavar="S")
    model_id: str | None = setting(None, "the model id clients use", "--model-id", metavar="ID",
                                   default_text="the hub id, or a local folder's name")
    # ---- hardening (issue 11): who may talk to the server, and how long a connection may dawdle ----
    allowed_hosts: str | None = setting(
        None, "Host header names accepted, comma-separated (port ignored; `*.example.com` for subdomains; "
              "`*`: any); other names get 400. Stops DNS-rebinding web pages from reaching a local server",
        "--allowed-hosts", metavar="LIST",
        default_text="localhost,127.0.0.1,[::1] when --host is a loopback address, else *")
    allowed_origins: str | None = setting(
        None, "web origins (scheme://host[:port], comma-separated; `*`: any) whose pages may call /v1 from a "
              "browser (CORS); requests from other origins get 403", "--allowed-origins", metavar="LIST",
        default_text="only the page at / (same origin)")
    allow_private_image_urls: bool = setting(
        False, "with --allow-remote-images, also fetch from loopback, link-local and private addresses "
               "(otherwise refused: clients could reach services on the server's network)",
        "--allow-private-image-urls", default_text="off")
    header_timeout_s: float = setting(10.0, "seconds a client has to send a request's headers; then the "
                                            "connection is closed", "--header-timeout-s",
                                      bounds=Bounds(0, lo_open=True), metavar="S")
    body_timeout_s: float = setting(60.0, "seconds a client has to send a request's whole body; then 408",
                                    "--body-timeout-s", bounds=Bounds(0, lo_open=True), metavar="S")
    max_connections: int = setting(256, "open connections and requests in progress; more get 503",
                                   "--max-connections", bounds=POSITIVE, metavar="N")

    # ---- observability and shutdown (issue 12): server/metrics.py, request_log.py, shutdown.py ----
    log_format: str = setting("text", "the server's log lines (one per request, with its tokens and timings): "
                                      "text, or one JSON object per line", "--log-format", metavar="FORMAT",
                              choices=("text", "json"), default_text="text")
    public_metrics: bool = setting(
        False, "serve /metrics without the API key when --api-key is set (metrics show load and timings, "
               "never content; by default they need the key, as /v1 does)", "--public-metrics", default_text="off")
    shutdown_timeout_s: float = setting(
        30.0, "on SIGTERM, seconds the requests in flight get to finish (new ones get 503); then they are "
              "cancelled", "--shutdown-timeout-s", bounds=Bounds(0), metavar="S")

    def __post_init__(self):
        for f in fields(self):
            value, bounds = getattr(self, f.name), f.metadata["bounds"]
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise Phi3VError(f"{f.name} must be one of {', '.join(choices)}, got {value!r}")
            if value is not None and bounds is not ANY and not bounds.contains(value):
                raise Phi3VError(f"{f.name} must be {bounds.describe(isinstance(value, int))}, got {value}")


def served_model_id(model_name: str) -> str:
    """The id listed by /v1/models: a hub id as given, a local folder by its name only.

    A local folder's full path is not shown to clients (it says nothing useful to them and
    reveals the server's layout); they may still send the full name the operator used.
    """
    name = str(model_name).rstrip("/\\")
    if os.path.isabs(name) or name.startswith(".") or os.path.isdir(name):
        return os.path.basename(name) or name
    return name


def accepted_model_names(model_name: str, model_id: str) -> frozenset[str]:
    """Names a request's `model` field may carry: the served id, the name given to load(), their basenames."""
    names = {model_id, str(model_name), str(model_name).rstrip("/\\")}
    names |= {os.path.basename(n.rstrip("/\\")) for n in list(names)}
    return frozenset(n for n in names if n)
