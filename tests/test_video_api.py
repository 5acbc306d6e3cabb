"""Video through the Python API on a tiny checkpoint: frames become images (same ids and pixels as
the frames given as images), chat parts, time labels, num_crops, the cache, refusals before work."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("av")

import phi3v
from phi3v.engine.frame_select import FrameSelection
from phi3v.engine.video import open_video
from phi3v.engine.video_plan import plan_video
from phi3v.errors import PromptError, PromptTooLongError, VideoError
from video_fixtures import write_gif, write_video


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    # 672x336 frames: a 2x1 crop grid at num_crops 4 (tokens differ from a square's)
    return write_video(tmp_path_factory.mktemp("v") / "clip.mp4", seconds=4, fps=5, width=672, height=336)


@pytest.fixture()
def model(tiny_model_dir):
    """A model of its own (the tests count the vision tower's calls and fill its caches)."""
    return phi3v.load(str(tiny_model_dir), device="cpu", dtype="float32", progress=False)


def frames_of(path, indices):
    with open_video(path) as reader:
        return list(reader.frames(indices))


def test_video_equals_its_frames_given_as_images(tiny_model, clip):
    sel = FrameSelection(frames=3)
    video = tiny_model.prepare(prompt="What happens?", video=clip, video_selection=sel)
    with open_video(clip) as reader:
        plan = plan_video(reader, sel, num_crops=4, context=tiny_model.context_length)
    assert plan.indices == [3, 10, 16]  # 20 frames: floor(20/6), floor(60/6), floor(100/6)
    images = tiny_model.prepare(prompt="What happens?", images=frames_of(clip, plan.indices), num_crops=4)
    assert video.input_ids == images.input_ids
    assert video.prompt_text == images.prompt_text
    assert video.prompt_text.startswith("<|user|>\n<|image_1|>\n<|image_2|>\n<|image_3|>\nWhat happens?")
    assert torch.equal(video.images.pixel_values, images.images.pixel_values)
    assert video.images.pixel_values.shape[1] == 5  # num_crops 4 for videos (+ the global view)
    # the plan's token counts are what the prompt holds
    assert video.images.num_img_tokens == [f.tokens for f in plan.frames]
    assert video.image_tokens == plan.image_tokens


def test_num_crops_given_wins(tiny_model, clip):
    p = tiny_model.prepare(prompt="?", video=clip, video_selection=FrameSelection(frames=2), num_crops=1)
    assert p.images.pixel_values.shape[1] == 2


def test_chat_video_parts_equal_the_prompt_path(tiny_model, clip):
    sel = FrameSelection(frames=2)
    plain = tiny_model.prepare(prompt="Summarise.", video=clip, video_selection=sel)
    for part in ({"type": "video_url", "video_url": {"url": str(clip)}},
                 {"type": "video", "video": clip, "frames": 2}):
        messages = [{"role": "user", "content": [part, {"type": "text", "text": "Summarise."}]}]
        chat = tiny_model.prepare(messages=messages, video_selection=sel if "frames" not in part else None)
        assert chat.input_ids == plain.input_ids
        assert torch.equal(chat.images.pixel_values, plain.images.pixel_values)


def test_time_labels_in_both_paths(tiny_model, clip):
    sel = FrameSelection(fps=0.5, time_labels=True)  # moments 0 s and 2 s: frames 0 and 10
    p = tiny_model.prepare(prompt="When does it turn blue?", video=clip, video_selection=sel)
    assert "<|image_2|>\nframe 1 at 00:00\nframe 2 at 00:02\nWhen does it turn blue?" in p.prompt_text
    messages = [{"role": "user", "content": [{"type": "video", "video": str(clip)},
                                             {"type": "text", "text": "When does it turn blue?"}]}]
    chat = tiny_model.prepare(messages=messages, video_selection=sel)
    assert chat.prompt_text == p.prompt_text and chat.input_ids == p.input_ids


def test_images_and_a_video_together(tiny_model, clip, tmp_path):
    gif = write_gif(tmp_path / "a.gif", [100, 100])
    p = tiny_model.prepare(prompt="Compare.", images=[str(gif)], video=clip, video_selection=FrameSelection(frames=2))
    assert p.prompt_text.count("<|image_") == 3  # the image first, then the two frames
    assert p.images.pixel_values.shape[:2] == (3, 5)


def test_animated_gif_and_folder_as_videos(tiny_model, tmp_path):
    from video_fixtures import write_frame_folder

    gif = write_gif(tmp_path / "a.gif", [100, 200, 300, 400])
    assert len(tiny_model.prepare(prompt="?", video=gif, video_selection=FrameSelection(frames=3)).images) == 3
    folder = write_frame_folder(tmp_path / "f", count=5)
    assert len(tiny_model.prepare(prompt="?", video=folder).images) == 5  # default count: every frame


def test_ask_and_stream_with_a_video(model, clip):
    done = model.ask("What happens?", video=clip, frames=2, max_new_tokens=3)
    assert done.usage.image_tokens == 2 * model.prepare(prompt="?", video=clip,
                                                         video_selection=FrameSelection(frames=1)).image_tokens
    stream = model.stream("What happens?", video=clip, frames=2, max_new_tokens=3)
    assert "".join(stream) == done.text


def test_second_question_reencodes_nothing(model, clip):
    from phi3v.engine.vision import ClipEmbeddings

    calls = []
    embeddings = next(m for m in model.module.modules() if isinstance(m, ClipEmbeddings))
    embeddings.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    model.ask("What happens?", video=clip, frames=4, max_new_tokens=1)
    assert sum(calls) > 0
    calls.clear()
    model.ask("Which colours appear?", video=clip, frames=4, max_new_tokens=1)
    assert calls == []  # every frame's features came from the cache


def test_too_long_is_refused_before_decoding(tiny_model_dir, clip, monkeypatch):
    import phi3v.engine.video as video

    model = phi3v.load(str(tiny_model_dir), device="cpu", dtype="float32", progress=False, max_context=1000)
    decoded = []
    real = video.ContainerReader.frames
    monkeypatch.setattr(video.ContainerReader, "frames", lambda self, idx: decoded.append(idx) or real(self, idx))
    with pytest.raises(PromptTooLongError) as err:
        model.prepare(prompt="What happens?", video=clip, video_selection=FrameSelection(frames=8))
    message = str(err.value)
    per = plan_video(open_video(clip), FrameSelection(frames=8), 4, 1000).frames[0].tokens
    assert f"8 frames x {per} tokens at num_crops 4" in message
    assert f"at most {(1000 - 1 - (err.value.prompt_tokens - 8 * per)) // per} frames fit" in message
    assert "context is 1000 tokens" in message
    assert decoded == []  # refused before a single frame was decoded
    # the default count follows the context: it fits
    assert model.prepare(prompt="What happens?", video=clip).num_tokens < 1000


def test_bad_video_inputs_are_clear(tiny_model, clip, tmp_path):
    with pytest.raises(VideoError, match="nope.mp4: no such file"):
        tiny_model.ask("?", video=str(tmp_path / "nope.mp4"))
    with pytest.raises(VideoError, match="frames or fps, not both"):
        tiny_model.ask("?", video=clip, frames=2, fps=1)
    with pytest.raises(PromptError, match="video= goes with a prompt"):
        tiny_model.prepare(messages=[{"role": "user", "content": "hi"}], video=clip)
    bad = [{"role": "user", "content": [{"type": "video_url", "video_url": {}}]}]
    with pytest.raises(PromptError, match="message 0, part 0: a 'video_url' part needs"):
        tiny_model.chat(bad)
    bad = [{"role": "user", "content": [{"type": "video", "video": str(clip), "frames": 0}]}]
    with pytest.raises(VideoError, match="message 0, part 0: frames must be"):
        tiny_model.chat(bad)


def test_data_uri_video_part_where_paths_are_refused(tiny_model, clip):
    import base64

    from phi3v.engine.image import ImageSourcePolicy

    server_like = ImageSourcePolicy(allow_paths=False)
    uri = "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()
    part = {"type": "video_url", "video_url": {"url": uri}, "frames": 2}
    via_uri = tiny_model.prepare(messages=[{"role": "user", "content": [part, "What happens?"]}],
                                 image_policy=server_like)
    plain = tiny_model.prepare(prompt="What happens?", video=clip, video_selection=FrameSelection(frames=2))
    assert via_uri.input_ids == plain.input_ids
    assert torch.equal(via_uri.images.pixel_values, plain.images.pixel_values)
    part = {"type": "video_url", "video_url": {"url": str(clip)}}
    with pytest.raises(VideoError, match="video file paths are not allowed here"):
        tiny_model.prepare(messages=[{"role": "user", "content": [part, "?"]}], image_policy=server_like)


def test_frames_are_decoded_one_at_a_time(clip, monkeypatch):
    import phi3v.engine.video as video
    from phi3v.engine.image import ImageSourcePolicy
    from phi3v.engine.video_input import RequestVideos

    decoded = []
    real = video.ContainerReader._decode_at
    monkeypatch.setattr(video.ContainerReader, "_decode_at", lambda self, i: decoded.append(i) or real(self, i))
    videos = RequestVideos(ImageSourcePolicy(), num_crops=4, context=100_000)
    refs = videos.add(clip, FrameSelection(frames=4))
    assert decoded == [0]  # the probe decodes the first frame only (rotation and size)
    media = videos.open_media(refs, ImageSourcePolicy(), 4)
    for n in range(1, len(videos.plans[0].indices) + 1):
        next(media)
        assert decoded[1:] == videos.plans[0].indices[:n]  # each frame decoded when it is reached
    videos.close()
