"""Video records in batch jobs: which inputs are videos, the JSONL keys, the prompt, the result fields.

    phi3v batch clips/ --task describe --out clips.jsonl        # each video file of the folder is a record
    {"id": "a", "video": "clips/a.mp4", "frames": 8, "prompt": "What happens?"}      # a JSONL record
    {"video": "talk.webm", "fps": 0.2, "start": 60, "end": 600, "time_labels": true, "task": "describe"}

A folder or glob picks up video files (engine.video_source.VIDEO_SUFFIXES: .mp4, .webm, .mov, .mkv,
.avi, ...) as well as images; an animated GIF stays an image there (give it as "video" in JSONL to
read it as a clip). A record has at most one video, after its images if it has both. Its frames are
chosen by the record's frames / fps / start / end / time_labels, else the job's video_selection,
else the default (engine/frame_select.py; docs/video.md): a record's `frames` or `fps` replaces
the job's count. The describe task asks the video question (tasks.VIDEO_DESCRIBE_PROMPT); ask
takes the user's question; the image-only tasks (ocr, table, compare) refuse a video record.
The result names the video and the frames used: {"video": "clips/a.mp4", "frames": [{"index", "time_s"}]}.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..engine.frame_select import FrameSelection
from ..engine.video_source import has_video_suffix
from ..errors import Phi3VError, PromptError

SELECTION_KEYS = ("frames", "fps", "start", "end", "time_labels")
JSONL_VIDEO_KEYS = ("video",) + SELECTION_KEYS
VIDEO_TASKS = ("describe", "ask")  # the tasks a video record may use (others are for images)


def is_video_file(path) -> bool:
    return has_video_suffix(Path(path).name)


def jsonl_video(obj: dict, where: str, base: Path, source_of) -> tuple[str | None, str | None, dict | None]:
    """A JSONL record's (video as written, what the model opens, selection keys) - all None without one.

    source_of(text, base): how records.py resolves a path (relative to the JSONL file; URIs as given)."""
    selection = {k: obj[k] for k in SELECTION_KEYS if obj.get(k) is not None}
    video = obj.get("video")
    if video is None:
        if selection:
            raise Phi3VError(f"{where}: {', '.join(sorted(selection))} go with a 'video'")
        return None, None, None
    if not isinstance(video, str) or not video:
        raise Phi3VError(f"{where}: 'video' must be a non-empty string (a file, a folder of frames or a data: URI)")
    return video, source_of(video, base), selection or None


def frame_selection(job_default: FrameSelection | None, record: dict | None) -> FrameSelection:
    """The record's keys over the job's selection; a record's frames or fps replaces the job's count.
    Raises VideoError (e.g. frames and fps together, end before start)."""
    base = job_default or FrameSelection()
    if not record:
        return base
    if "frames" in record or "fps" in record:
        base = replace(base, frames=None, fps=None)
    return replace(base, **record)


def video_task_prompt(task: str) -> str:
    """The preset prompt of `task` for a video record (describe: the video question)."""
    from ..tasks import VIDEO_DESCRIBE_PROMPT

    if task not in VIDEO_TASKS:
        raise PromptError(f"task {task!r} is for images; a video record goes with {' or '.join(VIDEO_TASKS)} "
                          "(or its own prompt)")
    if task == "ask":
        raise PromptError("task 'ask' needs a question (e.g. --prompt \"What happens?\")")
    return VIDEO_DESCRIBE_PROMPT


def result_fields(job, prepared) -> dict:
    """{"video", "frames"} of a video job's result ({} for an image job); frames None when it failed
    before its clip was planned."""
    if job.video is None:
        return {}
    plans = getattr(prepared, "video_plans", ()) if prepared is not None else ()
    frames = None
    if plans:
        frames = [{"index": f.index, "time_s": round(f.time, 6)} for f in plans[-1].frames]
    return {"video": job.video, "frames": frames}
