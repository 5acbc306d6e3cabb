"""Image inputs for Phi-3-vision: open any image source, the reference HD transform, pixel_values.

Three jobs, in the order a request needs them:

1. `open_image(source, policy)` turns a path / bytes / base64 / data URI / URL / PIL image / numpy
   array into a decoded `PIL.Image.Image`, enforcing an `ImageSourcePolicy` (who may read local
   files or the network, byte and pixel limits). EXIF orientation is applied to encoded inputs.
2. `hd_transform(image, num_crops)` is the reference "HD transform" (spec section 3): RGB, transpose
   portrait images, resize so the crop grid fits `num_crops`, pad with white to multiples of 336.
   `crop_grid` / `num_image_tokens` repeat it arithmetically (no pixels) and always agree with it.
3. `preprocess(images, num_crops)` builds `pixel_values` (N, num_crops+1, 3, 336, 336) float32:
   [bicubic global view, row-major 336x336 sub-crops, zero padding crops], bit-exact with the reference.

The rules for sources given as text (data: URIs, base64, image file names) are in image_source.py,
shared with the server and batch inputs.
"""

from __future__ import annotations

import io
import math
import os
import re
import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import CLIP_MEAN, CLIP_STD
from .remote_image import fetch_image_bytes
from .image_source import (
    check_byte_size,
    decode_base64,
    decode_data_uri,
    looks_like_base64,
    looks_like_file_name,
    short_repr as _short,
)
from ..errors import ImageError, ImageFormatError, Phi3VError

CROP_SIZE = 336  # CLIP ViT-L/14-336 input side; HD images have sides that are multiples of it
TOKENS_PER_CROP = 144  # 24x24 patches merged 2x2 -> 12x12 feature vectors per crop

# What callers may pass as one image (see open_image).
ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]


# --------------------------------------------------------------------------------------------
# Opening images
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSourcePolicy:
    """Which image sources `open_image` accepts and how large they may be.

    allow_paths: read local files (CLI and Python API: yes; server: never).
    allow_remote: fetch http(s) URLs (CLI: yes; server: only when enabled).
    allow_private: with allow_remote, also fetch from loopback, link-local and private addresses
    (CLI: yes, the user names the URLs; server: only when enabled, as clients name them there).
    timeout_s: total time of one download. max_bytes: size limit of the encoded image (file, bytes,
    base64 payload or download).
    max_pixels / max_request_pixels: budgets of decoded pixels (width*height, after any reduced-
    scale JPEG decoding) per image and per request (all images of one prepare() together). Both
    are checked from the headers before any pixel is decoded: a 500 KB PNG can declare
    13000x13000 pixels, which would take over a gigabyte and seconds to decode. 40 Mpx is more
    than any camera photo needs here (the HD transform keeps at most num_crops*336*336 pixels,
    and large JPEGs are decoded at reduced scale anyway). Pillow's own bomb limit
    (2 * Image.MAX_IMAGE_PIXELS, ~179 Mpx) still caps what a larger budget can allow.
    """

    allow_paths: bool = True
    allow_remote: bool = False
    allow_private: bool = False
    timeout_s: float = 10.0
    max_bytes: int = 50 * 2**20
    max_pixels: int = 40_000_000
    max_request_pixels: int = 120_000_000

    def __post_init__(self):
        for name in ("timeout_s", "max_bytes", "max_pixels", "max_request_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise Phi3VError(f"ImageSourcePolicy.{name} must be a positive number, got {value!r}")


_DEFAULT_POLICY = ImageSourcePolicy()
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_POSITION_RE = re.compile(r"image \d+\b")  # a message that already names the image's position

# Pillow warns (DecompressionBombWarning, with its own file path in the text) for any image over
# Image.MAX_IMAGE_PIXELS while reading the header, before phi3v can apply its smaller budget; the
# warning would reach the terminal or a server log for every oversized upload. Every image phi3v
# opens goes through the policy's pixel budgets, which refuse it with an ImageError instead.
# (A filter, not warnings.catch_warnings around each open: that is not thread-safe, and images
# are opened in several threads of the server.) Set again before each header is read: a filter set
# only at import is lost when phi3v is first imported inside someone's catch_warnings block (pytest
# does this for every test), and a caller's "always" filter would otherwise put it back on stderr.
def _silence_bomb_warning() -> None:
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


_silence_bomb_warning()


@dataclass
class _Encoded:
    """An image source read into memory but not decoded: its bytes and its name for messages."""

    data: bytes
    name: str


@dataclass
class _Probed:
    """An image whose header was read (Pillow's lazy open, maybe set to a reduced JPEG scale)."""

    image: Image.Image  # not loaded yet
    name: str

    @property
    def pixels(self) -> int:
        return self.image.width * self.image.height


def open_image(source: ImageInput, policy: ImageSourcePolicy = _DEFAULT_POLICY,
               num_crops: int | None = None) -> Image.Image:
    """Open one image input and return a fully decoded PIL image.

    Accepted: a path (str or os.PathLike), bytes, a base64 string, a `data:image/...;base64,` URI,
    an http(s) URL (only with policy.allow_remote), a PIL image (returned as given), a numpy uint8
    array (H, W), (H, W, 3) or (H, W, 4). Encoded inputs get EXIF orientation applied and animated
    images give their first frame; their size is checked against the policy's pixel budgets
    before decoding. num_crops: the HD transform the image is meant for; a JPEG at least twice
    as large (each side) as that transform keeps is decoded at 1/2, 1/4 or 1/8 scale (same crop
    grid, a fraction of the time and memory). Everything that goes wrong raises ImageError naming
    the input.
    """
    read = _read(source, policy)
    if isinstance(read, Image.Image):
        return read
    probed = _probe(read, policy, num_crops)
    _check_request_pixels([probed], policy)
    return _load(probed)


def open_images(sources: Sequence[ImageInput], policy: ImageSourcePolicy = _DEFAULT_POLICY,
                num_crops: int | None = None) -> Iterator[Image.Image]:
    """Open the images of one request: every source is read and its header checked (per image and
    per request budgets) before any is decoded; the returned iterator then decodes one image per
    step, so a caller that processes them in turn holds one decoded image at a time. Errors name
    the image by its position ("image 2")."""
    items: list = []
    for index, source in enumerate(sources, 1):
        try:
            read = _read(source, policy)
            items.append(read if isinstance(read, Image.Image) else _probe(read, policy, num_crops, f"image {index}"))
        except ImageError as err:
            message = str(err)
            raise ImageError(message if _POSITION_RE.match(message) else f"image {index}: {message}") from None
    _check_request_pixels([p for p in items if isinstance(p, _Probed)], policy)
    return _decode_in_turn(items)


def _decode_in_turn(items: list) -> Iterator[Image.Image]:
    for index in range(len(items)):
        item, items[index] = items[index], None  # the list must not keep decoded images alive
        yield _load(item) if isinstance(item, _Probed) else item


def _read(source: ImageInput, policy: ImageSourcePolicy):
    """-> a PIL image (given as one: PIL, numpy) or the _Encoded bytes of an encoded source."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        return _from_array(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        _check_byte_size(len(data), "image bytes", policy)
        return _decode(data, "image bytes", policy)
    if isinstance(source, os.PathLike):
        return _open_path(os.fspath(source), policy)
    if isinstance(source, str):
        return _open_string(source, policy)
    raise ImageError(
        f"unsupported image input of type {type(source).__name__}; give a path, bytes, base64, "
        "a data: URI, an http(s) URL, a PIL image or a numpy uint8 array"
    )


def _open_string(text: str, policy: ImageSourcePolicy) -> _Encoded:
    """Dispatch a string: data URI, URL, existing path, base64; otherwise a clear refusal."""
    stripped = text.strip()
    lowered = stripped[:16].lower()
    if lowered.startswith("data:"):
        return _open_data_uri(stripped, policy)
    if lowered.startswith(("http://", "https://")):
        if not policy.allow_remote:
            raise ImageError(
                f"remote image URLs are not allowed here: {_short(stripped)} "
                "(send the image as a data: URI or base64 instead)"
            )
        return _open_url(stripped, policy)
    if lowered.startswith("file:"):
        raise ImageError(f"file:// URLs are never accepted: {_short(stripped)} (give a plain path instead)")
    if _SCHEME_RE.match(stripped):
        raise ImageError(f"unsupported URL scheme in image source {_short(stripped)} (only http(s) and data:)")

    if policy.allow_paths and _is_existing_path(text):
        return _open_path(text, policy)
    if looks_like_base64(stripped):
        return _open_base64(stripped, "base64 image", policy)
    if not policy.allow_paths:
        if looks_like_file_name(stripped):
            raise ImageError(f"local file paths are not allowed here: {_short(text)}")
        raise ImageError(
            f"image source {_short(text)} is not base64 image data or a data: URI "
            "(local file paths are not allowed here)"
        )
    raise ImageError(
        f"image source {_short(text)} is not an existing file, an http(s) URL, a data: URI "
        "or base64 image data"
    )


def _is_existing_path(text: str) -> bool:
    try:
        return os.path.exists(os.path.expanduser(text))
    except (OSError, ValueError):  # name too long, embedded NUL, ...
        return False


def _open_path(path: str, policy: ImageSourcePolicy) -> _Encoded:
    if not policy.allow_paths:
        raise ImageError(f"local file paths are not allowed here: {_short(path)}")
    path = os.path.expanduser(path)
    name = os.path.basename(path) or path
    if os.path.isdir(path):
        raise ImageError(f"image path {path} is a directory, not an image file")
    try:
        size = os.path.getsize(path)
        _check_byte_size(size, name, policy)
        with open(path, "rb") as f:
            data = f.read(policy.max_bytes + 1)  # +1: notice a file that grew past the limit
    except FileNotFoundError:
        raise ImageError(f"image file not found: {path}") from None
    except OSError as err:
        raise ImageError(f"cannot read image file {path}: {err.strerror or err}") from None
    _check_byte_size(len(data), name, policy)
    return _decode(data, name, policy)


def _open_data_uri(uri: str, policy: ImageSourcePolicy) -> _Encoded:
    """The rules live in image_source.decode_data_uri (shared with the server)."""
    return _decode(decode_data_uri(uri, max_bytes=policy.max_bytes), "data URI image", policy)


def _open_base64(text: str, name: str, policy: ImageSourcePolicy) -> _Encoded:
    return _decode(decode_base64(text, name, max_bytes=policy.max_bytes), name, policy)


def _open_url(url: str, policy: ImageSourcePolicy) -> _Encoded:
    """Download (engine/remote_image.py: public addresses only unless policy.allow_private, one
    total deadline, the size cap)."""
    data = fetch_image_bytes(url, timeout_s=policy.timeout_s, max_bytes=policy.max_bytes,
                             allow_private=policy.allow_private)
    return _decode(data, _short(url), policy)


def _check_byte_size(size: int, name: str, policy: ImageSourcePolicy) -> None:
    check_byte_size(size, name, policy.max_bytes)


def _decode(data: bytes, name: str, policy: ImageSourcePolicy) -> _Encoded:
    """Where every reader of encoded bytes ends: the bytes are kept, not decoded yet, so the
    headers of all a request's images are checked against the pixel budgets first (_probe)."""
    return _Encoded(data, name)


# Generic names of in-memory sources: with a position ("image 2") they say nothing more.
_GENERIC_NAMES = ("image bytes", "base64 image", "data URI")


def _probe(encoded: _Encoded, policy: ImageSourcePolicy, num_crops: int | None = None,
           label: str | None = None) -> _Probed:
    """Read the header only; choose a reduced JPEG scale; check the per-image pixel budget."""
    name = encoded.name
    if label is not None:
        name = label if name.startswith(_GENERIC_NAMES) else f"{label} ({name})"
    image = _open_header(encoded.data, name)
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"{name} has an empty size {width}x{height}")
    if num_crops is not None and image.format == "JPEG":
        image = _draft_for_hd(image, encoded.data, name, num_crops)
    pixels = image.width * image.height
    if pixels > policy.max_pixels:
        kind = f"{image.format} " if image.format else ""
        raise ImageError(
            f"{name} is a {kind}image of {width}x{height} = {pixels:,} pixels, more than the limit of "
            f"{policy.max_pixels:,} decoded pixels per image (decompression bomb protection: refused "
            "before decoding; resize it first)"
        )
    return _Probed(image, name)


def _open_header(data: bytes, name: str) -> Image.Image:
    if not data:  # a 0-byte file (an interrupted download, a failed save) is not a format problem
        raise ImageError(f"{name} is empty (0 bytes)")
    _silence_bomb_warning()
    try:
        return Image.open(io.BytesIO(data))  # lazy: reads only the header
    except UnidentifiedImageError:
        raise ImageFormatError(f"{name} is not an image in a supported format") from None
    except Image.DecompressionBombError:  # over Pillow's own hard limit (~179 Mpx)
        raise ImageError(f"{name} declares more than {2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels, "
                         "too large to decode (decompression bomb protection: refused before decoding)") from None
    except Exception as err:  # malformed headers surface as many exception types
        raise ImageError(f"{name} could not be read as an image: {err}") from None


def _draft_for_hd(image: Image.Image, data: bytes, name: str, num_crops: int) -> Image.Image:
    """Ask the JPEG decoder for 1/2, 1/4 or 1/8 scale when the HD transform keeps no more than that
    (Image.draft keeps both sides >= the requested ones). Only when the reduced size gives the same
    crop grid as the full one, so the image's token count never depends on how it was decoded."""
    width, height = image.size
    try:
        full = _plan(width, height, num_crops)
    except ImageError:
        return image  # hd_transform will refuse it with its own message
    # The resized size in the image's own orientation (the plan works in the landscape frame).
    need = (full.new_h, full.new_w) if full.transposed else (full.new_w, full.new_h)
    if width < 2 * need[0] or height < 2 * need[1]:
        return image  # no reduction possible
    image.draft(None, need)
    try:
        same = _plan(image.width, image.height, num_crops) == full
    except ImageError:
        same = False
    return image if same else _open_header(data, name)  # draft cannot be undone: open again


def decoded_pixels(data: bytes, num_crops: int | None = None) -> int | None:
    """The pixels open_image would decode from these encoded bytes (after a reduced JPEG scale for
    num_crops), read from the header only; None when the header cannot be read. For estimates
    (the server's preparation memory budget); the budgets themselves are checked by open_image."""
    try:
        image = _open_header(data, "image")
        if num_crops is not None and image.format == "JPEG":
            image = _draft_for_hd(image, data, "image", num_crops)
        return image.width * image.height
    except ImageError:
        return None


def _check_request_pixels(probed: list[_Probed], policy: ImageSourcePolicy) -> None:
    total = sum(p.pixels for p in probed)
    if total > policy.max_request_pixels:
        sizes = ", ".join(f"{p.name} {p.image.width}x{p.image.height}" for p in probed)
        raise ImageError(
            f"the images of this request add up to {total:,} decoded pixels, more than the limit of "
            f"{policy.max_request_pixels:,} per request ({sizes}); send fewer or smaller images"
        )


def _load(probed: _Probed) -> Image.Image:
    """Decode fully (frame 0), so truncated/corrupt data fails now; apply EXIF orientation."""
    image, name = probed.image, probed.name
    try:
        image.seek(0)  # animated GIF/PNG/WebP, multi-page TIFF: first frame
        image.load()  # full decode here, so truncated/corrupt data fails now, not later
    except Exception as err:
        raise ImageError(f"{name} is truncated or corrupt ({image.format or 'unknown'} data): {err}") from None
    try:
        # Rotated when the EXIF Orientation tag asks for it. In place: a copy would hold a large
        # image twice for a moment (the encoded bytes stay referenced either way, by the request).
        ImageOps.exif_transpose(image, in_place=True)
    except Exception:  # a broken EXIF block should not lose an otherwise fine picture
        pass
    return image


def _from_array(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        raise ImageError(f"numpy image arrays must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        mode = "L"
    elif array.ndim == 3 and array.shape[2] in (3, 4):
        mode = "RGB" if array.shape[2] == 3 else "RGBA"
    else:
        raise ImageError(f"numpy image arrays must be (H, W), (H, W, 3) or (H, W, 4); got shape {array.shape}")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ImageError(f"numpy image array has an empty size {array.shape}")
    return Image.fromarray(np.ascontiguousarray(array), mode=mode)


# --------------------------------------------------------------------------------------------
# RGB conversion
# --------------------------------------------------------------------------------------------


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB exactly as the reference does: `convert("RGB")`.

    Alpha is dropped without compositing; palettes are expanded; CMYK is converted. 16-bit and
    float images ("I;16", "I", "F") are clipped to 0..255 by Pillow, as in the reference, so a
    16-bit scan with values above 255 turns white: convert such images to 8 bits first.
    """
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError:
        pass
    try:  # e.g. "La" / "RGBa" (premultiplied alpha) have no direct path to RGB
        return image.convert("RGBA").convert("RGB")
    except ValueError:
        raise ImageError(f"images of Pillow mode {image.mode!r} cannot be converted to RGB") from None


# --------------------------------------------------------------------------------------------
# HD transform and its arithmetic
# --------------------------------------------------------------------------------------------


def _check_num_crops(num_crops: int) -> None:
    if isinstance(num_crops, bool) or not isinstance(num_crops, (int, np.integer)):
        raise ImageError(f"num_crops must be an integer >= 1, got {num_crops!r}")
    if num_crops < 1:
        raise ImageError(f"num_crops must be >= 1, got {num_crops} (0 crops leaves nothing to resize to)")


def _scale_for_ratio(ratio: float, num_crops: int) -> int:
    """The largest integer s with s * ceil(s / ratio) <= num_crops, found the reference's way.

    Kept as the reference's incrementing loop with float64 division and ceil, so near-integer
    quotients round exactly as there (spec 3, step 3). ratio >= 1, so at most num_crops steps.
    """
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    return scale - 1


@dataclass(frozen=True)
class _HDPlan:
    """Geometry of the HD transform in the landscape frame (after the optional transpose)."""

    transposed: bool
    new_w: int  # resized width (multiple of 336)
    new_h: int  # resized height before padding
    padded_h: int  # multiple of 336
    top: int  # white rows above; the rest (padded_h - new_h - top) go below

    @property
    def hd_size(self) -> tuple[int, int]:
        """(H_hd, W_hd) in the original orientation, as the reference's image_sizes."""
        if self.transposed:
            return self.new_w, self.padded_h
        return self.padded_h, self.new_w


def _plan(width: int, height: int, num_crops: int) -> _HDPlan:
    _check_num_crops(num_crops)
    if width < 1 or height < 1:
        raise ImageError(f"image size must be positive, got {width}x{height}")
    transposed = width < height
    long_side, short_side = (height, width) if transposed else (width, height)
    ratio = long_side / short_side
    scale = _scale_for_ratio(ratio, int(num_crops))
    new_w = CROP_SIZE * scale
    new_h = int(new_w / ratio)
    if new_h < 1:
        raise ImageError(
            f"image {width}x{height} has an aspect ratio of {ratio:.0f}:1, too extreme for "
            f"num_crops={num_crops}: its short side would shrink to 0 pixels "
            f"(at most {new_w}:1 works here; crop or pad the image, or raise num_crops)"
        )
    padded_h = CROP_SIZE * math.ceil(new_h / CROP_SIZE)
    top = int((padded_h - new_h) / 2)
    return _HDPlan(transposed, new_w, new_h, padded_h, top)


def crop_grid(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """(rows, cols) of 336x336 crops of the HD image of a width x height input (no pixels needed)."""
    h_hd, w_hd = _plan(width, height, num_crops).hd_size
    return h_hd // CROP_SIZE, w_hd // CROP_SIZE


def num_tokens_for_grid(rows: int, cols: int) -> int:
    """Image placeholder tokens for a rows x cols crop grid (spec 3):
    sub-crop features (rows*12 lines of cols*12 + 1 separator) + glb_GN + 12x13 global block."""
    return (rows * cols + 1) * TOKENS_PER_CROP + 1 + (rows + 1) * 12


def num_image_tokens(width: int, height: int, num_crops: int) -> int:
    """Number of placeholder tokens a width x height image takes at num_crops; equals preprocess."""
    return num_tokens_for_grid(*crop_grid(width, height, num_crops))


def hd_transform(image: Image.Image, num_crops: int) -> Image.Image:
    """The reference HD transform: RGB image whose sides are multiples of 336 (spec 3, steps 1-7)."""
    plan = _plan(image.width, image.height, num_crops)  # validate before any pixel work
    rgb = to_rgb(image)
    if plan.transposed:  # work on the landscape version; resizing there is what the reference does
        rgb = rgb.transpose(Image.Transpose.TRANSPOSE)
    if rgb.size != (plan.new_w, plan.new_h):
        rgb = rgb.resize((plan.new_w, plan.new_h), Image.Resampling.BILINEAR)
    if plan.padded_h != plan.new_h:
        padded = Image.new("RGB", (plan.new_w, plan.padded_h), (255, 255, 255))
        padded.paste(rgb, (0, plan.top))
        rgb = padded
    if plan.transposed:
        rgb = rgb.transpose(Image.Transpose.TRANSPOSE)
    return rgb


# --------------------------------------------------------------------------------------------
# pixel_values
# --------------------------------------------------------------------------------------------


@dataclass
class ImageBatch:
    """Model inputs for N images.

    pixel_values: float32 (N, num_crops+1, 3, 336, 336) = [global view, sub-crops row-major,
    zero crops]; image_sizes: int64 (N, 2) = [H_hd, W_hd]; num_img_tokens: placeholder count per image.
    """

    pixel_values: torch.Tensor
    image_sizes: torch.Tensor
    num_img_tokens: list

    def __len__(self) -> int:
        return len(self.num_img_tokens)


def normalized_tensor(hd_image: Image.Image, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """(3, H, W) float32 = (uint8 / 255 - mean) / std, in the reference's float32 operation order."""
    # (H, W, 3) uint8. np.asarray(PIL) is read-only (it wraps Pillow's byte string); np.array
    # makes the one writable copy torch.from_numpy wants, then torch works on it in place.
    array = np.array(hd_image, dtype=np.uint8)
    x = torch.from_numpy(array).permute(2, 0, 1).to(torch.float32).div_(255)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return x.sub_(mean_t).div_(std_t)


def _fill_crops(x: torch.Tensor, out: torch.Tensor) -> None:
    """Write into zeroed out (num_crops+1, 3, 336, 336): bicubic global view, row-major sub-crops.

    x is the normalised, padded HD tensor (3, H_hd, W_hd); crops past 1 + rows*cols stay zero.
    """
    _, height, width = x.shape
    rows, cols = height // CROP_SIZE, width // CROP_SIZE
    out[0] = torch.nn.functional.interpolate(
        x.unsqueeze(0), size=(CROP_SIZE, CROP_SIZE), mode="bicubic", align_corners=False
    )[0]
    # (3, rows*336, cols*336) -> (rows, cols, 3, 336, 336) -> (rows*cols, 3, 336, 336)
    tiles = x.view(3, rows, CROP_SIZE, cols, CROP_SIZE).permute(1, 3, 0, 2, 4)
    out[1 : 1 + rows * cols] = tiles.reshape(rows * cols, 3, CROP_SIZE, CROP_SIZE)


def preprocess(
    images: Union[Image.Image, Sequence[Image.Image]],
    num_crops: int,
    mean=CLIP_MEAN,
    std=CLIP_STD,
) -> ImageBatch:
    """PIL images (use open_image first for other inputs) -> ImageBatch, as the reference processor."""
    _check_num_crops(num_crops)
    num_crops = int(num_crops)
    if isinstance(images, Image.Image):
        images = [images]
    images = list(images)
    pixel_values = torch.zeros(len(images), num_crops + 1, 3, CROP_SIZE, CROP_SIZE, dtype=torch.float32)
    sizes, tokens = [], []
    for index, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise ImageError(
                f"preprocess expects PIL images; image {index + 1} is a {type(image).__name__} "
                "(open it with phi3v.engine.image.open_image first)"
            )
        hd = hd_transform(image, num_crops)
        _fill_crops(normalized_tensor(hd, mean, std), pixel_values[index])
        sizes.append([hd.height, hd.width])
        tokens.append(num_tokens_for_grid(hd.height // CROP_SIZE, hd.width // CROP_SIZE))
    image_sizes = torch.tensor(sizes, dtype=torch.long).reshape(len(images), 2)
    return ImageBatch(pixel_values=pixel_values, image_sizes=image_sizes, num_img_tokens=tokens)
