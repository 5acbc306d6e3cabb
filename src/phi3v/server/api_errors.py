"""Errors in the OpenAI shape: {"error": {"message", "type", "param", "code"}} with the right status."""

from __future__ import annotations

import json

from fastapi.responses import JSONResponse

from ..errors import ImageError, Phi3VError, PromptError, PromptTooLongError, TooManyImagesError, VideoError


# The code of an error raised without one: every error body names a code, never null.
STATUS_CODES = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                405: "method_not_allowed", 408: "request_timeout", 413: "request_too_large",
                429: "rate_limit_exceeded", 500: "internal_error", 503: "service_unavailable"}


class APIError(Exception):
    """An error a client caused (or a full queue); rendered as one OpenAI error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code or STATUS_CODES.get(status, f"http_{status}")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def context_length_error(*, prompt_tokens: int, image_tokens: int, max_new_tokens: int,
                         context_length: int) -> APIError:
    """400 for a request that does not fit the context, with the token counts (OpenAI wording)."""
    message = (
        f"This model's maximum context length is {context_length} tokens. However, you requested "
        f"{prompt_tokens + max_new_tokens} tokens ({prompt_tokens} in the messages, {image_tokens} of them "
        f"image tokens, and {max_new_tokens} in the completion). Please reduce the length of the messages, "
        f"the number of images or num_crops, or max_tokens."
    )
    return APIError(400, message, param="messages", code="context_length_exceeded")


def from_phi3v_error(err: Phi3VError, *, param: str | None = None) -> APIError:
    """Map a phi3v error raised while reading a request to a 400 the client can act on."""
    if isinstance(err, TooManyImagesError):
        return APIError(400, str(err), param=param or "messages", code="too_many_images")
    if isinstance(err, VideoError):  # a bad, truncated or unreadable video (a kind of ImageError)
        return APIError(400, str(err), param=param or "messages", code="invalid_video")
    if isinstance(err, ImageError):
        return APIError(400, str(err), param=param or "messages", code="invalid_image")
    if isinstance(err, PromptTooLongError):
        return APIError(400, str(err), param="messages", code="context_length_exceeded")
    if isinstance(err, PromptError):
        return APIError(400, str(err), param=param or "messages", code="invalid_prompt")
    return APIError(400, str(err), param=param, code="invalid_value")


def unsupported_parameter(name: str, value) -> APIError:
    """400 for an OpenAI parameter this server cannot honour (schemas.UNSUPPORTED_PARAMETERS)."""
    shown = json.dumps(value, default=str)[:80]
    return APIError(400, f"Unsupported parameter: {name}={shown} is not supported by this server "
                         f"(phi3v generates one text answer per request).", param=name, code="unsupported_parameter")


def internal_error() -> APIError:
    # The traceback is logged on the server; the client learns only that it was not its fault.
    return APIError(500, "The server had an error while processing your request.", type="server_error",
                    code="internal_error")
