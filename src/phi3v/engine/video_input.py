"""The videos of one request: chat parts and `video=` become frame placeholders, frames are decoded
in order only when the preprocessing reaches them.

    videos = RequestVideos(policy, num_crops=4, context=131072)
    messages = videos.expand_messages(messages, FrameSelection(frames=8))   # video parts -> frame parts
    refs = videos.add("clip.mp4", FrameSelection(fps=1))                   # or one video directly
    for image in videos.open_media(sources, policy): ...                    # images and frames in order
    videos.close()

A video part becomes one image part per chosen frame, in clip order, so the chat template writes
`<|image_k|>` tags for them like for images (numbered across the conversation); with time labels
a text part "frame 1 at 00:00\\nframe 2 at 00:04\\n..." comes right after them (docs/video.md).
The parts (OpenAI-style, like vLLM's extension; selection keys optional, next to "type"):

    {"type": "video_url", "video_url": {"url": "clip.mp4" | "data:video/mp4;base64,..."}}
    {"type": "video", "video": "clip.mp4" | Path | bytes, "frames": 8, "fps": 1, "start": 0, "end": 30,
     "time_labels": True}
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Iterator, Sequence

from ..errors import PromptError, VideoError
from .frame_select import FrameSelection
from .image import ImageSourcePolicy, open_images
from .video import VideoReader, open_video
from .video_plan import VideoPlan, plan_video

VIDEO_PART_TYPES = ("video_url", "video")
SELECTION_KEYS = ("frames", "fps", "start", "end", "time_labels")


@dataclass(frozen=True)
class FrameRef:
    """An image source standing for one chosen frame: frame `position` of the request's video `video`."""

    video: int
    position: int


def has_video_parts(messages: Any) -> bool:
    """Does any message hold a video part? (Malformed messages: False; render_chat reports them.)"""
    if not isinstance(messages, (list, tuple)):
        return False
    for msg in messages:
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, (list, tuple)) and any(
                isinstance(p, dict) and p.get("type") in VIDEO_PART_TYPES for p in content):
            return True
    return False


class RequestVideos:
    def __init__(self, policy: ImageSourcePolicy, num_crops: int, context: int):
        self.policy, self.num_crops, self.context = policy, num_crops, context
        self.readers: list[VideoReader] = []
        self.plans: list[VideoPlan] = []

    def add(self, source, selection: FrameSelection | None = None) -> list[FrameRef]:
        """Open and plan one video (headers and timestamps only) -> one FrameRef per chosen frame."""
        reader = open_video(source, self.policy)
        self.readers.append(reader)
        plan = plan_video(reader, selection or FrameSelection(), self.num_crops, self.context)
        self.plans.append(plan)
        k = len(self.plans) - 1
        return [FrameRef(k, j) for j in range(len(plan.frames))]

    def expand_messages(self, messages: Sequence[dict], default: FrameSelection | None = None) -> list[dict]:
        """A copy of the messages with each video part replaced by its frames' image parts (and,
        with time labels, a text part of labels). Other parts and messages are kept as they are."""
        out = []
        for i, msg in enumerate(messages):
            content = msg.get("content") if isinstance(msg, dict) else None
            if not isinstance(content, (list, tuple)):
                out.append(msg)
                continue
            parts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") in VIDEO_PART_TYPES):
                    parts.append(part)
                    continue
                where = f"message {i}, part {j}"
                selection = _part_selection(part, default or FrameSelection(), where)
                refs = self.add(_part_source(part, where), selection)
                parts.extend({"type": "image", "image": ref} for ref in refs)
                if selection.time_labels:
                    parts.append({"type": "text", "text": "\n".join(self.plans[-1].labels())})
            out.append({**msg, "content": parts})
        return out

    def open_media(self, sources: Sequence, policy: ImageSourcePolicy, num_crops: int) -> Iterator:
        """The request's images and frames in source order, decoded one at a time: images through
        image.open_images (every header checked first), each video's frames in clip order."""
        plain = [s for s in sources if not isinstance(s, FrameRef)]
        images = open_images(plain, policy, num_crops) if plain else iter(())
        decoding: dict[int, Iterator] = {}
        for source in sources:
            if isinstance(source, FrameRef):
                frames = decoding.get(source.video)
                if frames is None:
                    plan = self.plans[source.video]
                    frames = decoding[source.video] = self.readers[source.video].frames(plan.indices)
                yield next(frames)
            else:
                yield next(images)

    def planned_tokens(self, sources: Sequence, unknown: int = 1) -> list[int]:
        """Tokens per source as planned: a frame's own count, `unknown` for an image (not probed here)."""
        return [self.plans[s.video].frames[s.position].tokens if isinstance(s, FrameRef) else unknown
                for s in sources]

    def close(self) -> None:
        for reader in self.readers:
            reader.close()


def labelled_prompt(prompt: str, plan: VideoPlan) -> str:
    """The ask() path with time labels: the label lines, then the question."""
    return "\n".join(plan.labels()) + "\n" + prompt


def _part_source(part: dict, where: str):
    if part["type"] == "video":
        if part.get("video") is None:
            raise PromptError(f"{where}: a 'video' part needs a 'video' field")
        return part["video"]
    value = part.get("video_url")
    if isinstance(value, dict):
        value = value.get("url")
    if not isinstance(value, str) or not value:
        raise PromptError(f"{where}: a 'video_url' part needs 'video_url': {{'url': '...'}} or a url string")
    return value


def _part_selection(part: dict, default: FrameSelection, where: str) -> FrameSelection:
    given = {key: part[key] for key in SELECTION_KEYS if key in part}
    if not given:
        return default
    if "frames" in given or "fps" in given:  # a part's own count replaces the call's (not both)
        default = replace(default, frames=None, fps=None)
    try:
        return replace(default, **given)
    except VideoError as err:
        raise VideoError(f"{where}: {err}") from None
