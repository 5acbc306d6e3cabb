"""The rules for image sources given as text: data: URIs, base64, names of image files.

One set of rules, used by `image.open_image` (Python API and CLI), the server (which decodes a
request's data: URIs while checking it, before it waits for the engine) and batch inputs (which
files of a folder are images). Plain string work: no torch, numpy or Pillow import, so entry
points can use it without paying for them. docs/images.md states the rules for users:

- a data: URI is `data:[image/<type>][;<param>]*;base64,<payload>`: the media type is empty or
  image/*, the `base64` parameter is required and the payload is base64 (standard or URL-safe
  alphabet, whitespace ignored). Percent-encoded payloads (RFC 2397 without `;base64`) are
  refused: no image client sends them, and `data:image/png,<base64>` (a forgotten `;base64`) then
  gets a message that says what is missing instead of "not an image".
- bare base64 text is recognised by its alphabet, at least 32 characters, a length divisible by 4.
- image files are recognised by IMAGE_SUFFIXES (case-insensitive).
"""

from __future__ import annotations

import base64
import binascii
import os
import re

from ..errors import ImageError

# Suffixes of the image files phi3v picks up (batch folders and globs) and takes a string ending in
# for a file name; all are formats Pillow decodes (docs/images.md).
IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".pbm", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")

_DATA_URI_RE = re.compile(r"data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*),(?P<data>.*)", re.DOTALL | re.IGNORECASE)
_BASE64_RE = re.compile(r"[A-Za-z0-9+/]*={0,2}|[A-Za-z0-9_-]*={0,2}")  # standard | URL-safe alphabet
_MIN_BASE64_CHARS = 32  # shorter strings are names, not images (the smallest PNG is ~90 chars)


class InvalidBase64Error(ImageError):
    """Image data given as base64 (bare or in a data: URI) is not valid base64."""


def has_image_suffix(name: str | os.PathLike) -> bool:
    """True when the file name ends in one of IMAGE_SUFFIXES (any case)."""
    return os.fspath(name).lower().endswith(IMAGE_SUFFIXES)


def is_data_uri(text: str) -> bool:
    return text.lstrip()[:5].lower() == "data:"


def decode_data_uri(uri: str, *, max_bytes: int | None = None) -> bytes:
    """`data:image/<type>;base64,<payload>` -> the image's encoded bytes (not decoded as an image).

    Raises ImageError naming what is wrong (malformed, not image/*, not base64, empty, larger than
    max_bytes) and InvalidBase64Error (an ImageError) for a payload that is not base64.
    """
    match = _DATA_URI_RE.fullmatch(uri.strip())
    if match is None:
        raise ImageError(f"malformed data: URI {short_repr(uri)} (expected data:image/<type>;base64,<data>)")
    mime = match.group("mime").strip().lower()
    params = [p.strip().lower() for p in match.group("params").split(";") if p.strip()]
    if mime and not mime.startswith("image/"):
        raise ImageError(f"data: URI has media type {mime!r}, expected image/*")
    if "base64" not in params:
        raise ImageError("data: URI images must be base64 encoded (data:image/<type>;base64,<data>); "
                         "percent-encoded data: URIs are not accepted")
    name = f"data URI ({mime or 'image'})"
    data = decode_base64(match.group("data"), name, max_bytes=max_bytes)
    if not data:
        raise ImageError(f"{name} holds no image data")
    return data


def decode_base64(text: str, name: str, *, max_bytes: int | None = None) -> bytes:
    """Base64 text (standard or URL-safe alphabet, whitespace ignored) -> bytes.

    The decoded size is checked against max_bytes before decoding; `name` is used in messages.
    """
    compact = "".join(text.split())
    if max_bytes is not None:
        check_byte_size(len(compact) * 3 // 4, name, max_bytes)
    try:
        if "-" in compact or "_" in compact:
            return base64.urlsafe_b64decode(compact)
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as err:
        raise InvalidBase64Error(f"{name} is not valid base64: {err}") from None


def looks_like_base64(text: str) -> bool:
    """Could this string be base64 image data (rather than a name)? See the module docstring."""
    compact = "".join(text.split())
    return (
        len(compact) >= _MIN_BASE64_CHARS
        and len(compact) % 4 == 0
        and _BASE64_RE.fullmatch(compact) is not None
    )


def looks_like_file_name(text: str) -> bool:
    """Did the user mean a local file? A separator, a leading ~ or ., or an image suffix.

    Used only to word a refusal where paths are not allowed (the server); model names have their
    own rule (a hub id "owner/name" has a slash but is not a path).
    """
    return "/" in text or "\\" in text or text.startswith(("~", ".")) or has_image_suffix(text)


def check_byte_size(size: int, name: str, max_bytes: int) -> None:
    if size > max_bytes:
        raise ImageError(f"{name} is larger than the limit of {max_bytes} bytes (at least {size} bytes)")


def short_repr(text: str, limit: int = 80) -> str:
    """repr() of text cut to `limit` characters, for messages (a data: URI can be megabytes long)."""
    text = str(text)
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")
