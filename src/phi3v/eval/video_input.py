"""Video records: the model's prepare() with a record's video handed to the engine's video input.

batch's local runner calls `model.prepare(prompt=..., images=job.sources, num_crops=...)`; an eval
record whose "video" is a file or a folder carries it as one source `video:PATH` (records.py).
VideoPrompts wraps a loaded model so that such a source becomes `prepare(..., video=PATH)`: the
engine picks and decodes the frames (its selection rules, num_crops 4 unless the variant sets one).
Everything else is the model's own (attribute access passes through).
"""

from __future__ import annotations

from ..errors import PromptError
from .records import VIDEO_PREFIX


def _is_video(source) -> bool:
    return isinstance(source, str) and source.startswith(VIDEO_PREFIX)


class VideoPrompts:
    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):  # generate, generate_batch, images, device, ...
        return getattr(self._model, name)

    def prepare(self, *, images=(), **kwargs):
        videos = [s[len(VIDEO_PREFIX):] for s in images if _is_video(s)]
        if not videos:
            return self._model.prepare(images=images, **kwargs)
        if len(videos) > 1:
            raise PromptError("an eval record holds one video")
        return self._model.prepare(images=[s for s in images if not _is_video(s)], video=videos[0], **kwargs)
