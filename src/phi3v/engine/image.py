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
from dataclasses import dataclass
from typing import Sequence, Union

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
from ..errors import ImageError, Phi3VError

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
    base64 payload or download). max_pixels: width*height limit, checked from the header before
    decoding (decompression bombs); the default equals Pillow's `Image.MAX_IMAGE_PIXELS`.
    """

    allow_paths: bool = True
    allow_remote: bool = False
    allow_private: bool = False
    timeout_s: float = 10.0
    max_bytes: int = 50 * 2**20
    max_pixels: int = 178_956_970

    def __post_init__(self):
        for name in ("timeout_s", "max_bytes", "max_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise Phi3VError(f"ImageSourcePolicy.{name} must be a positive number, got {value!r}")


_DEFAULT_POLICY = ImageSourcePolicy()
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def open_image(source: ImageInput, policy: ImageSourcePolicy = _DEFAULT_POLICY) -> Image.Image:
    """Open one image input and return a fully decoded PIL image.

    Accepted: a path (str or os.PathLike), bytes, a base64 string, a `data:image/...;base64,` URI,
    an http(s) URL (only with policy.allow_remote), a PIL image (returned as given), a numpy uint8
    array (H, W), (H, W, 3) or (H, W, 4). Encoded inputs get EXIF orientation applied and animated
    images give their first frame. Everything that goes wrong raises ImageError naming the input.
    """
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


def _open_string(text: str, policy: ImageSourcePolicy) -> Image.Image:
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


def _open_path(path: str, policy: ImageSourcePolicy) -> Image.Image:
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


def _open_data_uri(uri: str, policy: ImageSourcePolicy) -> Image.Image:
    """The rules live in image_source.decode_data_uri (shared with the server)."""
    return _decode(decode_data_uri(uri, max_bytes=policy.max_bytes), "data URI image", policy)


def _open_base64(text: str, name: str, policy: ImageSourcePolicy) -> Image.Image:
    return _decode(decode_base64(text, name, max_bytes=policy.max_bytes), name, policy)


def _open_url(url: str, policy: ImageSourcePolicy) -> Image.Image:
    """Download (engine/remote_image.py: public addresses only unless policy.allow_private, one
    total deadline, the size cap)."""
    data = fetch_image_bytes(url, timeout_s=policy.timeout_s, max_bytes=policy.max_bytes,
                             allow_private=policy.allow_private)
    return _decode(data, _short(url), policy)


def _check_byte_size(size: int, name: str, policy: ImageSourcePolicy) -> None:
    check_byte_size(size, name, policy.max_bytes)


def _decode(data: bytes, name: str, policy: ImageSourcePolicy) -> Image.Image:
    """Decode encoded image bytes fully; header-size bomb check first; EXIF orientation; frame 0."""
    try:
        image = Image.open(io.BytesIO(data))  # lazy: reads only the header
    except UnidentifiedImageError:
        raise ImageError(f"{name} is not an image in a supported format") from None
    except Image.DecompressionBombError as err:
        raise ImageError(f"{name} is too large to decode safely (decompression bomb?): {err}") from None
    except Exception as err:  # malformed headers surface as many exception types
        raise ImageError(f"{name} could not be read as an image: {err}") from None
    width, height = image.size
    if width * height > policy.max_pixels:
        raise ImageError(
            f"{name} is {width}x{height} = {width * height} pixels, more than the limit of "
            f"{policy.max_pixels} (decompression bomb protection)"
        )
    if width < 1 or height < 1:
        raise ImageError(f"{name} has an empty size {width}x{height}")
    try:
        image.seek(0)  # animated GIF/PNG/WebP, multi-page TIFF: first frame
        image.load()  # full decode here, so truncated/corrupt data fails now, not later
    except Exception as err:
        raise ImageError(f"{name} is truncated or corrupt ({image.format or 'unknown'} data): {err}") from None
    try:
        # Returns a detached copy (rotated when the EXIF Orientation tag asks for it).
        return ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block should not lose an otherwise fine picture
        return image.copy()


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
