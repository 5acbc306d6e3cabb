"""The text rules for image sources (phi3v.engine.image_source), shared by open_image, the server and batch.

One data: URI rule everywhere: `data:[image/<type>][;params];base64,<payload>`, standard or URL-safe
base64, whitespace ignored; percent-encoded data URIs are refused (docs/images.md). One list of
image file suffixes. The server's side of the same rules is in tests/test_server.py.
"""

from __future__ import annotations

import base64
import io
import urllib.parse

import numpy as np
import pytest
from PIL import Image

from phi3v.engine import image_source
from phi3v.engine.image import ImageSourcePolicy, open_image
from phi3v.engine.image_source import (
    IMAGE_SUFFIXES,
    InvalidBase64Error,
    decode_data_uri,
    has_image_suffix,
    looks_like_base64,
    looks_like_file_name,
)
from phi3v.errors import ImageError


@pytest.fixture(scope="module")
def png() -> bytes:
    """A 20x12 random PNG whose standard base64 holds both '+' and '/' (so URL-safe differs)."""
    for seed in range(100):
        pixels = np.random.default_rng(seed).integers(0, 256, (12, 20, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        text = base64.b64encode(buf.getvalue()).decode()
        if "+" in text and "/" in text:
            return buf.getvalue()
    raise AssertionError("no seed gave a PNG with both '+' and '/' in its base64")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def accepted_forms(png: bytes) -> list[str]:
    text = b64(png)
    return [
        "data:image/png;base64," + text,
        "data:;base64," + text,  # no media type: image assumed
        "DATA:IMAGE/PNG;BASE64," + text,  # scheme, type and parameter are case-insensitive
        "data:image/png;name=a.png;base64," + text,  # other parameters are ignored
        "data:image/png;base64," + "\n".join(text[i:i + 60] for i in range(0, len(text), 60)),
        "data:image/png;base64," + base64.urlsafe_b64encode(png).decode(),
        "  data:image/png;base64," + text + "\n",  # surrounding whitespace
    ]


def test_accepted_data_uris_decode_to_the_bytes_everywhere(png):
    for uri in accepted_forms(png):
        assert decode_data_uri(uri) == png, uri[:40]
        assert open_image(uri, ImageSourcePolicy(allow_paths=False)).size == (20, 12), uri[:40]


def refused_forms(png: bytes) -> list[tuple[str, type, str]]:
    """(uri, error type, words of the message)."""
    return [
        ("data:image/png," + urllib.parse.quote_from_bytes(png), ImageError, "must be base64"),
        ("data:image/png," + b64(png), ImageError, "must be base64"),  # a forgotten ;base64
        ("data:text/plain;base64,aGVsbG8=", ImageError, "expected image/*"),
        ("data:image/png;base64", ImageError, "malformed data: URI"),
        ("data:image/png;base64,", ImageError, "holds no image data"),
        ("data:image/png;base64,@@not base64@@", InvalidBase64Error, "not valid base64"),
        ("data:image/png;base64," + b64(png)[:-1], InvalidBase64Error, "not valid base64"),
    ]


def test_refused_data_uris_raise_the_same_error_everywhere(png):
    for uri, error, words in refused_forms(png):
        for attempt in (lambda: decode_data_uri(uri), lambda: open_image(uri)):
            with pytest.raises(error, match=words.replace("*", r"\*")):
                attempt()


def test_data_uri_byte_limit_is_checked_before_decoding(png):
    uri = "data:image/png;base64," + b64(png)
    with pytest.raises(ImageError, match="larger than the limit of 50 bytes"):
        decode_data_uri(uri, max_bytes=50)
    with pytest.raises(ImageError, match="larger than the limit of 50 bytes"):
        open_image(uri, ImageSourcePolicy(max_bytes=50))


def test_bare_base64_and_file_names():
    assert looks_like_base64("QUJD" * 8) and not looks_like_base64("QUJD")  # at least 32 characters
    assert not looks_like_base64("QUJD" * 8 + "Q")  # length not divisible by 4
    for name in ("cat.png", "CAT.JPG", "scan.ppm", "./x", "~/x", "a/b", "a\\b"):
        assert looks_like_file_name(name), name
    assert not looks_like_file_name("cat")


def test_one_suffix_list_for_open_image_and_batch_inputs():
    from phi3v.batch import records

    assert records.IMAGE_SUFFIXES is IMAGE_SUFFIXES
    assert list(IMAGE_SUFFIXES) == sorted(IMAGE_SUFFIXES) and all(s == s.lower() for s in IMAGE_SUFFIXES)
    for suffix in IMAGE_SUFFIXES:
        assert has_image_suffix("x" + suffix.upper()) and records.is_image_file("dir/x" + suffix)
    assert not has_image_suffix("notes.txt") and not records.is_image_file("a.jsonl")
    # every listed format is one Pillow can decode
    extensions = Image.registered_extensions()
    assert all(suffix in extensions for suffix in IMAGE_SUFFIXES)


def test_string_rules_need_no_heavy_imports():
    """image_source is used by entry points that must start fast: no torch / numpy / PIL at import."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(image_source))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.level == 0}
    assert not imported & {"torch", "numpy", "PIL"}
