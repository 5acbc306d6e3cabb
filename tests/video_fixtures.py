"""Synthetic videos for the video tests: a known solid colour per second, written with PyAV.

    write_video(path, seconds=3, fps=10)                # MP4 (H.264), colour COLOURS[s] during second s
    write_video(path, rotation=90)                      # with a display matrix (PyAV set_display_rotation)
    write_video(path, codec="libvpx-vp9")               # WebM
    write_gif(path, durations_ms=[100, 200, 300])       # animated GIF, frame i in COLOURS[i]
    write_frame_folder(path, count=12)                  # frame1.png .. frame12.png

Each frame is the second's colour with a white bar over its left quarter (so a rotation shows: the
bar moves to another side) — `expected_frame(i, fps)` is frame i as written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]
WIDTH, HEIGHT = 64, 48
# H.264 / VP9 in yuv420p at these flat colours: every channel of every pixel away from the bar's
# edge within this many levels of what was written (measured error is a few levels; chroma is
# subsampled, so the two columns at the bar's edge are left out of comparisons).
CODEC_TOLERANCE = 12


def colour_at(second: int) -> tuple[int, int, int]:
    return COLOURS[second % len(COLOURS)]


def expected_frame(index: int, fps: int, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """Frame `index` as written: (height, width, 3) uint8."""
    a = np.empty((height, width, 3), np.uint8)
    a[:] = colour_at(index // fps)
    a[:, : width // 4] = 255
    return a


def write_video(path, seconds: int = 3, fps: int = 10, rotation: int | None = None, codec: str = "libx264",
                width: int = WIDTH, height: int = HEIGHT, rotate_tag: str | None = None) -> Path:
    """rotation: a display matrix (counter-clockwise degrees); rotate_tag: an old-style `rotate`
    stream tag (clockwise degrees; the MKV muxer keeps it, the MP4 muxer drops it)."""
    import av

    path = Path(path)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if rotation is not None:
            stream.set_display_rotation(rotation)
        if rotate_tag is not None:
            stream.metadata["rotate"] = rotate_tag
        for i in range(seconds * fps):
            frame = av.VideoFrame.from_ndarray(expected_frame(i, fps, width, height), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_gif(path, durations_ms: list[int], size: tuple[int, int] = (WIDTH, HEIGHT)) -> Path:
    frames = [Image.new("RGB", size, colour_at(i)) for i in range(len(durations_ms))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations_ms, loop=0, disposal=1)
    return Path(path)


def write_frame_folder(path, count: int, size: tuple[int, int] = (WIDTH, HEIGHT)) -> Path:
    """frame1.png .. frame{count}.png, frame k in colour_at(k - 1); plus a non-image file."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for k in range(1, count + 1):
        Image.new("RGB", size, colour_at(k - 1)).save(path / f"frame{k}.png")
    (path / "notes.txt").write_text("not a frame")
    return path


def away_from_bar(a: np.ndarray, width: int = WIDTH) -> np.ndarray:
    """The columns clear of the bar's edge (chroma subsampling blurs two columns there)."""
    q = width // 4
    return np.concatenate([a[:, : q - 2], a[:, q + 2:]], axis=1)
