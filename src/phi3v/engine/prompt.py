"""PreparedPrompt: a request turned into model inputs (ids with image placeholders, pixels)."""

from __future__ import annotations

from dataclasses import dataclass

from .image import ImageBatch


@dataclass(eq=False)  # compared by identity: it holds tensors
class PreparedPrompt:
    input_ids: list[int]  # image k's placeholders are a run of -k
    images: ImageBatch | None
    prompt_text: str
    preprocess_s: float = 0.0
    image_keys: list[str] | None = None  # content key per image (feature_cache.image_keys), set on first use
    video_plans: tuple = ()  # video_plan.VideoPlan per video of the request, in prompt order (frames, times)

    @property
    def image_tokens(self) -> int:
        return sum(self.images.num_img_tokens) if self.images is not None else 0

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)
