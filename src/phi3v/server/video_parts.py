"""Video parts of chat requests: vLLM's `video_url` part -> a phi3v video part, its bytes, its report.

    {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,..."},
     "frames": 8, "fps": 1, "start": 0, "end": 30, "time_labels": true}     # selection keys optional

The steps, in the order the service runs them (docs/server.md, "Video"):

1. on the event loop (`video_part`): the URL's scheme is checked (data: always, http(s) only with
   --allow-remote-images, nothing else: local paths never) and the frame selection is checked
   (engine.frame_select.FrameSelection), so a bad part is a 400 before any work. Frames count as
   images: a part's `frames` counts against --max-images at once; a part with neither `frames`
   nor `fps` gets the room --max-images leaves (`fill_default_frames`: at most 16 per video, and
   no more than fill half the context at the costliest frame shape, the engine's default rule
   without the clip's size); an `fps` part is counted once its clip is planned (prepare's max_images).
2. in a preparation thread (`video_bytes`): the data: URI's base64 is decoded, or the remote video
   fetched (engine/remote_image.py: public addresses only, one total deadline), both capped at
   --max-video-mb.
3. the model's prepare() probes the clip, plans and decodes the chosen frames one at a time
   (engine/video_input.py); a bad or truncated video is a VideoError -> 400.
4. the response names the frames used (`videos_report`): `phi3v.videos` in the body and the
   `X-Phi3V-Video-Frames` header of a stream (the web page draws its thumbnails from it).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.frame_select import FrameSelection, default_frame_count
from ..engine.image import num_image_tokens
from ..engine.remote_image import fetch_image_bytes
from ..engine.video_source import decode_video_data_uri
from ..errors import ImageError, VideoError
from .api_errors import APIError

SELECTION_FIELDS = ("frames", "fps", "start", "end", "time_labels")
FRAMES_HEADER = "X-Phi3V-Video-Frames"


@dataclass(frozen=True)
class VideoURLSource:
    """A video part's URL before its bytes are read (off the event loop, `video_bytes`)."""

    url: str
    param: str  # where it was in the request, for the 400
    remote: bool


def video_part(part, param: str, allow_remote: bool) -> dict:
    """A checked schemas.VideoURLPart -> the engine's part {"type": "video", "video": VideoURLSource, ...keys}."""
    url = part.video_url.url
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("http", "https"):
        if not allow_remote:
            raise APIError(400, f"{param}: remote video URLs are disabled on this server; send the video as a "
                                f"data: URI (data:video/mp4;base64,...) or start the server with "
                                f"--allow-remote-images.", param=param, code="invalid_video")
    elif scheme != "data":
        raise APIError(400, f"{param}: video_url.url must be a data: URI (data:video/mp4;base64,...)"
                            f"{' or an http(s) URL' if allow_remote else ''}; got a URL starting with "
                            f"{url[:16]!r}. Local files cannot be named.", param=param, code="invalid_video")
    keys = {k: getattr(part, k) for k in SELECTION_FIELDS if getattr(part, k) is not None}
    if keys.get("time_labels") is False:
        del keys["time_labels"]
    try:
        FrameSelection(**keys)  # frames and fps together, end before start: refused now
    except VideoError as err:
        raise APIError(400, f"{param}: {err}", param=param, code="invalid_video") from None
    return {"type": "video", "video": VideoURLSource(url, param, scheme != "data"), **keys}


def costliest_frame_tokens(num_crops: int) -> int:
    """The most image tokens one frame can cost at num_crops (its size unknown): the largest over
    the HD grids of at most num_crops crops (4: 781 tokens, a 4x1 grid; a 16:9 frame costs 757)."""
    return max(num_image_tokens(336 * cols, 336 * rows, num_crops)
               for rows in range(1, num_crops + 1) for cols in range(1, num_crops // rows + 1))


def fill_default_frames(parts: list[dict], frames_counted: int, max_images: int, num_crops: int,
                        context: int | None) -> None:
    """Give each video part without `frames` or `fps` its share of the images left under
    max_images, at most the engine's default count (16, or what fills half the context at the
    costliest frame); 400 when not even one frame each is left."""
    if not parts:
        return
    room = max_images - frames_counted
    if room < len(parts):
        raise APIError(400, f"Too many images: this server accepts at most {max_images} images per request "
                            f"(over all messages; a video's frames count as images), and the images and frames "
                            f"asked for leave no room for the frames of {len(parts)} video(s). Ask for fewer "
                            f"frames.", param="messages", code="too_many_images")
    share = room // len(parts)
    if context:
        share = min(share, default_frame_count(costliest_frame_tokens(num_crops), context))
    else:
        share = min(share, default_frame_count(1, 2**62))  # 16
    for part in parts:
        part["frames"] = share


def video_bytes(source: VideoURLSource, *, max_bytes: int, timeout_s: float, allow_private: bool) -> bytes:
    """The video file's bytes (a data: URI decoded, or a remote video fetched), at most max_bytes; else 400."""
    try:
        if source.remote:
            return fetch_image_bytes(source.url, timeout_s=timeout_s, max_bytes=max_bytes,
                                     allow_private=allow_private, kind="video")
        return decode_video_data_uri(source.url, max_bytes=max_bytes)
    except ImageError as err:  # VideoError is one
        too_large = "larger than the limit" in str(err)
        hint = " (the server's --max-video-mb)" if too_large else ""
        raise APIError(400, f"{source.param}: {err}{hint}", param=source.param,
                       code="video_too_large" if too_large else "invalid_video") from None


def videos_report(prepared) -> list[dict] | None:
    """What the response says about each video of the request (None without videos): the plan
    (engine/video_plan.py VideoPlan.to_dict) without the source's name."""
    plans = getattr(prepared, "video_plans", ())
    if not plans:
        return None
    out = []
    for plan in plans:
        d = plan.to_dict()
        d.pop("source", None)
        out.append(d)
    return out


def frames_header(report: list[dict] | None) -> dict:
    """{FRAMES_HEADER: "0.5,1.5,2.5;0,2"}: the frame times in seconds, videos separated by ';' ({} without)."""
    if not report:
        return {}
    def seconds(t: float) -> str:
        return f"{t:.6f}".rstrip("0").rstrip(".")

    return {FRAMES_HEADER: ";".join(",".join(seconds(f["time_s"]) for f in v["frames"]) for v in report)}
