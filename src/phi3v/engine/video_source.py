"""The text rules for video sources: which names are videos, data: URIs of videos, frame folders.

Plain string work (no torch, PyAV or Pillow import), shared by the Python API, the CLI (`phi3v
describe clip.mp4` notices the suffix) and the server and batch inputs. docs/video.md states the
rules for users:

- a video file is recognised by VIDEO_SUFFIXES (case-insensitive) and decoded with PyAV;
- an animated GIF or WebP is a video only when given as one (`video=`, `phi3v video`); given as
  an image it stays an image (its first frame), as before;
- a folder given as a video is a sequence of frame images: its files with IMAGE_SUFFIXES, in
  natural order (frame2.png before frame10.png), timed at one frame per second;
- a data: URI video is `data:video/<type>;base64,<payload>` (or image/gif, image/webp).
"""

from __future__ import annotations

import os
import re

from ..errors import VideoError
from .image_source import IMAGE_SUFFIXES, decode_base64

# Container formats read with PyAV (its wheels bundle FFmpeg: no system FFmpeg needed).
VIDEO_SUFFIXES = (".avi", ".m4v", ".mkv", ".mov", ".mp4", ".mpeg", ".mpg", ".webm")
# Animated image formats read with Pillow when they are given as a video.
ANIMATED_SUFFIXES = (".gif", ".webp")

_VIDEO_DATA_URI_RE = re.compile(r"data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*),(?P<data>.*)",
                                re.DOTALL | re.IGNORECASE)
_NUMBER_RE = re.compile(r"(\d+)")


def has_video_suffix(name: str | os.PathLike) -> bool:
    """True when the file name ends in one of VIDEO_SUFFIXES (any case): a container file."""
    return os.fspath(name).lower().endswith(VIDEO_SUFFIXES)


def has_animated_suffix(name: str | os.PathLike) -> bool:
    return os.fspath(name).lower().endswith(ANIMATED_SUFFIXES)


def natural_key(name: str) -> tuple:
    """Sort key putting "frame2.png" before "frame10.png": digit runs compare as numbers, the rest
    case-insensitively, and the name itself breaks ties (so the order is total)."""
    parts = _NUMBER_RE.split(name)
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p.lower()) for p in parts if p != ""), name


def frame_files(folder: str | os.PathLike) -> list[str]:
    """The frame images of a folder (IMAGE_SUFFIXES, not hidden), in natural order -> full paths."""
    folder = os.fspath(folder)
    names = [n for n in os.listdir(folder)
             if not n.startswith(".") and n.lower().endswith(IMAGE_SUFFIXES)
             and os.path.isfile(os.path.join(folder, n))]
    return [os.path.join(folder, n) for n in sorted(names, key=natural_key)]


def decode_video_data_uri(uri: str, *, max_bytes: int | None = None) -> bytes:
    """`data:video/<type>;base64,<payload>` -> the video file's bytes (not decoded).

    The media type is empty, video/*, image/gif or image/webp; the payload must be base64.
    """
    match = _VIDEO_DATA_URI_RE.fullmatch(uri.strip())
    if match is None:
        raise VideoError("malformed data: URI (expected data:video/<type>;base64,<data>)")
    mime = match.group("mime").strip().lower()
    params = [p.strip().lower() for p in match.group("params").split(";") if p.strip()]
    if mime and not (mime.startswith("video/") or mime in ("image/gif", "image/webp")):
        raise VideoError(f"data: URI has media type {mime!r}, expected video/* (or image/gif, image/webp)")
    if "base64" not in params:
        raise VideoError("data: URI videos must be base64 encoded (data:video/<type>;base64,<data>)")
    name = f"data URI ({mime or 'video'})"
    data = decode_base64(match.group("data"), name, max_bytes=max_bytes)
    if not data:
        raise VideoError(f"{name} holds no video data")
    return data
