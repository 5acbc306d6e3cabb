"""What the operator chose when starting `phi3v serve` (one frozen object shared by every request)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import Phi3VError


@dataclass(frozen=True)
class ServerSettings:
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer <api_key>`
    allow_remote_images: bool = False  # http(s) image URLs are fetched only when True
    max_images: int = 8  # images per request, over the whole conversation
    max_queue: int = 16  # requests waiting for the engine; one more gets 429
    max_body_bytes: int = 20 * 2**20  # request bodies over this get 413
    default_num_crops: int | None = None  # None => the checkpoint's preprocessor_config value
    default_max_tokens: int = 512  # when the client names neither max_tokens nor max_completion_tokens
    remote_timeout_s: float = 10.0  # one remote image fetch
    remote_max_bytes: int = 20 * 2**20  # one remote image
    prepare_threads: int = 2  # image decoding / tokenization off the event loop
    model_id: str | None = None  # the id clients use; None => derived from the model's name

    def __post_init__(self):
        for name in ("max_images", "max_queue", "max_body_bytes", "prepare_threads", "default_max_tokens"):
            if getattr(self, name) < 1:
                raise Phi3VError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.default_num_crops is not None and not 1 <= self.default_num_crops <= 64:
            raise Phi3VError(f"num_crops must be between 1 and 64, got {self.default_num_crops}")


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
