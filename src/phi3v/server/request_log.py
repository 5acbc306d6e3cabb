"""One structured log line per HTTP request (logger "phi3v.server"), as text or as JSON.

Each request gets a `RequestRecord` (request id, method, path, start time), reachable from the
code serving it through a context variable; the engine fills in what its generation did (tokens,
queue wait, time to first token, tokens/s, finish reason) and, when the response has been sent,
`log_request` writes the line:

    text: request id=req-3f2a... method=POST path=/v1/chat/completions status=200 duration_s=1.204
          prompt_tokens=812 image_tokens=757 completion_tokens=64 queue_s=0.002 ttft_s=0.311
          tokens_per_s=71.3 finish_reason=stop
    json: {"event": "request", "id": "req-3f2a...", "method": "POST", ..., "finish_reason": "stop"}

The line never holds content (no prompt, no answer, no header values but the request id): logs
are kept longer and read by more people than the conversations they describe.

With `--log-format json` every line the server writes (uvicorn's too) is one JSON object
(`JsonFormatter`), so a log shipper reads them without parsing text.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field

log = logging.getLogger("phi3v.server")

LOG_FORMATS = ("text", "json")
# Probes and scrapes every few seconds would drown the requests that matter: logged at DEBUG.
QUIET_PATHS = frozenset({"/health", "/metrics"})
# A client's own X-Request-ID is kept when it is a plain token (so it can be grepped, and cannot
# forge log lines); anything else gets an id of ours.
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
MAX_PATH_CHARS = 256  # a path is the client's text: kept short in the log


@dataclass(eq=False)
class RequestRecord:
    id: str
    method: str
    path: str
    started: float = field(default_factory=time.perf_counter)
    status: int | None = None  # None: no response was started (the client or the server went away)
    generation: dict | None = None  # what the engine did for it (generation_fields), once it ended

    def fields(self) -> dict:
        out = {"event": "request", "id": self.id, "method": self.method, "path": self.path,
               "status": self.status, "duration_s": round(time.perf_counter() - self.started, 4)}
        if self.generation:
            out.update(self.generation)
        return out


_CURRENT: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar("phi3v_request", default=None)


def current_record() -> RequestRecord | None:
    """The record of the request being served by this task (None outside a request)."""
    return _CURRENT.get()


def begin_request(method: str, path: str, client_id: str | None) -> tuple[RequestRecord, contextvars.Token]:
    """A record for a new request, made current for the tasks it starts (contexts are copied,
    the record is shared: what the engine writes into it is seen by the middleware)."""
    rid = client_id if client_id and _CLIENT_ID.fullmatch(client_id) else "req-" + uuid.uuid4().hex[:16]
    record = RequestRecord(rid, method[:16], path[:MAX_PATH_CHARS])
    return record, _CURRENT.set(record)


def end_request(token: contextvars.Token) -> None:
    _CURRENT.reset(token)


def generation_fields(completion_tokens: int, prompt_tokens: int, image_tokens: int, queue_s: float,
                      ttft_s: float | None, tokens_per_s: float, finish_reason: str) -> dict:
    return {"prompt_tokens": prompt_tokens, "image_tokens": image_tokens, "completion_tokens": completion_tokens,
            "queue_s": round(queue_s, 4), "ttft_s": None if ttft_s is None else round(ttft_s, 4),
            "tokens_per_s": round(tokens_per_s, 2), "finish_reason": finish_reason}


def log_request(record: RequestRecord, log_format: str) -> None:
    """Write the request's line. The fields also ride on the log record (`phi3v_request`), so a
    JsonFormatter puts them at the top level of the line."""
    fields = record.fields()
    if log_format == "json":
        message = json.dumps(fields, separators=(",", ":"))
    else:
        message = "request " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items() if k != "event")
    if record.path in QUIET_PATHS:
        level = logging.DEBUG
    elif record.status is not None and record.status >= 500:
        level = logging.WARNING
    else:
        level = logging.INFO
    log.log(level, message, extra={"phi3v_request": fields})


def _text_value(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    v = str(v)
    # A path is decoded client text: quoted and escaped when it holds spaces, quotes, `=` or
    # control characters (a %0A must not start a forged log line).
    if not v or not v.isprintable() or any(c in v for c in ' "=\\'):
        return json.dumps(v)
    return v


class JsonFormatter(logging.Formatter):
    """Every log record as one JSON object: time, level, logger, message; a request line's fields
    at the top level instead of its message; an exception's traceback as `exc_info`."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name}
        fields = getattr(record, "phi3v_request", None)
        if fields is not None:
            out.update(fields)
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"), default=str)

    converter = time.gmtime  # the "Z" above: times in UTC


def configure_logging(level: str, log_format: str) -> dict:
    """Root logging for `phi3v serve` -> the uvicorn.Config options that go with it (in JSON mode
    uvicorn's loggers propagate to the root's JSON handler; its access log is left out: the
    request line says the same, and more)."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    return {"log_config": None, "access_log": False} if log_format == "json" else {}
