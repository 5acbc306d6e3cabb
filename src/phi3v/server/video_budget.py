"""The memory a video takes while its request is prepared, estimated from its header (prepare_budget.py).

Preparing a video (engine/video.py, video_input.py) holds, at its peak:

- the file's bytes (the request already holds them: a data: URI decoded, or a remote video fetched);
- the decoder's frames: FFmpeg keeps the reference frames of the codec (H.264 up to 16) plus the
  frames being decoded by its threads, in YUV 4:2:0 (1.5 bytes per pixel): DECODER_FRAMES of them;
- one decoded frame turned into an RGB image, rotated and HD-transformed, as an image is
  (prepare_budget.BYTES_PER_PIXEL per pixel): frames are decoded one at a time;
- the pixel_values of every chosen frame, kept until the request is prepared:
  (num_crops + 1) crops x 3 x 336 x 336 float32 each (6.8 MB per frame at num_crops 4).

The frame size comes from the container's header (PyAV opens it; no frame is decoded) or the
animation's (Pillow); an unreadable header counts as nothing here, as the request is refused
when prepare() reads it. The frame count is the part's `frames`, else `max_frames` (--max-images:
frames count as images, so no request holds more).
"""

from __future__ import annotations

import io

DECODER_FRAMES = 18  # 16 reference frames (H.264's most) + 2 in flight
YUV420_BYTES_PER_PIXEL = 1.5
CROP_BYTES = 3 * 336 * 336 * 4  # one crop of pixel_values (float32)


def displayed_pixels(data: bytes) -> int:
    """Width x height of the video's frames from its header (0 when the header cannot be read)."""
    if data[:6] in (b"GIF87a", b"GIF89a") or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        try:
            from PIL import Image

            with Image.open(io.BytesIO(data)) as im:
                return im.width * im.height
        except Exception:  # noqa: BLE001 - refused with its reason by prepare()
            return 0
    try:
        import av
    except ImportError:
        return 0  # prepare() says what to install
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                return 0
            ctx = container.streams.video[0].codec_context
            return int(ctx.width or 0) * int(ctx.height or 0)
    except Exception:  # noqa: BLE001 - any unreadable header: refused with its reason by prepare()
        return 0


def video_prepare_bytes(data: bytes, frames: int, num_crops: int, max_pixels: int,
                        bytes_per_pixel: int) -> int:
    """Estimated peak bytes of preparing this video with `frames` chosen frames (see the module doc)."""
    pixels = min(displayed_pixels(data), max_pixels)
    decode = pixels * (DECODER_FRAMES * YUV420_BYTES_PER_PIXEL + bytes_per_pixel)
    kept = frames * (num_crops + 1) * CROP_BYTES
    return int(len(data) + decode + kept)
