"""Image arguments of the `phi3v` command: paths, `-` (bytes on stdin) and http(s) URLs.

Every image is opened (and so validated) before the model is loaded, so a typo in a path
fails in a fraction of a second rather than after the weights are read. Opening goes through
phi3v.engine.image.open_image, which applies the EXIF orientation, takes the first frame of an
animation and enforces the URL timeout and size cap of the policy.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageError

URL_TIMEOUT_S = 15.0
URL_MAX_BYTES = 50 * 2**20
SUPPORTED_FORMATS = "PNG, JPEG, GIF (first frame), WebP, BMP, TIFF"


@dataclass
class CliImage:
    label: str  # what the person typed ("-" shows as "<stdin>"), used in messages and /save
    image: object  # PIL.Image.Image, orientation applied
    format: str | None = None  # "PNG", "JPEG", ... when it could be told


def _image_error(message: str, hint: str) -> ImageError:
    err = ImageError(message)
    err.cli_hint = hint  # shown by cli.run_with_errors instead of the generic image hint
    return err


def _format_of(payload) -> str | None:
    """The encoded format, read from the header only (open_image returns a decoded copy)."""
    from PIL import Image

    try:
        if isinstance(payload, Path):
            with Image.open(payload) as im:
                return im.format
        if isinstance(payload, bytes):
            import io

            with Image.open(io.BytesIO(payload)) as im:
                return im.format
    except Exception:  # the image was decoded already; the format is only a nicety
        return None
    return None


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def cli_policy():
    """Who may load what from the command line: local files and remote URLs (with limits)."""
    from ..engine.image import ImageSourcePolicy

    return ImageSourcePolicy(allow_paths=True, allow_remote=True, allow_private=True,  # the user's own URLs
                             timeout_s=URL_TIMEOUT_S, max_bytes=URL_MAX_BYTES)


def open_cli_image(source: str, stdin_bytes: bytes | None = None) -> CliImage:
    """Open one image argument; `stdin_bytes` are used for "-". Raises ImageError naming it."""
    if source == "-":
        if not stdin_bytes:
            raise _image_error("no image bytes on standard input",
                               "\"-\" reads an image from stdin: phi3v describe - < photo.jpg")
        label, payload = "<stdin>", stdin_bytes
    else:
        label, payload = source, source
        if not is_url(source):
            _check_local_file(source)
            payload = Path(source).expanduser()  # a Path: never mistaken for base64 text
    # imported after the cheap checks: a wrong path fails before torch loads
    from ..engine.image import open_image

    try:
        image = open_image(payload, cli_policy())
    except ImageError as err:
        message = str(err)
        # the same class (ImageFormatError gets the formats hint, other image errors do not)
        failure = type(err)(message if label in message else f"{label}: {message}")
        if is_url(source) and type(err) is ImageError:  # not found, refused, timed out, too many bytes
            failure.cli_hint = (f"check the URL; phi3v downloads it with a {URL_TIMEOUT_S:g} s deadline and a "
                                f"{URL_MAX_BYTES >> 20} MiB cap (or save the image and give the file)")
        raise failure from err
    return CliImage(label=label, image=image, format=image.format or _format_of(payload))


def _check_local_file(path: str) -> None:
    """Clear messages for the two commonest mistakes, before any decoding is tried."""
    import os

    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise _image_error(f"{path}: no such file",
                           f"check the path (relative paths start from {os.getcwd()})")
    if os.path.isdir(path):
        raise _image_error(f"{path}: is a folder, not an image file",
                           "to run over a folder of images use `phi3v batch FOLDER --task ...`")
    if not os.access(path, os.R_OK):
        raise _image_error(f"{path}: not readable (permission denied)", "check the file's permissions")


def open_cli_images(sources: list[str]) -> list[CliImage]:
    """Open every image argument in order; "-" may appear once and reads all of stdin."""
    if sources.count("-") > 1:
        raise _image_error("\"-\" (an image on stdin) can be given only once",
                           "save the other images to files")
    for source in sources:  # every path first: a typo in the last one fails before any decoding
        if source != "-" and not is_url(source):
            _check_local_file(source)
    stdin_bytes = sys.stdin.buffer.read() if "-" in sources else None
    return [open_cli_image(s, stdin_bytes) for s in sources]
