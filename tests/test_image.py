"""phi3v.engine.image: every input kind, source policy refusals, bad files, modes, token arithmetic.

The exact pixel parity with the reference is in test_image_golden.py; here small synthetic images.
"""

from __future__ import annotations

import base64
import http.server
import io
import struct
import threading
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from phi3v.errors import ImageError, Phi3VError
from phi3v.engine.image import (
    CLIP_MEAN,
    CLIP_STD,
    ImageSourcePolicy,
    crop_grid,
    hd_transform,
    num_image_tokens,
    open_image,
    preprocess,
    to_rgb,
)


def _rgb_array(width, height):
    """Spec 10.1 synthetic pattern: R=(3x+5y)%256, G=(7x+2y+64)%256, B=(x*y+128)%256."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(3 * x + 5 * y) % 256, (7 * x + 2 * y + 64) % 256, (x * y + 128) % 256], -1).astype(np.uint8)


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def small_rgb():
    return Image.fromarray(_rgb_array(24, 16))


@pytest.fixture
def png_file(tmp_path, small_rgb):
    path = tmp_path / "small.png"
    small_rgb.save(path)
    return path


# ------------------------------------------------------------------------------ input kinds


def test_open_path_str_and_pathlib(png_file, small_rgb):
    for source in (str(png_file), png_file):
        image = open_image(source)
        assert image.size == (24, 16)
        assert np.array_equal(np.asarray(image), np.asarray(small_rgb))


def test_open_bytes_base64_and_data_uri(small_rgb):
    data = _png_bytes(small_rgb)
    b64 = base64.b64encode(data).decode()
    sources = [data, bytearray(data), b64, "\n".join(b64[i : i + 60] for i in range(0, len(b64), 60)),
               f"data:image/png;base64,{b64}", base64.urlsafe_b64encode(data).decode()]
    for source in sources:
        image = open_image(source)
        assert np.array_equal(np.asarray(image), np.asarray(small_rgb)), type(source)


def test_pil_input_is_returned_as_given(small_rgb):
    assert open_image(small_rgb) is small_rgb


@pytest.mark.parametrize(
    "shape, mode", [((5, 7), "L"), ((5, 7, 1), "L"), ((5, 7, 3), "RGB"), ((5, 7, 4), "RGBA")]
)
def test_numpy_arrays(shape, mode):
    array = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    image = open_image(array)
    assert image.mode == mode and image.size == (7, 5)
    assert np.array_equal(np.asarray(image), array.reshape(np.asarray(image).shape))


@pytest.mark.parametrize("array", [np.zeros((4, 4), np.float32), np.zeros((4, 4, 2), np.uint8), np.zeros((0, 4), np.uint8)])
def test_numpy_arrays_rejected(array):
    with pytest.raises(ImageError, match="numpy image array"):
        open_image(array)


def test_unsupported_input_type():
    with pytest.raises(ImageError, match="unsupported image input of type int"):
        open_image(42)


# ------------------------------------------------------------------------------ EXIF and frames


def test_exif_orientation_applied_to_files_not_to_pil_inputs(tmp_path):
    # 40x20 landscape: left half red, right half blue; Orientation 6 = "rotate 90 clockwise to view".
    array = np.zeros((20, 40, 3), np.uint8)
    array[:, :20] = (255, 0, 0)
    array[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(array).save(path, format="JPEG", quality=95, exif=exif.tobytes())

    image = open_image(path)
    assert image.size == (20, 40)  # portrait after rotation
    pixels = np.asarray(image).astype(int)
    assert pixels[5, 10, 0] > 200 and pixels[5, 10, 2] < 60  # top: the former left half (red)
    assert pixels[35, 10, 2] > 200 and pixels[35, 10, 0] < 60  # bottom: the former right half (blue)
    assert image.getexif().get(0x0112, 1) == 1
    assert open_image(path.read_bytes()).size == (20, 40)

    raw = Image.open(path)  # a caller's PIL image is used exactly as given
    assert open_image(raw).size == (40, 20)


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (8, 6), colour) for colour in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    image = open_image(buf.getvalue())
    assert image.size == (8, 6)
    assert tuple(image.convert("RGB").getpixel((3, 3))) == (255, 0, 0)


# ------------------------------------------------------------------------------ bad files


def _png_header_only(width, height):
    """A valid PNG signature + IHDR claiming width x height, a tiny IDAT, IEND: ~70 bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("width, height", [(20000, 10000), (60000, 60000)])
def test_decompression_bomb_rejected_from_header(width, height):
    data = _png_header_only(width, height)
    assert len(data) < 200
    with pytest.raises(ImageError, match="decompression bomb"):
        open_image(data)


def test_max_pixels_policy(small_rgb):
    with pytest.raises(ImageError, match=r"24x16 = 384 pixels, more than the limit of 100"):
        open_image(_png_bytes(small_rgb), ImageSourcePolicy(max_pixels=100))


def test_truncated_file_names_the_file(tmp_path, small_rgb):
    path = tmp_path / "cut.png"
    path.write_bytes(_png_bytes(small_rgb)[:-60])
    with pytest.raises(ImageError, match=r"cut\.png is truncated or corrupt"):
        open_image(path)


def test_non_image_bytes(tmp_path):
    with pytest.raises(ImageError, match="not an image in a supported format"):
        open_image(b"this is plain text, not an image at all")
    path = tmp_path / "notes.png"
    path.write_text("hello")
    with pytest.raises(ImageError, match=r"notes\.png is not an image"):
        open_image(path)


def test_missing_file_directory_and_garbage_strings(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        open_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="is a directory"):
        open_image(str(tmp_path))
    with pytest.raises(ImageError, match=r"'no-such-picture\.jpg' is not an existing file"):
        open_image("no-such-picture.jpg")
    with pytest.raises(ImageError, match="not valid base64|not an image"):
        open_image("data:image/png;base64,@@@@")
    with pytest.raises(ImageError, match="expected image/"):
        open_image("data:text/plain;base64,aGVsbG8=")
    with pytest.raises(ImageError, match="must be base64"):
        open_image("data:image/png,rawdata")


def test_byte_limit(png_file, small_rgb):
    policy = ImageSourcePolicy(max_bytes=50)
    data = _png_bytes(small_rgb)
    for source in (data, png_file, base64.b64encode(data).decode()):
        with pytest.raises(ImageError, match="larger than the limit of 50 bytes"):
            open_image(source, policy)


# ------------------------------------------------------------------------------ policy


def test_paths_refused_when_not_allowed(png_file, small_rgb):
    policy = ImageSourcePolicy(allow_paths=False)
    for source in (str(png_file), png_file, "images/cat.png", "cat.jpg"):
        with pytest.raises(ImageError, match="local file paths are not allowed"):
            open_image(source, policy)
    # base64 and data URIs still work
    b64 = base64.b64encode(_png_bytes(small_rgb)).decode()
    assert open_image(b64, policy).size == (24, 16)
    assert open_image("data:image/png;base64," + b64, policy).size == (24, 16)


def test_remote_refused_by_default_and_file_urls_never():
    with pytest.raises(ImageError, match="remote image URLs are not allowed"):
        open_image("https://example.com/cat.png")
    for policy in (ImageSourcePolicy(), ImageSourcePolicy(allow_remote=True)):
        with pytest.raises(ImageError, match="file:// URLs are never accepted"):
            open_image("file:///etc/hosts", policy)
    with pytest.raises(ImageError, match="unsupported URL scheme"):
        open_image("ftp://example.com/cat.png", ImageSourcePolicy(allow_remote=True))


@pytest.fixture
def local_http_server(small_rgb):
    """A loopback HTTP server (no external network): /ok.png, /big.png, redirects /hop and /to-ftp."""
    body = _png_bytes(small_rgb)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path in ("/hop", "/to-ftp"):
                self.send_response(302)
                self.send_header("Location", "/ok.png" if self.path == "/hop" else "ftp://127.0.0.1/x.png")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if self.path not in ("/ok.png", "/big.png"):
                self.send_error(404)
                return
            payload = body if self.path == "/ok.png" else body * 50
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()  # no Content-Length: the chunked size cap must stop it
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", len(body)
    server.shutdown()
    server.server_close()


LOCAL_OK = ImageSourcePolicy(allow_remote=True, allow_private=True)  # the test server is on 127.0.0.1


def test_remote_download_when_allowed(local_http_server, small_rgb):
    base, size = local_http_server
    image = open_image(base + "/ok.png", ImageSourcePolicy(allow_remote=True, allow_private=True, timeout_s=5))
    assert np.array_equal(np.asarray(image), np.asarray(small_rgb))
    with pytest.raises(ImageError, match="larger than the limit"):
        open_image(base + "/big.png", ImageSourcePolicy(allow_remote=True, allow_private=True, max_bytes=size * 3))
    with pytest.raises(ImageError, match="HTTP 404"):
        open_image(base + "/nothing.png", LOCAL_OK)
    assert open_image(base + "/hop", LOCAL_OK).size == (24, 16)
    with pytest.raises(ImageError, match="redirects to a non-http"):
        open_image(base + "/to-ftp", LOCAL_OK)


@pytest.mark.parametrize("field", ["timeout_s", "max_bytes", "max_pixels"])
def test_policy_values_validated(field):
    with pytest.raises(Phi3VError, match=field):
        ImageSourcePolicy(**{field: 0})


# ------------------------------------------------------------------------------ modes


def test_mode_conversions():
    la = Image.fromarray(np.stack([np.full((6, 8), 90, np.uint8), np.zeros((6, 8), np.uint8)], -1), mode="LA")
    assert np.all(np.asarray(to_rgb(la)) == 90)  # alpha dropped, no compositing (reference)

    cmyk = Image.new("CMYK", (8, 6), (10, 20, 30, 40))
    assert np.array_equal(np.asarray(to_rgb(cmyk)), np.asarray(cmyk.convert("RGB")))

    bilevel = Image.fromarray(np.array([[0, 255], [255, 0]], np.uint8)).convert("1")
    assert to_rgb(bilevel).getpixel((0, 0)) == (0, 0, 0) and to_rgb(bilevel).getpixel((1, 0)) == (255, 255, 255)

    # 16-bit and float images: Pillow's convert("RGB") as in the reference (values clipped to 0..255).
    for array in (np.array([[0, 100, 255, 256, 65535]], np.uint16), np.array([[0, 100, 255, 256, -5]], np.int32),
                  np.array([[0.0, 0.5, 100.7, 255.0, 300.0]], np.float32)):
        image = Image.fromarray(array)
        assert np.array_equal(np.asarray(to_rgb(image)), np.asarray(image.convert("RGB")))
    assert Image.fromarray(np.array([[1]], np.uint16)).mode.startswith("I;16")


@pytest.mark.parametrize("mode", ["LA", "CMYK", "I;16", "1", "P", "RGBA", "L"])
def test_preprocess_any_mode(mode):
    image = Image.fromarray(_rgb_array(40, 30)).convert("L" if mode in ("I;16", "1") else "RGB")
    image = image.convert(mode) if mode != "I;16" else Image.fromarray(np.asarray(image).astype(np.uint16) * 257)
    batch = preprocess(image, 4)
    assert batch.pixel_values.shape == (1, 5, 3, 336, 336)
    assert batch.image_sizes.tolist() == [[672, 672]]
    assert hd_transform(image, 4).mode == "RGB"
    assert torch.isfinite(batch.pixel_values).all()


# ------------------------------------------------------------------------------ token arithmetic

# Spec 3.1 worked examples: (W, H, num_crops, image_sizes [H, W], tokens).
SPEC_TABLE = [
    (100, 50, 16, [1008, 1680], 2353), (50, 100, 16, [1680, 1008], 2377),
    (336, 336, 16, [1344, 1344], 2509), (1024, 768, 16, [1008, 1344], 1921),
    (768, 1024, 16, [1344, 1008], 1933), (2000, 200, 16, [336, 3360], 1609),
    (200, 2000, 16, [3360, 336], 1717), (1920, 1080, 16, [1008, 1680], 2353),
    (100, 50, 4, [336, 672], 457), (50, 100, 4, [672, 336], 469),
    (336, 336, 4, [672, 672], 757), (1024, 768, 4, [672, 672], 757),
    (768, 1024, 4, [672, 672], 757), (2000, 200, 4, [336, 1344], 745),
    (200, 2000, 4, [1344, 336], 781), (1920, 1080, 4, [672, 672], 757),
]


@pytest.mark.parametrize("width, height, num_crops, sizes, tokens", SPEC_TABLE)
def test_spec_worked_examples(width, height, num_crops, sizes, tokens):
    assert num_image_tokens(width, height, num_crops) == tokens
    assert crop_grid(width, height, num_crops) == (sizes[0] // 336, sizes[1] // 336)
    hd = hd_transform(Image.new("RGB", (width, height), (10, 20, 30)), num_crops)
    assert [hd.height, hd.width] == sizes


def test_spec_padding_example():
    # 1920x1080 at num_crops=16: resized 1680x945, white top 31 / bottom 32 rows.
    hd = np.asarray(hd_transform(Image.new("RGB", (1920, 1080), (0, 0, 0)), 16))
    assert hd.shape == (1008, 1680, 3)
    assert (hd[:31] == 255).all() and (hd[31:976] == 0).all() and (hd[976:] == 255).all()


# Spec 10.1 synthetic-image parity values: (W, H, n, sum of global crop, sum of all, g[:,168,168]).
SPEC_PIXELS = [
    (100, 50, 16, 178055.5954, 2848727.6579, [-1.5586877, 1.3244953, -0.4990352]),
    (1024, 768, 4, 219571.8238, 1097859.1045, [0.1931236, -0.6490261, -0.4131316]),
    (768, 1024, 16, 60452.8602, 795601.2816, [0.1785251, 1.2194411, -0.9642980]),
]


@pytest.mark.parametrize("width, height, n, global_sum, total_sum, centre", SPEC_PIXELS)
def test_spec_pixel_values(width, height, n, global_sum, total_sum, centre):
    batch = preprocess([Image.fromarray(_rgb_array(width, height))], n)
    pv = batch.pixel_values.double()
    assert pv[0, 0].sum().item() == pytest.approx(global_sum, rel=1e-6)
    assert pv.sum().item() == pytest.approx(total_sum, rel=1e-6)
    assert np.allclose(pv[0, 0, :, 168, 168].numpy(), centre, atol=1e-6)


def test_tokens_match_preprocess_for_many_sizes():
    rng = np.random.default_rng(7)
    sizes = [(1, 1), (1, 300), (300, 1), (337, 335)] + [tuple(rng.integers(1, 900, 2)) for _ in range(12)]
    for width, height in sizes:
        for n in (1, 4, 9, 16):
            batch = preprocess(Image.new("L", (int(width), int(height)), 7), n)
            rows, cols = (batch.image_sizes[0] // 336).tolist()
            assert crop_grid(width, height, n) == (rows, cols)
            assert batch.num_img_tokens == [num_image_tokens(width, height, n)]
            assert rows * cols <= n
            assert torch.count_nonzero(batch.pixel_values[0, 1 + rows * cols :]) == 0


def test_white_padding_value_and_batch_stacking():
    images = [Image.new("RGB", (64, 48), (0, 0, 0)), Image.new("RGB", (30, 90), (255, 255, 255))]
    batch = preprocess(images, 4)
    assert batch.pixel_values.shape == (2, 5, 3, 336, 336) and len(batch) == 2
    assert batch.image_sizes.tolist() == [[672, 672], [1008, 336]]
    white = (torch.tensor(1.0) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(batch.pixel_values[0, 1, :, 0, 0], white)  # top padding row of crop 1
    assert torch.allclose(batch.pixel_values[1, 2, :, 100, 100], white)


# ------------------------------------------------------------------------------ invalid parameters


@pytest.mark.parametrize("num_crops", [0, -1, 2.5, True])
def test_bad_num_crops(num_crops):
    with pytest.raises(ImageError, match="num_crops"):
        preprocess([Image.new("RGB", (10, 10))], num_crops)
    with pytest.raises(ImageError, match="num_crops"):
        num_image_tokens(10, 10, num_crops)


def test_extreme_aspect_ratio():
    image = Image.new("RGB", (1400, 1))  # ratio 1400 > 336 * 1 for num_crops=1
    for call in (lambda: preprocess([image], 1), lambda: hd_transform(image, 1), lambda: num_image_tokens(1400, 1, 1)):
        with pytest.raises(ImageError, match=r"aspect ratio of 1400:1, too extreme for num_crops=1"):
            call()
    assert num_image_tokens(1400, 1, 16) > 0  # fine with more crops
    with pytest.raises(ImageError, match="too extreme"):
        crop_grid(1, 6000, 16)


def test_preprocess_rejects_unopened_inputs():
    with pytest.raises(ImageError, match="open_image"):
        preprocess(["cat.png"], 4)
