"""Batch input: what one record is, and how a folder, a glob or a JSONL file becomes records.

A record is one request to the model: an id (unique in the job, the key for resume), the images
as the user wrote them, and optional per-record `prompt` / `task` / `schema` (a JSON Schema the
answer must follow; the result then carries the parsed object).  `resolve_jobs` then turns
records into `Job`s whose prompt text is final, so the runners (local and Ray) never need to
know about tasks.

Ids: JSONL records give theirs (or get one, see `read_jsonl`); a folder's images get their path
relative to the folder (posix separators), a glob's matches the path as the glob returned it.
"""

from __future__ import annotations

import glob as globlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..engine.image_source import IMAGE_SUFFIXES, has_image_suffix
from ..engine.video_source import VIDEO_SUFFIXES
from ..errors import Phi3VError, PromptError
from .video_records import JSONL_VIDEO_KEYS, frame_selection, is_video_file, jsonl_video, video_task_prompt

# A folder or glob input picks up the files with one of IMAGE_SUFFIXES or VIDEO_SUFFIXES (any case);
# the rest is ignored. Video records: batch/video_records.py.
JSONL_KEYS = ("id", "images", "image", "prompt", "task", "schema") + JSONL_VIDEO_KEYS


@dataclass(frozen=True)
class Record:
    """One input record as discovered; `prompt` / `task` None mean 'use the job's default'."""

    id: str
    images: tuple[str, ...]  # as written by the user (shown in the output)
    sources: tuple[str, ...]  # what the model opens: absolute paths, or URLs / data URIs as given
    prompt: str | None = None
    task: str | None = None
    schema: object = None  # as given (a JSON Schema object; anything else fails that record alone)
    video: str | None = None  # as written (shown in the output); video_records.py
    video_source: str | None = None  # what the model opens: an absolute path, or a data URI as given
    video_selection: dict | None = None  # the record's frames / fps / start / end / time_labels


@dataclass(frozen=True)
class Job:
    """A record with its final prompt text; `error` set means it fails without reaching the model."""

    id: str
    images: tuple[str, ...]
    sources: tuple[str, ...]
    task: str | None
    prompt: str | None
    error: str | None = None
    schema: dict | None = None  # the answer follows this JSON Schema (constrained decoding)
    video: str | None = None  # as written; its frames follow the images (video_records.py)
    video_source: str | None = None
    video_selection: object = None  # engine.frame_select.FrameSelection of a video job

    def to_dict(self) -> dict:
        selection = None
        if self.video_selection is not None:
            s = self.video_selection
            selection = {"frames": s.frames, "fps": s.fps, "start": s.start, "end": s.end,
                         "time_labels": s.time_labels}
        return {"id": self.id, "images": list(self.images), "sources": list(self.sources),
                "task": self.task, "prompt": self.prompt, "error": self.error, "schema": self.schema,
                "video": self.video, "video_source": self.video_source, "video_selection": selection}

    @classmethod
    def from_dict(cls, d: dict) -> "Job":
        selection = d.get("video_selection")
        if selection is not None:
            from ..engine.frame_select import FrameSelection

            selection = FrameSelection(**selection)
        return cls(id=d["id"], images=tuple(d["images"]), sources=tuple(d["sources"]),
                   task=d.get("task"), prompt=d.get("prompt"), error=d.get("error"), schema=d.get("schema"),
                   video=d.get("video"), video_source=d.get("video_source"), video_selection=selection)


@dataclass
class InputSummary:
    """What discovery found, for messages ('no images under scans/')."""

    kind: str  # "folder" | "glob" | "jsonl" | "file"
    description: str
    records: list[Record] = field(default_factory=list)


def is_image_file(path: str | os.PathLike) -> bool:
    return has_image_suffix(Path(path).name)


def discover(input_spec: str | os.PathLike) -> InputSummary:
    """Records from a folder (recursive), a .jsonl file, a single image file or a glob pattern."""
    text = os.fspath(input_spec)
    path = Path(text)
    if path.is_dir():
        records = read_folder(path)
        kind = "folder"
    elif path.is_file() and path.suffix.lower() == ".jsonl":
        records = read_jsonl(path)
        kind = "jsonl"
    elif path.is_file():
        if not (is_image_file(path) or is_video_file(path)):
            raise Phi3VError(
                f"batch input {text!r} is neither a folder, a .jsonl file, an image file "
                f"({', '.join(IMAGE_SUFFIXES)}), a video file ({', '.join(VIDEO_SUFFIXES)}) nor a glob pattern"
            )
        records = [_path_record(path.name, text, path)]
        kind = "file"
    elif globlib.has_magic(text):
        records = read_glob(text)
        kind = "glob"
    else:
        raise Phi3VError(f"batch input {text!r} does not exist (give a folder, a glob or a .jsonl file)")
    check_unique_ids(records)
    return InputSummary(kind=kind, description=text, records=records)


def _path_record(record_id: str, shown: str, path: Path) -> Record:
    if is_video_file(path):
        return Record(id=record_id, images=(), sources=(), video=shown, video_source=str(path.resolve()))
    return Record(id=record_id, images=(shown,), sources=(str(path.resolve()),))


def read_folder(folder: Path) -> list[Record]:
    """Every image and video file below `folder`, sorted by relative path; hidden files and folders skipped."""
    records = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or not (is_image_file(name) or is_video_file(name)):
                continue
            full = Path(root) / name
            rel = full.relative_to(folder).as_posix()
            records.append(_path_record(rel, os.fspath(full), full))
    records.sort(key=lambda r: r.id)
    return records


def read_glob(pattern: str) -> list[Record]:
    """Image and video files matching a glob (`**` recursive); id = the path as matched."""
    matches = sorted(globlib.glob(pattern, recursive=True))
    return [_path_record(Path(m).as_posix(), m, Path(m))
            for m in matches if os.path.isfile(m) and (is_image_file(m) or is_video_file(m))]


def read_jsonl(path: Path) -> list[Record]:
    """Records `{"id", "images" (list or one string; "image" also accepted), "prompt", "task"}`, and
    `"video"` with optional frames / fps / start / end / time_labels (video_records.py).

    Blank lines are skipped.  Relative image paths are relative to the JSONL file's folder.
    A record without an id gets its single image path, or `line-N` (N = line number).
    """
    base = path.resolve().parent
    return [_jsonl_record(obj, where, lineno, base) for obj, where, lineno in jsonl_objects(path)]


def jsonl_objects(path: Path):
    """(parsed line, "FILE:LINE", line number) for each non-blank line of a JSONL file; a line that
    is not JSON is a Phi3VError naming FILE:LINE."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield json.loads(line), where, lineno
            except json.JSONDecodeError as e:
                raise Phi3VError(f"{where}: not valid JSON ({e.msg})") from None


def _jsonl_record(obj, where: str, lineno: int, base: Path) -> Record:
    if not isinstance(obj, dict):
        raise Phi3VError(f"{where}: each line must be a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(JSONL_KEYS))
    if unknown:
        raise Phi3VError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(JSONL_KEYS)}")
    if "images" in obj and "image" in obj:
        raise Phi3VError(f"{where}: give 'images' or 'image', not both")
    images = obj.get("images", obj.get("image", []))
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
        raise Phi3VError(f"{where}: 'images' must be a list of non-empty strings")
    for key in ("prompt", "task"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            raise Phi3VError(f"{where}: {key!r} must be a string")
    video, video_source, selection = jsonl_video(obj, where, base, _jsonl_source)
    record_id = obj.get("id")
    if record_id is None:
        named = images + ([video] if video is not None else [])
        record_id = named[0] if len(named) == 1 else f"line-{lineno}"
    elif isinstance(record_id, (int, float)) and not isinstance(record_id, bool):
        record_id = str(record_id)  # 17 and "17" are the same record for resume
    elif not isinstance(record_id, str) or not record_id:
        raise Phi3VError(f"{where}: 'id' must be a non-empty string or a number")
    sources = tuple(_jsonl_source(i, base) for i in images)
    return Record(id=record_id, images=tuple(images), sources=sources,
                  prompt=obj.get("prompt"), task=obj.get("task"), schema=obj.get("schema"),
                  video=video, video_source=video_source, video_selection=selection)


def _jsonl_source(image: str, base: Path) -> str:
    """A relative path is taken relative to the JSONL file; URLs and data URIs pass unchanged."""
    if "://" in image[:16] or image.startswith("data:"):
        return image
    p = Path(image).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def check_unique_ids(records: Iterable[Record]) -> None:
    """Resume keys results by id, so two records with one id would make a job ambiguous."""
    seen: set[str] = set()
    for r in records:
        if r.id in seen:
            raise Phi3VError(f"duplicate record id {r.id!r} in the batch input; ids must be unique")
        seen.add(r.id)


def resolve_jobs(records: Iterable[Record], *, task: str | None, prompt: str | None,
                 fmt: str | None = None, schema: dict | None = None, video_selection=None) -> list[Job]:
    """Final prompt text per record, first match wins:

    1. the record's own "prompt";
    2. the record's own "task" (other than "ask"): that task's preset prompt (default format);
    3. the job's `prompt` (for task "ask" it is the question; for another task it replaces
       the preset);
    4. the job's `task` preset, in format `fmt`.
    A record's task label is its own task, else the job's, else "ask".  The image count must
    suit the task (phi3v.tasks.check_image_count: compare needs two or more images; describe,
    ocr and table take one).  A record whose prompt cannot be made becomes a Job with `error`
    set: it is reported in the output like any other failed record.

    The JSON Schema of a record: its own "schema", else the job's `schema`, else the table
    shape when its prompt is the table preset in format json (tasks.task_schema). A record
    "schema" that is not a JSON object makes that record an error (one the grammar engine
    refuses fails when the record runs).

    A video record (video_records.py): the describe preset is the video question, image-only
    tasks are its error, the video counts as one image for the task's count, and its frame
    selection is its own keys over `video_selection` (the job's FrameSelection).
    """
    from ..tasks import check_image_count, task_schema

    jobs = []
    for r in records:
        record_task = r.task or task or "ask"
        error = text = None
        record_schema = r.schema if r.schema is not None else schema
        selection = None
        try:
            if r.video is not None:
                selection = frame_selection(video_selection, r.video_selection)
            if r.prompt is not None:
                text = r.prompt
            elif r.video is not None and (r.task not in (None, "ask") or prompt is None):
                text = video_task_prompt(record_task)
            elif r.task is not None and r.task != "ask":
                text = _task_prompt(r.task, None)
            elif prompt is not None:
                text = prompt
            else:
                preset_fmt = fmt if record_task == task else None
                text = _task_prompt(record_task, preset_fmt)
                if record_schema is None:
                    record_schema = task_schema(record_task, preset_fmt)
            check_image_count(record_task, len(r.images) + (r.video is not None))
            if not text.strip():
                raise PromptError("the prompt is empty")
            if record_schema is not None and not isinstance(record_schema, dict):
                raise PromptError(f"'schema' must be a JSON Schema object, got {type(record_schema).__name__}")
        except Phi3VError as e:
            error = f"{type(e).__name__}: {e}"
        jobs.append(Job(id=r.id, images=r.images, sources=r.sources, task=record_task,
                        prompt=text, error=error, schema=record_schema, video=r.video,
                        video_source=r.video_source, video_selection=selection))
    return jobs


def _task_prompt(task: str, fmt: str | None) -> str:
    from ..tasks import task_prompt  # the CLI's task presets (describe, ocr, table, compare, ask)

    return task_prompt(task, fmt)
