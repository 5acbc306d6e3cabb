"""Video in batch jobs (issue 14): `--task describe` over a folder of videos, per-record `video` (with
frames / fps / start / end) in JSONL, results that name the frames used, resume, and the Ray path's
job encoding. Tiny checkpoint; videos written by the tests with PyAV."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("av")

from phi3v.batch.local_runner import RESULT_KEYS
from phi3v.batch.records import Job, discover, resolve_jobs
from phi3v.batch.runner import run_batch
from phi3v.engine.frame_select import FrameSelection
from phi3v.tasks import VIDEO_DESCRIBE_PROMPT
from server_harness import png_bytes
from video_fixtures import write_gif, write_video

MAX_TOKENS = 3


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """clips/: two videos, an image, an animated GIF (an image in a folder), a text file."""
    folder = tmp_path_factory.mktemp("clips")
    write_video(folder / "a.mp4", seconds=3, fps=5)
    (folder / "sub").mkdir()
    write_video(folder / "sub" / "b.webm", seconds=2, fps=5, codec="libvpx-vp9")
    (folder / "c.png").write_bytes(png_bytes(40, 30, seed=3))
    write_gif(folder / "d.gif", [100, 100])
    (folder / "notes.txt").write_text("not a record")
    return folder


def lines_of(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_a_folder_holds_video_records(clips):
    found = discover(clips)
    assert [r.id for r in found.records] == ["a.mp4", "c.png", "d.gif", "sub/b.webm"]
    a = found.records[0]
    assert a.images == () and a.video == str(clips / "a.mp4") and a.video_source == str((clips / "a.mp4").resolve())
    assert found.records[2].images == (str(clips / "d.gif"),)  # a GIF in a folder stays an image
    single = discover(clips / "a.mp4")
    assert single.kind == "file" and single.records[0].video is not None


def test_describe_over_a_folder_equals_the_api(tiny_model, clips, tmp_path):
    out = tmp_path / "out.jsonl"
    stats = run_batch(clips, tiny_model, task="describe", out=out, max_new_tokens=MAX_TOKENS).run()
    assert stats.done == 4 and stats.errors == 0
    by_id = {r["id"]: r for r in lines_of(out)}
    a = by_id["a.mp4"]
    assert a["prompt"] == VIDEO_DESCRIBE_PROMPT and a["video"] == str(clips / "a.mp4") and a["images"] == []
    ref_prepared = tiny_model.prepare(prompt=VIDEO_DESCRIBE_PROMPT, video=clips / "a.mp4")
    ref = tiny_model.ask(VIDEO_DESCRIBE_PROMPT, video=clips / "a.mp4", max_new_tokens=MAX_TOKENS)
    assert a["text"] == ref.text and a["usage"] == ref.usage.to_dict()
    plan = ref_prepared.video_plans[0]
    assert a["frames"] == [{"index": f.index, "time_s": round(f.time, 6)} for f in plan.frames]
    assert len(a["frames"]) == 15  # the default count: every frame of a 15-frame clip (at most 16)
    assert by_id["sub/b.webm"]["frames"] is not None
    assert set(by_id["c.png"]) == set(RESULT_KEYS)  # image records keep their shape
    assert by_id["c.png"]["prompt"] != VIDEO_DESCRIBE_PROMPT

    again = run_batch(clips, tiny_model, task="describe", out=out, max_new_tokens=MAX_TOKENS).run()
    assert again.done == 0 and again.skipped == 4  # resumed: nothing left


def test_jsonl_video_records(tiny_model, clips, tmp_path):
    cut = tmp_path / "cut.mp4"
    data = (clips / "a.mp4").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    records = [
        {"id": "three", "video": str(clips / "a.mp4"), "frames": 3, "prompt": "What happens?"},
        {"id": "window", "video": str(clips / "a.mp4"), "fps": 1, "start": 1, "task": "describe"},
        {"id": "labels", "video": str(clips / "a.mp4"), "frames": 2, "time_labels": True, "prompt": "When?"},
        {"id": "truncated", "video": str(cut), "prompt": "?"},
        {"id": "ocr", "video": str(clips / "a.mp4"), "task": "ocr"},
        {"id": "both", "video": str(clips / "a.mp4"), "frames": 2, "fps": 1, "prompt": "?"},
        {"id": "gif", "video": str(clips / "d.gif"), "prompt": "?"},
        {"id": "image", "images": [str(clips / "c.png")], "prompt": "?"},
    ]
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = tmp_path / "out.jsonl"
    stats = run_batch(jsonl, tiny_model, out=out, max_new_tokens=MAX_TOKENS).run()
    by_id = {r["id"]: r for r in lines_of(out)}
    assert stats.done == 8 and stats.errors == 3
    assert [f["index"] for f in by_id["three"]["frames"]] == [2, 7, 12]
    three = tiny_model.ask("What happens?", video=clips / "a.mp4", frames=3, max_new_tokens=MAX_TOKENS)
    assert by_id["three"]["text"] == three.text
    assert by_id["window"]["frames"] == [{"index": 5, "time_s": 1.0}, {"index": 10, "time_s": 2.0}]
    assert by_id["window"]["prompt"] == VIDEO_DESCRIBE_PROMPT
    labelled = tiny_model.prepare(prompt="When?", video=clips / "a.mp4",
                                  video_selection=FrameSelection(frames=2, time_labels=True))
    assert by_id["labels"]["usage"]["prompt_tokens"] == labelled.num_tokens
    assert "cut.mp4" in by_id["truncated"]["error"] and "VideoError" in by_id["truncated"]["error"]
    assert by_id["truncated"]["frames"] is None
    assert "is for images" in by_id["ocr"]["error"]
    assert "give frames or fps, not both" in by_id["both"]["error"]
    assert len(by_id["gif"]["frames"]) == 2  # given as a video: both frames of the animation
    assert by_id["image"]["error"] is None and "video" not in by_id["image"]


def test_bad_jsonl_video_keys(tmp_path):
    from phi3v.errors import Phi3VError

    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text(json.dumps({"images": ["a.png"], "frames": 3}) + "\n")
    with pytest.raises(Phi3VError, match="frames go with a 'video'"):
        discover(jsonl)
    jsonl.write_text(json.dumps({"video": 3}) + "\n")
    with pytest.raises(Phi3VError, match="'video' must be a non-empty string"):
        discover(jsonl)


def test_job_frames_default_and_record_override(clips):
    records = discover(clips).records
    jobs = resolve_jobs(records, task="describe", prompt=None, video_selection=FrameSelection(frames=4, start=1))
    a = next(j for j in jobs if j.id == "a.mp4")
    assert a.video_selection == FrameSelection(frames=4, start=1)
    rec = [r for r in records if r.id == "a.mp4"][0]
    from dataclasses import replace

    own = resolve_jobs([replace(rec, video_selection={"fps": 2})], task="describe", prompt=None,
                       video_selection=FrameSelection(frames=4, start=1))[0]
    assert own.video_selection == FrameSelection(fps=2, start=1)  # its fps replaces the job's count


def test_ray_actor_path_carries_the_video(tiny_model, clips):
    """The Ray runner sends jobs as JSON to ModelActor, which runs the local runner on them."""
    from phi3v.batch.ray_runner import ModelActor
    from phi3v.options import GenerationOptions

    job = resolve_jobs(discover(clips).records, task="describe", prompt=None,
                       video_selection=FrameSelection(frames=2, time_labels=True))[0]
    assert Job.from_dict(json.loads(json.dumps(job.to_dict()))) == job
    actor = ModelActor.__new__(ModelActor)  # its __init__ loads a model by name; use the loaded one
    actor.model, actor.options, actor.batch_size, actor.workers = tiny_model, GenerationOptions(max_new_tokens=2), 1, 1
    actor.image_policy, actor.system = None, None
    (line,) = actor({"job": [json.dumps(job.to_dict())]})["result"]
    result = json.loads(line)
    assert result["error"] is None and [f["index"] for f in result["frames"]] == [3, 11]


def test_cli_batch_describe_over_videos(tiny_model_dir, clips, tmp_path, run_cli):
    out = tmp_path / "cli.jsonl"
    code, _, err = run_cli("batch", str(clips), "--out", str(out), "--task", "describe", "-q",
                           "--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "float32",
                           "--max-tokens", "2", "--frames", "2", "--start", "1")
    assert code == 0, err
    written = {r["id"]: r for r in lines_of(out)}
    assert sorted(written) == ["a.mp4", "c.png", "d.gif", "sub/b.webm"]
    assert written["a.mp4"]["prompt"] == VIDEO_DESCRIBE_PROMPT
    assert written["a.mp4"]["frames"] == [{"index": 7, "time_s": 1.4}, {"index": 12, "time_s": 2.4}]
    code, _, err = run_cli("batch", str(clips), "--out", str(tmp_path / "x.jsonl"), "--task", "describe",
                           "--model", str(tiny_model_dir), "--start", "2", "--end", "1")
    assert code != 0 and "must be after start" in err
