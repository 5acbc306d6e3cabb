"""The plan of a video question from the config and tokenizer alone (no weights): what `phi3v info
clip.mp4` prints, and what a caller can check before loading or asking.

    plan = plan_video_request(cfg, tokenizer, "clip.mp4", FrameSelection(frames=16), "What happens?",
                              dtype="bfloat16", quantize=None, max_new_tokens=512, vision_chunk=4)
    plan.video.frames        the chosen frames (index, time, size, tokens)
    plan.prompt_tokens       exactly model.prepare(prompt=..., video=..., ...).num_tokens
    plan.memory              engine.memory_plan.MemoryPlan (KV cache exact, peak estimated)
    plan.fits                prompt + one new token within the context

It renders the same prompt as Phi3V.prepare (chat_template, the time labels of video_input) and
counts the same tokens (image.num_image_tokens per frame), so its numbers are the engine's.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import chat_template as chat_format
from .config import Phi3VConfig
from .frame_select import VIDEO_NUM_CROPS, FrameSelection
from .image import crop_grid
from .memory_plan import MemoryPlan, plan_memory
from .video import open_video
from .video_input import labelled_prompt
from .video_plan import VideoPlan, plan_video


@dataclass(frozen=True)
class VideoRequestPlan:
    video: VideoPlan
    prompt_tokens: int  # text + every frame's placeholders
    new_tokens: int  # max_new_tokens cut to the room the context leaves
    context: int
    memory: MemoryPlan

    @property
    def fits(self) -> bool:
        return self.prompt_tokens + 1 <= self.context

    @property
    def frames_that_fit(self) -> int:
        """How many frames (at the largest per-frame cost) fit with the same text and one new token."""
        text = self.prompt_tokens - self.video.image_tokens
        per = max((f.tokens for f in self.video.frames), default=1)
        return max(0, (self.context - 1 - text) // per)


def plan_video_request(cfg: Phi3VConfig, tokenizer, source, selection: FrameSelection, prompt: str, *,
                       dtype, quantize: str | None = None, max_new_tokens: int = 512,
                       num_crops: int | None = None, vision_chunk: int | None = None,
                       context: int | None = None, policy=None, system: str | None = None) -> VideoRequestPlan:
    """Probe the video (headers and timestamps), choose its frames and count the prompt's tokens
    as Phi3V.prepare(prompt=prompt, video=source, ...) would; estimate its memory."""
    from .facts import model_facts

    facts = model_facts(cfg)
    crops = num_crops or VIDEO_NUM_CROPS
    context = min(context or facts.context_length, facts.context_length)
    with open_video(source, policy) as reader:
        video = plan_video(reader, selection, crops, context)
    text = labelled_prompt(prompt, video) if selection.time_labels else prompt
    chat = chat_format.render_prompt_chat(text, len(video.frames), system=system)
    ids = chat_format.build_input_ids(tokenizer, chat.prompt_text, [f.tokens for f in video.frames],
                                      chat.plain_spans)
    prompt_tokens = len(ids)
    room = context - prompt_tokens
    new_tokens = min(max_new_tokens, room) if room >= 1 else max_new_tokens
    image_crops = [1 + rows * cols for rows, cols in (crop_grid(f.width, f.height, crops) for f in video.frames)]
    memory = plan_memory(facts, dtype, quantize, prompt_tokens, new_tokens, image_crops, crops, vision_chunk,
                         image_tokens=video.image_tokens)
    return VideoRequestPlan(video, prompt_tokens, new_tokens, context, memory)
