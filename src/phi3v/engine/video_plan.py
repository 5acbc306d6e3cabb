"""A video's plan: which frames, their times and token costs, decided before any frame is decoded.

    plan = plan_video(reader, FrameSelection(frames=16), num_crops=4, context=131072)
    plan.frames            (PlannedFrame(index, time, width, height, tokens), ...) in clip order
    plan.image_tokens      the placeholder tokens of every frame together
    check_video_fits(plans, prompt_tokens, context)   PromptTooLongError with the numbers

Token counts come from engine.image.num_image_tokens on each frame's displayed size: the same
function the preprocessing uses, so the plan equals what the engine allocates (tests check).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import PromptTooLongError
from .frame_select import FrameSelection, default_frame_count, select_frames, time_label
from .image import num_image_tokens
from .video import VideoInfo, VideoReader


@dataclass(frozen=True)
class PlannedFrame:
    index: int  # position in the clip (0-based, presentation order)
    time: float  # seconds from the first frame
    width: int  # displayed size (rotation applied)
    height: int
    tokens: int  # image placeholder tokens at the plan's num_crops


@dataclass(frozen=True)
class VideoPlan:
    info: VideoInfo
    selection: FrameSelection
    num_crops: int
    frames: tuple[PlannedFrame, ...]

    @property
    def indices(self) -> list[int]:
        return [f.index for f in self.frames]

    @property
    def image_tokens(self) -> int:
        return sum(f.tokens for f in self.frames)

    def labels(self) -> list[str]:
        """"frame k at MM:SS" for each chosen frame (k from 1)."""
        return [time_label(k, f.time) for k, f in enumerate(self.frames, 1)]

    def to_dict(self) -> dict:
        return {"source": self.info.name, "kind": self.info.kind, "duration_s": round(self.info.duration, 6),
                "frame_count": self.info.frame_count, "width": self.info.width, "height": self.info.height,
                "rotation": self.info.rotation, "num_crops": self.num_crops, "image_tokens": self.image_tokens,
                "frames": [{"index": f.index, "time_s": round(f.time, 6), "width": f.width, "height": f.height,
                            "tokens": f.tokens} for f in self.frames]}


def plan_video(reader: VideoReader, selection: FrameSelection, num_crops: int, context: int) -> VideoPlan:
    """Choose the frames (frame_select's rules; the default count from the first frame's tokens
    and the context) and count each one's tokens. Reads headers only: nothing is decoded here."""
    info = reader.info
    width, height = reader.frame_size(0)
    default = default_frame_count(num_image_tokens(width, height, num_crops), context)
    chosen = select_frames(info.times, info.duration, selection, default)
    frames = []
    for i in chosen:
        w, h = reader.frame_size(i)
        frames.append(PlannedFrame(i, info.times[i], w, h, num_image_tokens(w, h, num_crops)))
    return VideoPlan(info, selection, num_crops, tuple(frames))


def check_video_fits(plans: list[VideoPlan], prompt_tokens: int, context: int, new_tokens: int = 1) -> None:
    """Refuse, before any frame is decoded, a prompt whose tokens + new_tokens exceed the context.

    prompt_tokens: the whole prompt (text and every image) as planned, or a lower bound of it."""
    if prompt_tokens + new_tokens <= context:
        return
    image = sum(p.image_tokens for p in plans)
    parts = []
    for p in plans:
        per = sorted({f.tokens for f in p.frames})
        each = f"{per[0]}" if len(per) == 1 else f"{per[0]}-{per[-1]}"
        parts.append(f"{len(p.frames)} frames x {each} tokens at num_crops {p.num_crops}")
    fit = _frames_that_fit(plans, prompt_tokens, context, new_tokens)
    hint = f"; at most {fit} frames fit: ask for fewer frames or a smaller num_crops" if fit else \
        "; use a smaller num_crops, a shorter prompt or a larger context"
    raise PromptTooLongError(
        f"the video needs {image} image tokens ({'; '.join(parts)}) and the prompt {prompt_tokens} tokens in all, "
        f"the model's context is {context} tokens{hint}",
        prompt_tokens=prompt_tokens, image_tokens=image, limit=context)


def _frames_that_fit(plans: list[VideoPlan], prompt_tokens: int, context: int, new_tokens: int) -> int:
    """With one video: how many of its frames (at their largest token cost) would fit; else 0."""
    if len(plans) != 1 or not plans[0].frames:
        return 0
    plan = plans[0]
    other = prompt_tokens - plan.image_tokens
    per = max(f.tokens for f in plan.frames)
    return max(0, (context - new_tokens - other) // per)
