"""`phi3v video`, `phi3v describe clip.mp4` and `phi3v info clip.mp4` on a tiny checkpoint: the
answer, the frames used, usage errors, and a plan whose tokens and KV cache equal the engine's."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("av")

from phi3v import tasks
from phi3v.engine.frame_select import FrameSelection
from video_fixtures import write_video

TINY = ("--device", "cpu", "--dtype", "float32", "-q")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("v") / "clip.mp4", seconds=4, fps=5, width=672, height=336)


def test_video_command_answers_with_the_frames_used(run_cli, tiny_model_dir, tiny_model, clip):
    code, out, err = run_cli("video", clip, "-p", "What happens?", "-m", tiny_model_dir, *TINY,
                             "--frames", "3", "--max-tokens", "4", "--json")
    assert code == 0, err
    got = json.loads(out)
    assert [f["index"] for f in got["video"]["frames"]] == [3, 10, 16]
    expected = tiny_model.prepare(prompt="What happens?", video=clip, video_selection=FrameSelection(frames=3))
    assert got["usage"]["prompt_tokens"] == expected.num_tokens
    assert got["usage"]["image_tokens"] == got["video"]["image_tokens"] == expected.image_tokens


def test_describe_takes_a_video(run_cli, tiny_model_dir, clip):
    code, out, err = run_cli("describe", clip, "-m", tiny_model_dir, *TINY, "--fps", "0.5", "--max-tokens", "2",
                             "--json")
    assert code == 0, err
    got = json.loads(out)
    assert got["prompt"] == tasks.VIDEO_DESCRIBE_PROMPT
    assert [f["time_s"] for f in got["video"]["frames"]] == [0.0, 2.0]
    code, out, _ = run_cli("describe", clip, "--show-prompt")
    assert out.strip() == tasks.VIDEO_DESCRIBE_PROMPT


def test_usage_errors(run_cli, tmp_path, clip):
    from PIL import Image

    photo = tmp_path / "p.png"
    Image.new("RGB", (8, 8)).save(photo)
    code, _, err = run_cli("describe", photo, "--frames", "2")
    assert code == 2 and "apply to a video" in err
    code, _, err = run_cli("video", clip, "--frames", "2", "--fps", "1")
    assert code == 2 and "not allowed with argument" in err
    code, _, err = run_cli("video", tmp_path / "missing.mp4", "-m", tmp_path)
    assert code != 0 and "missing.mp4: no such file or folder" in err
    assert "Traceback" not in err


def test_info_plan_equals_the_engine(run_cli, tiny_model_dir, tiny_model, clip, monkeypatch):
    from phi3v.engine.decoder import KVCache
    from phi3v.options import GenerationOptions

    code, out, err = run_cli("info", clip, "-m", tiny_model_dir, "--dtype", "float32", "--frames", "4",
                             "--max-tokens", "300", "--json")
    assert code == 0, err
    plan = json.loads(out)["videos"][0]
    prepared = tiny_model.prepare(prompt=tasks.VIDEO_DESCRIBE_PROMPT, video=clip,
                                  video_selection=FrameSelection(frames=4))
    assert [f["index"] for f in plan["frames"]] == [2, 7, 12, 17]
    assert [f["time_s"] for f in plan["frames"]] == [0.4, 1.4, 2.4, 3.4]
    assert [f["tokens"] for f in plan["frames"]] == prepared.images.num_img_tokens
    assert plan["prompt_tokens"] == prepared.num_tokens
    # the KV cache the engine allocates over the whole answer (the random model runs to the limit)
    capacity = []
    real_reserve = KVCache.reserve
    monkeypatch.setattr(KVCache, "reserve", lambda self, n: (real_reserve(self, n), capacity.append(self))[0])
    done = tiny_model.generate(prepared, GenerationOptions(max_new_tokens=300))
    assert done.usage.completion_tokens == 300
    cache = capacity[-1]
    allocated = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
    assert plan["memory"]["kv_cache_slots"] == cache.capacity
    assert plan["memory"]["kv_cache_bytes"] == allocated
    # the pixel_values and image features the request holds
    assert plan["memory"]["pixel_bytes"] == prepared.images.pixel_values.numel() * 4
    features = tiny_model.images.for_prompts([prepared])[0]
    assert plan["memory"]["feature_bytes"] == sum(f.numel() * f.element_size() for f in features)
    assert plan["memory"]["peak_bytes"] > allocated + plan["memory"]["weights_bytes"]


def test_info_says_when_it_does_not_fit(run_cli, tiny_model_dir, clip):
    code, out, err = run_cli("info", clip, "-m", tiny_model_dir, "--frames", "8", "--ctx", "1000")
    assert code == 0, err
    assert "8 frames at num_crops 4: 457 tokens per frame, 3656 image tokens" in out
    assert "does not fit: 3744 prompt tokens + 1 > context 1000" in out
    assert "at most 1 frames fit" in out  # (1000 - 1 - (3744 - 3656 text tokens)) // 457
