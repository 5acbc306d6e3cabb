"""The FastAPI app: routes, auth, error rendering. The work itself is in service.py."""

from __future__ import annotations

import logging
import secrets
import time
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from .. import __version__
from .api_errors import APIError, internal_error, unsupported_parameter
from .body_deadline import BodyDeadlineMiddleware, BodyTimeout
from .body_limit import BodyLimitMiddleware, BodyTooLarge
from .engine_worker import EngineWorker
from .heap_trim import HeapTrimmer
from .host_guard import LOOPBACK_NAMES, HostGuardMiddleware, parse_list
from .metrics import ServerMetrics
from .observe import ObserverMiddleware
from .schemas import (CONTENT_PART_TYPES, RESPONSE_FORMAT_TYPES, UNSUPPORTED_PARAMETERS, ChatCompletion,
                      ChatCompletionRequest, ErrorResponse, ModelCard, ModelList)
from .service import ChatService
from .settings import ServerSettings, accepted_model_names, served_model_id
from .shutdown import DrainMiddleware, Lifecycle
from .video_parts import FRAMES_HEADER

log = logging.getLogger("phi3v.server")

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 408, 413, 429, 500)}


def create_app(model, settings: ServerSettings | None = None) -> FastAPI:
    """An app serving `model` (a loaded phi3v.Phi3V). The engine worker starts with the app."""
    settings = settings or ServerSettings()
    model_id = settings.model_id or served_model_id(model.name)
    worker = EngineWorker(model, settings.max_queue, max_batch=settings.max_batch,
                          kv_budget_bytes=settings.kv_budget_bytes, prefill_chunk=settings.prefill_chunk,
                          vision_chunk=settings.vision_chunk, vision_layers=settings.vision_layers,
                          fuse_prefill=not settings.separate_prefill, step_budget=settings.step_budget)
    # The caches' byte budgets are the server's settings (replacing those the model was loaded with).
    model.images.set_cache_bytes(settings.image_cache_bytes)
    model.conversation.max_bytes = settings.retained_kv_bytes
    model.conversation.max_entries = settings.retained_conversations
    service = ChatService(model, settings, worker, model_id, accepted_model_names(model.name, model_id))
    created = int(time.time())
    trimmer = HeapTrimmer(settings.heap_trim_s)  # freed heap memory back to the OS now and then (heap_trim.py)
    # Readiness and the drain on SIGTERM (shutdown.py); metrics and the per-request log line
    # (metrics.py, request_log.py): the worker reports each generation as it ends.
    lifecycle = Lifecycle(settings.shutdown_timeout_s, on_timeout=worker.cancel_all)
    metrics = ServerMetrics(worker, model, lifecycle)
    worker.on_finish = metrics.observe_generation

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        trimmer.start()
        lifecycle.started()
        try:
            yield
        finally:
            lifecycle.stopped()
            worker.stop()
            service.close()
            trimmer.stop()

    app = FastAPI(
        title="phi3v",
        version=__version__,
        description="OpenAI-compatible chat completions with images, served by phi3v.",
        lifespan=lifespan,
        docs_url=None,  # the Swagger/ReDoc pages load assets from a CDN; the schema is at /openapi.json
        redoc_url=None,
    )
    app.state.settings, app.state.worker, app.state.service = settings, worker, service
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    # Added last = runs first: the Host/Origin check, then the body deadline, then the size limit.
    app.add_middleware(BodyDeadlineMiddleware, seconds=settings.body_timeout_s)
    origins = parse_list(settings.allowed_origins)
    if origins:  # pages of these origins may call /v1 from a browser: answer their CORS preflights
        app.add_middleware(CORSMiddleware, allow_origins=["*"] if "*" in origins else list(origins),
                           allow_methods=["GET", "POST"], allow_headers=["authorization", "content-type"],
                           expose_headers=[FRAMES_HEADER])  # a page's script may read the video frames used
    # allowed_hosts None: localhost names only (phi3v serve passes `*` when bound to a public address).
    hosts = LOOPBACK_NAMES if settings.allowed_hosts is None else parse_list(settings.allowed_hosts)
    app.add_middleware(HostGuardMiddleware, allowed_hosts=hosts, allowed_origins=origins)
    # Outermost: the drain's 503 (before anything else is done for a refused request), then, around
    # everything, the observer: requests by status and the log line, whoever answered.
    app.add_middleware(DrainMiddleware, lifecycle=lifecycle)
    app.add_middleware(ObserverMiddleware, metrics=metrics, log_format=settings.log_format)
    app.state.lifecycle, app.state.metrics = lifecycle, metrics

    # ---- errors: always the OpenAI shape, never a traceback ---------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        return _validation_response(err).response()

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, err: HTTPException):
        if isinstance(err, (BodyTooLarge, BodyTimeout)):
            raise err  # their middleware answers (413 after draining the body; 408), closing the connection
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return APIError(err.status_code, str(err.detail), code=code, headers=dict(err.headers or {})).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception):
        log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=err)
        return internal_error().response()

    # ---- auth ---------------------------------------------------------------------------------
    async def require_key(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise APIError(401, "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
                           code="missing_api_key", headers={"WWW-Authenticate": "Bearer"})
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    # ---- routes -------------------------------------------------------------------------------
    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses={
        **_ERRORS, 200: {"description": "A ChatCompletion, or with `stream: true` server-sent "
                                        "`chat.completion.chunk` events ending with `data: [DONE]`.",
                         "content": {"text/event-stream": {}}}},
        dependencies=[Depends(require_key)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        if body.stream:
            return await service.stream(body, request)
        return JSONResponse(await service.complete(body, request))

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS, dependencies=[Depends(require_key)])
    async def list_models():
        return {"object": "list", "data": [_model_card(model_id, created)]}

    @app.get("/v1/models/{name:path}", response_model=ModelCard, responses=_ERRORS,
             dependencies=[Depends(require_key)])
    async def get_model(name: str):
        if name not in service.accepted_names:
            raise APIError(404, f"The model `{name}` does not exist. This server serves `{model_id}`.",
                           param="model", code="model_not_found")
        return _model_card(model_id, created)

    @app.get("/health")
    async def health():
        # status "ok" only when ready: 503 while loading or draining tells load balancers to stop
        # sending (state says which); "error" when the engine worker cannot serve.
        ok = worker.alive or not lifecycle.ready  # before start and after stop the worker is not alive
        state = lifecycle.state if ok else "error"
        ready = ok and lifecycle.ready
        body = {"status": "ok" if ready else ("error" if not ok else state), "state": state, "model": model_id,
                "auth": settings.api_key is not None, "queue": worker.snapshot()}
        return JSONResponse(body, status_code=200 if ready else 503)

    # Prometheus text format. Metrics show load, never content: open when the server has no key;
    # with a key they need it too (as /v1 does) unless --public-metrics (docs/server.md).
    metrics_auth = [Depends(require_key)] if settings.api_key is not None and not settings.public_metrics else []

    @app.get("/metrics", include_in_schema=False, dependencies=metrics_auth)
    async def prometheus_metrics():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    # HEAD /health: the same status without a body (load balancers' checks), kept out of the schema
    # (one operation per path and method there).
    app.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def web_page():
        return HTMLResponse(_page(), headers={"Cache-Control": "no-cache"})

    return app


def _model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "phi3v"}


def _page() -> str:
    return resources.files("phi3v.server").joinpath("static/index.html").read_text(encoding="utf-8")


def _validation_response(err: RequestValidationError) -> APIError:
    """One pydantic error as one OpenAI 400: `param` is the field path (messages.0.content).

    Of a union's failed alternatives (content: a string or a list of parts), the error that
    went deepest into the value is the one that says what is wrong.
    """
    errors = err.errors() or [{}]
    # An alternative of the right type first, then the deepest; max keeps the first of equals.
    first = max(errors, key=lambda e: (not e.get("type", "").endswith("_type"), len(e.get("loc", ()))))
    loc = _param_path(first.get("loc", ()))
    param = ".".join(loc) or None
    kind = first.get("type", "")
    body = getattr(err, "body", None)
    if loc and loc[0] in UNSUPPORTED_PARAMETERS and not kind.endswith("_type") and isinstance(body, dict):
        return unsupported_parameter(loc[0], body.get(loc[0]))
    if kind == "invalid_unicode":
        return APIError(400, f"{param}: {first.get('msg')}", param=param, code="invalid_unicode")
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                        code="unrecognized_argument")
    if kind == "json_invalid":
        return APIError(400, "The request body is not valid JSON.", code="invalid_json")
    if kind == "missing" and not loc:
        return APIError(400, "The request body is missing; send a JSON object.", code="invalid_request")
    message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "Invalid request.")
    return APIError(400, message, param=param, code="invalid_value")


def _param_path(loc) -> list[str]:
    """A pydantic error location as the request's own path.

    pydantic names the union alternative it tried inside the location ("function-after[...]",
    "list[...]") and, for content parts and response_format, the type tag right after the value
    (messages.0.content.list[...].1.text.text, response_format.json_schema.json_schema.name);
    neither is in the request.
    """
    out: list[str] = []
    for i, part in enumerate(loc):
        if part == "body" and i == 0:
            continue
        if isinstance(part, str) and ("[" in part or "(" in part):
            continue
        if isinstance(part, str) and part in CONTENT_PART_TYPES and out and out[-1].isdigit() \
                and i + 1 < len(loc) and "content" in out:
            continue  # the tag; the field of the same name follows it
        if out == ["response_format"] and loc[i - 1] == "response_format" and part in RESPONSE_FORMAT_TYPES \
                and i + 1 < len(loc):
            continue  # response_format's type tag
        out.append(str(part))
    return out
