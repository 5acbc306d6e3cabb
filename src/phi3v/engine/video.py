"""Open a video and decode chosen frames one at a time: container files (PyAV), animated GIF/WebP
(Pillow) and folders of frame images.

    reader = open_video("clip.mp4", policy)     # probe: timestamps and size, no frame kept
    reader.info.times, reader.info.duration     # seconds from the first frame (frame_select's input)
    for image in reader.frames([0, 12, 24]):    # ascending indices -> PIL RGB images, as displayed
        ...
    reader.close()                              # also a context manager

Probing a container demuxes its packets (timestamps only, nothing decoded) and decodes the first
frame (its rotation and size). Decoding seeks to the key frame before a target more than
SEEK_AHEAD_S ahead (or behind) and decodes forward to it, so the clip is never held in memory:
one decoded frame at a time. Rotation metadata (the display matrix, or an old `rotate` tag) is
applied, so frames come out as a player shows them. Every failure is a VideoError naming the file.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Iterator

from PIL import Image

from ..errors import VideoError
from .image import ImageSourcePolicy, open_image
from .image_source import check_byte_size, is_data_uri
from .video_source import decode_video_data_uri, frame_files, has_animated_suffix

SEEK_AHEAD_S = 2.0  # a target further ahead than this is reached by seeking, nearer ones by decoding on
ANIMATION_DEFAULT_FRAME_S = 0.1  # a GIF/WebP frame with no (or zero) duration shows for 100 ms, as browsers do
TRUNCATION_SLACK_S = 1.0  # frames may end this much (or two frames) before the header's duration
FOLDER_FRAME_S = 1.0  # a folder of frames has no clock: one frame per second


def require_av():
    """The PyAV module, or a one-line error naming what to install."""
    try:
        import av
    except ImportError:
        raise VideoError("reading video files needs PyAV: pip install 'phi3v[video]'") from None
    return av


@dataclass(frozen=True)
class VideoInfo:
    name: str  # the source as messages name it (a path, "data URI (video/mp4)", "video bytes")
    kind: str  # "video" (PyAV), "animation" (GIF/WebP), "folder"
    times: list  # presentation time of each frame, seconds from the first frame, ascending
    duration: float  # end of the last frame, seconds
    width: int  # display size (rotation applied); a folder: its first frame's
    height: int
    rotation: int = 0  # degrees counter-clockwise applied to the decoded pixels (0, 90, 180, 270)
    codec: str | None = None

    @property
    def frame_count(self) -> int:
        return len(self.times)

    @property
    def average_fps(self) -> float:
        return self.frame_count / self.duration if self.duration > 0 else 0.0


class VideoReader:
    """Base of the three readers: `info`, `frame_size(i)`, `frames(indices)`, `close()`."""

    info: VideoInfo

    def frame_size(self, index: int) -> tuple[int, int]:
        """(width, height) of frame `index` as displayed, without decoding it."""
        return self.info.width, self.info.height

    def frames(self, indices) -> Iterator[Image.Image]:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_indices(self, indices) -> list[int]:
        indices = [int(i) for i in indices]
        if any(i < 0 or i >= self.info.frame_count for i in indices) or indices != sorted(set(indices)):
            raise VideoError(f"{self.info.name}: frame indices must be ascending, distinct and in "
                             f"0..{self.info.frame_count - 1}, got {indices}")
        return indices


def open_video(source, policy: ImageSourcePolicy | None = None) -> VideoReader:
    """A path (file or folder), a data: URI, or the file's bytes -> its reader (probed)."""
    policy = policy or ImageSourcePolicy()
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        check_byte_size(len(data), "video bytes", policy.max_bytes)
        return _reader_for_bytes(data, "video bytes", policy)
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        raise VideoError(f"a video must be a path, a data: URI or bytes, got {type(source).__name__}")
    if is_data_uri(source):
        data = decode_video_data_uri(source, max_bytes=policy.max_bytes)
        return _reader_for_bytes(data, "video data URI", policy)
    if source.lower().startswith(("http://", "https://")):
        raise VideoError(f"{source}: remote videos are not supported; download the file and give its path")
    if not policy.allow_paths:
        raise VideoError("video file paths are not allowed here; send the video as a data: URI")
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        return FolderReader(path, policy)
    if not os.path.isfile(path):
        raise VideoError(f"{source}: no such file or folder")
    if has_animated_suffix(path):
        return AnimationReader(path, path, policy)
    return ContainerReader(path, path, policy)


def _reader_for_bytes(data: bytes, name: str, policy: ImageSourcePolicy) -> VideoReader:
    if data[:6] in (b"GIF87a", b"GIF89a") or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        return AnimationReader(io.BytesIO(data), name, policy)
    return ContainerReader(io.BytesIO(data), name, policy)


def _check_pixels(name: str, width: int, height: int, policy: ImageSourcePolicy) -> None:
    if width * height > policy.max_pixels:
        raise VideoError(f"{name}: frames of {width}x{height} = {width * height} pixels are over the limit "
                         f"of {policy.max_pixels} pixels per frame")


def _rotate(image: Image.Image, degrees: int) -> Image.Image:
    """Turn decoded pixels counter-clockwise by a multiple of 90 degrees (as the display matrix says)."""
    turn = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}
    return image.transpose(turn[degrees]) if degrees in turn else image


# --------------------------------------------------------------------------------------------
# Container files (PyAV)
# --------------------------------------------------------------------------------------------


class ContainerReader(VideoReader):
    def __init__(self, file, name: str, policy: ImageSourcePolicy):
        av = require_av()
        self._av, self._name = av, name
        try:
            self._container = av.open(file)
        except (av.FFmpegError, OSError, ValueError) as err:
            raise VideoError(f"{name}: not a readable video file: truncated, corrupt or not a video "
                             f"({_reason(err)})") from None
        try:
            self._probe(policy)
        except BaseException:
            self.close()
            raise

    def _probe(self, policy: ImageSourcePolicy) -> None:
        av, name = self._av, self._name
        if not self._container.streams.video:
            raise VideoError(f"{name}: the file has no video stream")
        stream = self._stream = self._container.streams.video[0]
        stream.thread_type = "AUTO"
        pts = []
        try:  # packets only (a few bytes of bookkeeping each), nothing decoded
            for packet in self._container.demux(stream):
                stamp = packet.pts if packet.pts is not None else packet.dts
                if stamp is not None and packet.size > 0:
                    pts.append(stamp)
        except (av.FFmpegError, OSError) as err:
            raise VideoError(f"{name}: the file is truncated or corrupt ({_reason(err)})") from None
        if not pts:
            raise VideoError(f"{name}: the video stream holds no frames (the file is truncated or empty)")
        declared = stream.frames or 0
        if declared > len(pts):
            raise VideoError(f"{name}: the file is truncated: its header lists {declared} frames, "
                             f"the file holds {len(pts)}")
        self._pts = sorted(set(pts))
        tb = stream.time_base
        first = self._pts[0]
        times = [float((p - first) * tb) for p in self._pts]
        rate = stream.average_rate
        step = float(1 / rate) if rate else (times[-1] - times[-2] if len(times) > 1 else 0.04)
        self._decoder = None
        self._last_pts = None
        declared_s = _declared_seconds(self._container, stream)
        if declared_s is not None and times[-1] + step < declared_s - max(TRUNCATION_SLACK_S, 2 * step):
            raise VideoError(f"{name}: the file is truncated: its header says {declared_s:.3f} s, "
                             f"its frames end at {times[-1] + step:.3f} s")
        frame = self._decode_at(0)  # the first frame: its rotation and size
        rotation = _frame_rotation(frame, stream)
        width, height = (frame.height, frame.width) if rotation in (90, 270) else (frame.width, frame.height)
        _check_pixels(name, width, height, policy)
        self._rotation = rotation
        self.info = VideoInfo(name, "video", times, times[-1] + step, width, height, rotation,
                              stream.codec_context.name)

    def frames(self, indices) -> Iterator[Image.Image]:
        for i in self._check_indices(indices):
            frame = self._decode_at(i)
            image = _rotate(frame.to_image(), self._rotation)
            del frame
            yield image

    def _decode_at(self, index: int):
        """The decoded frame whose timestamp is the index-th (seek when far ahead or behind)."""
        target = self._pts[index]
        tb = self._stream.time_base
        ahead = None if self._last_pts is None else float((target - self._last_pts) * tb)
        if self._decoder is None or ahead is None or ahead <= 0 or ahead > SEEK_AHEAD_S:
            self._seek(target)
        av = self._av
        try:
            for frame in self._decoder:
                stamp = frame.pts if frame.pts is not None else frame.dts
                if stamp is None:
                    continue
                self._last_pts = stamp
                if stamp >= target:
                    return frame
        except (av.FFmpegError, OSError) as err:
            raise VideoError(f"{self._name}: frame {index} at {self._time(target):.3f} s could not be decoded; "
                             f"the file is truncated or corrupt ({_reason(err)})") from None
        raise VideoError(f"{self._name}: frame {index} at {self._time(target):.3f} s could not be decoded; "
                         "the file is truncated or corrupt")

    def _seek(self, target: int) -> None:
        try:
            self._container.seek(target, stream=self._stream, backward=True, any_frame=False)
        except (self._av.FFmpegError, OSError) as err:
            raise VideoError(f"{self._name}: cannot seek to {self._time(target):.3f} s ({_reason(err)})") from None
        self._decoder = self._container.decode(self._stream)
        self._last_pts = None

    def _time(self, stamp: int) -> float:
        return float((stamp - self._pts[0]) * self._stream.time_base)

    def close(self) -> None:
        container = getattr(self, "_container", None)
        if container is not None:
            self._decoder = None
            container.close()
            self._container = None


def _declared_seconds(container, stream) -> float | None:
    """The video stream's duration as its header states it (MP4: the track; MKV/WebM: its
    DURATION tag; else the file's when it has only this stream), or None."""
    if stream.duration:
        return float(stream.duration * stream.time_base)
    tag = (stream.metadata or {}).get("DURATION")
    if tag:
        try:
            h, m, sec = tag.split(":")
            return int(h) * 3600 + int(m) * 60 + float(sec)
        except ValueError:
            pass
    if container.duration and len(container.streams) == 1:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None


def _frame_rotation(frame, stream) -> int:
    """Counter-clockwise degrees to turn decoded pixels by (0/90/180/270): the display matrix
    (VideoFrame.rotation), else an old-style `rotate` stream tag (clockwise degrees; MKV keeps it
    as a ROTATE tag)."""
    degrees = int(round(getattr(frame, "rotation", 0) or 0))
    if degrees == 0:
        tag = next((v for k, v in (stream.metadata or {}).items() if k.lower() == "rotate"), None)
        try:
            degrees = -int(float(tag)) if tag else 0
        except ValueError:
            degrees = 0
    return degrees % 360 if degrees % 90 == 0 else 0


def _reason(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:200]


# --------------------------------------------------------------------------------------------
# Animated GIF / WebP (Pillow)
# --------------------------------------------------------------------------------------------


class AnimationReader(VideoReader):
    def __init__(self, file, name: str, policy: ImageSourcePolicy):
        self._name = name
        try:
            self._image = Image.open(file)
            _check_pixels(name, self._image.width, self._image.height, policy)
            times, t = [], 0.0
            for i in range(getattr(self._image, "n_frames", 1)):  # durations: seek decodes, one frame kept
                self._image.seek(i)
                times.append(t)
                ms = self._image.info.get("duration") or 0
                t += ms / 1000 if ms > 0 else ANIMATION_DEFAULT_FRAME_S
        except VideoError:
            raise
        except (OSError, ValueError, SyntaxError, EOFError) as err:
            raise VideoError(f"{name}: not a readable animation ({_reason(err)})") from None
        self.info = VideoInfo(name, "animation", times, t, self._image.width, self._image.height,
                              codec=(self._image.format or "").lower() or None)

    def frames(self, indices) -> Iterator[Image.Image]:
        for i in self._check_indices(indices):
            try:
                self._image.seek(i)
                frame = self._image.convert("RGB")
            except (OSError, ValueError, EOFError) as err:
                raise VideoError(f"{self._name}: frame {i} could not be decoded ({_reason(err)})") from None
            yield frame

    def close(self) -> None:
        self._image.close()


# --------------------------------------------------------------------------------------------
# A folder of frame images
# --------------------------------------------------------------------------------------------


class FolderReader(VideoReader):
    def __init__(self, folder: str, policy: ImageSourcePolicy):
        self._files, self._policy = frame_files(folder), policy
        if not self._files:
            raise VideoError(f"{folder}: the folder holds no frame images (png, jpg, webp, ...)")
        self._sizes: dict[int, tuple[int, int]] = {}
        width, height = self.frame_size(0)
        n = len(self._files)
        self.info = VideoInfo(folder, "folder", [i * FOLDER_FRAME_S for i in range(n)], n * FOLDER_FRAME_S,
                              width, height)

    def frame_size(self, index: int) -> tuple[int, int]:
        """From the file's header (EXIF orientation applied), not its pixels."""
        if index not in self._sizes:
            path = self._files[index]
            try:
                with Image.open(path) as im:
                    w, h = im.size
                    if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # a quarter turn swaps the sides
                        w, h = h, w
            except (OSError, ValueError, SyntaxError) as err:
                raise VideoError(f"{path}: not a readable frame image ({_reason(err)})") from None
            _check_pixels(path, w, h, self._policy)
            self._sizes[index] = (w, h)
        return self._sizes[index]

    def frames(self, indices) -> Iterator[Image.Image]:
        for i in self._check_indices(indices):
            yield open_image(self._files[i], self._policy)

    @property
    def files(self) -> list[str]:
        return list(self._files)
