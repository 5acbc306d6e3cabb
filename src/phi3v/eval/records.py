"""Eval records: what one labelled question is, and the native JSONL format.

One line per record (blank lines skipped):

    {"id": "chart-1", "images": ["charts/1.png"], "question": "What is the value of B?",
     "answers": ["42"], "metric": "relaxed"}
    {"id": "q7", "image": "scan.png", "question": "Which animal is shown?",
     "choices": ["cat", "dog", "cow"], "answers": ["B"], "metric": "choice"}
    {"id": "v1", "video": "clip_frames/", "question": "How many people enter?", "answers": ["2"]}

- id: string or number, unique (the resume key); default: `line-N`.
- images (list or one string; "image" also accepted): paths relative to the JSONL file, URLs, data: URIs.
- video: a video file (.mp4, .webm, .mov, .mkv, .avi; an animated GIF / WebP) or a folder of frame
  images, handed to the engine's video input (phi3v.load(...).prepare(video=...): its frame
  selection, num_crops 4 unless the variant sets one; files need the `video` extra); or a list of
  frame image files, of which up to MAX_VIDEO_FRAMES, evenly spaced, are given as images.
- question: the question text. prompt (optional): the full prompt, used as written instead of the
  template built from the question (prompts.py).
- answers (list or one string; "answer" also accepted): the accepted answers (VQA: the 10 human answers).
- metric (optional): relaxed | anls | vqa | choice | cer | wer | exact (metrics/); default exact,
  or the --metric given to the command.
- choices (list of strings): the options of a multiple-choice record; answers are letters or option text.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..batch.records import jsonl_objects
from ..engine.image_source import has_image_suffix
from ..errors import Phi3VError
from .metrics import check_metric
from .metrics.choice import answer_letter

NATIVE_KEYS = ("id", "images", "image", "video", "question", "prompt", "answers", "answer", "metric", "choices")
MAX_VIDEO_FRAMES = 8
VIDEO_PREFIX = "video:"  # a source the model opens as a video (video_input.py), not as an image
DEFAULT_METRIC = "exact"


@dataclass(frozen=True)
class EvalRecord:
    id: str
    images: tuple[str, ...]  # as written (shown in reports)
    sources: tuple[str, ...]  # what the model opens: absolute paths, URLs or data: URIs
    question: str
    answers: tuple[str, ...]
    metric: str = DEFAULT_METRIC
    choices: tuple[str, ...] = ()
    prompt: str | None = None  # the full prompt, when the record gives one
    extra: dict = field(default_factory=dict, compare=False)  # reader-specific facts (kept in reports)

    def to_dict(self) -> dict:
        d = {"id": self.id, "images": list(self.images), "question": self.question,
             "answers": list(self.answers), "metric": self.metric}
        if self.choices:
            d["choices"] = list(self.choices)
        if self.prompt is not None:
            d["prompt"] = self.prompt
        return d


def make_record(where: str, *, id, images, sources, question, answers, metric, choices=(), prompt=None,
                extra=None) -> EvalRecord:
    """An EvalRecord after the checks every reader shares; errors name `where`."""
    if isinstance(id, (int, float)) and not isinstance(id, bool):
        id = str(id)
    if not isinstance(id, str) or not id:
        raise Phi3VError(f"{where}: 'id' must be a non-empty string or a number")
    if not isinstance(question, str) or not question.strip():
        if prompt is None:
            raise Phi3VError(f"{where}: 'question' must be a non-empty string")
        question = question if isinstance(question, str) else ""
    if isinstance(answers, (str, int, float)) and not isinstance(answers, bool):
        answers = [str(answers)]
    if not isinstance(answers, (list, tuple)) or not answers:
        raise Phi3VError(f"{where}: 'answers' must be a non-empty list of strings")
    answers = tuple(str(a) for a in answers)
    try:
        metric = check_metric(metric)
    except ValueError as e:
        raise Phi3VError(f"{where}: {e}") from None
    if not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) for c in choices):
        raise Phi3VError(f"{where}: 'choices' must be a list of strings")
    if metric == "choice":
        if len(choices) < 2:
            raise Phi3VError(f"{where}: a 'choice' record needs two or more 'choices'")
        try:
            for a in answers:
                answer_letter(a, choices)
        except ValueError as e:
            raise Phi3VError(f"{where}: {e}") from None
    if prompt is not None and not isinstance(prompt, str):
        raise Phi3VError(f"{where}: 'prompt' must be a string")
    return EvalRecord(id=id, images=tuple(images), sources=tuple(sources), question=question, answers=answers,
                      metric=metric, choices=tuple(choices), prompt=prompt, extra=dict(extra or {}))


def resolve_source(image: str, base: Path) -> str:
    """A relative path is relative to `base` (the data file's folder); URLs and data: URIs pass."""
    if "://" in image[:16] or image.startswith("data:"):
        return image
    p = Path(image).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def video_source(video: str, base: Path, where: str) -> str:
    """A record's "video" string -> the source the engine's video input opens (VIDEO_PREFIX + path)."""
    if "://" in video[:16] or video.startswith("data:"):
        return VIDEO_PREFIX + video
    path = Path(video).expanduser()
    path = path if path.is_absolute() else (base / path).resolve()
    if not path.exists():
        raise Phi3VError(f"{where}: 'video' {video!r} does not exist (give a video file or a folder of frames)")
    return VIDEO_PREFIX + str(path)


def video_frames(video, base: Path, where: str, max_frames: int = MAX_VIDEO_FRAMES) -> list[str]:
    """A record's "video" list of frame files -> up to max_frames of them (as written), evenly spaced."""
    if not (isinstance(video, list) and all(isinstance(f, str) and f for f in video)):
        raise Phi3VError(f"{where}: 'video' must be a video file, a folder of frames or a list of frame files")
    frames = [f for f in video if has_image_suffix(f) or "://" in f[:16] or f.startswith("data:")]
    if len(frames) != len(video):
        raise Phi3VError(f"{where}: a 'video' list holds frame image files only")
    if not frames:
        raise Phi3VError(f"{where}: 'video' {video!r} holds no frame images")
    if len(frames) > max_frames:  # evenly spaced, first and last included
        step = (len(frames) - 1) / (max_frames - 1)
        frames = [frames[round(i * step)] for i in range(max_frames)]
    return frames


def native_record(obj, where: str, lineno: int, base: Path, default_metric: str | None) -> EvalRecord:
    if not isinstance(obj, dict):
        raise Phi3VError(f"{where}: each line must be a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(NATIVE_KEYS))
    if unknown:
        raise Phi3VError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(NATIVE_KEYS)}")
    given = [k for k in ("images", "image", "video") if k in obj]
    if len(given) > 1:
        raise Phi3VError(f"{where}: give one of 'images', 'image', 'video', not {given}")
    if isinstance(obj.get("video"), str):
        source = video_source(obj["video"], base, where)
        return make_record(where, id=obj.get("id", f"line-{lineno}"), images=[obj["video"]], sources=[source],
                           question=obj.get("question"), answers=_answers(obj, where),
                           metric=obj.get("metric") or default_metric or DEFAULT_METRIC,
                           choices=obj.get("choices", ()), prompt=obj.get("prompt"))
    if "video" in obj:
        images = video_frames(obj["video"], base, where)
    else:
        images = obj.get("images", obj.get("image", []))
        if isinstance(images, str):
            images = [images]
        if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
            raise Phi3VError(f"{where}: 'images' must be a list of non-empty strings")
    return make_record(where, id=obj.get("id", f"line-{lineno}"), images=images,
                       sources=[resolve_source(i, base) for i in images], question=obj.get("question"),
                       answers=_answers(obj, where), metric=obj.get("metric") or default_metric or DEFAULT_METRIC,
                       choices=obj.get("choices", ()), prompt=obj.get("prompt"))


def _answers(obj: dict, where: str):
    if "answers" in obj and "answer" in obj:
        raise Phi3VError(f"{where}: give 'answers' or 'answer', not both")
    answers = obj.get("answers", obj.get("answer"))
    if answers is None:
        raise Phi3VError(f"{where}: 'answers' is missing (the accepted answers)")
    return answers


def read_native(path: Path, default_metric: str | None = None) -> list[EvalRecord]:
    base = path.resolve().parent
    return [native_record(obj, where, lineno, base, default_metric) for obj, where, lineno in jsonl_objects(path)]


def check_unique(records: Iterable[EvalRecord]) -> None:
    seen: set[str] = set()
    for r in records:
        if r.id in seen:
            raise Phi3VError(f"duplicate record id {r.id!r}; ids must be unique (they are the resume key)")
        seen.add(r.id)


def jsonl_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() == ".jsonl" and not p.name.startswith("."))
