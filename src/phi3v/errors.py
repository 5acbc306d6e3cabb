"""Errors raised by phi3v. Every message names the problem and, where possible, the fix.

All inherit from Phi3VError so callers (CLI, server, batch) can catch one type and
report `str(err)` to a person without a traceback.
"""


class Phi3VError(Exception):
    """Base class of every error phi3v raises on purpose."""


class ImageError(Phi3VError):
    """An image could not be read or used (unreadable, unsupported, too large, bad base64...)."""


class ImageFormatError(ImageError):
    """The bytes are not an image in a format phi3v can decode (the one case where listing the
    supported formats helps; a missing, empty or too large image is a plain ImageError)."""


class VideoError(ImageError):
    """A video (file, animated image, frame folder) cannot be read or its frames cannot be chosen.
    An ImageError: entry points that report bad images report bad videos the same way."""


class TooManyImagesError(Phi3VError):
    """More images than the caller's limit allows."""


class PromptError(Phi3VError):
    """The prompt or messages are malformed (bad <|image_N|> tags, wrong roles, ...)."""


class PromptTooLongError(Phi3VError):
    """Prompt tokens (text + image tokens) plus max_new_tokens exceed the context."""

    def __init__(self, message: str, *, prompt_tokens: int, image_tokens: int, limit: int):
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.image_tokens = image_tokens
        self.limit = limit


class ModelNotFoundError(Phi3VError):
    """The model is neither a local folder nor a reachable / cached hub id."""


class CheckpointError(Phi3VError):
    """A checkpoint is malformed: missing, unexpected or mis-shaped tensor, bad config."""


class DeviceError(Phi3VError):
    """The requested device or dtype is not available (e.g. cuda without CUDA)."""
