"""Video on the OpenAI-compatible server (issue 14): the `video_url` part with a data: URI, through the
official openai client against a real tiny-checkpoint server on 127.0.0.1.

A video gives the same answer as its chosen frames sent as images; the frames used come back
(phi3v.videos, the stream's X-Phi3V-Video-Frames header); frames count against --max-images;
remote videos only with --allow-remote-images; bad input is a 400 naming the problem and the
server keeps serving; the memory gate counts a video's decoding.
"""

from __future__ import annotations

import http.server
import io
import threading

import httpx
import openai
import pytest

pytest.importorskip("av")

from phi3v.engine.frame_select import FrameSelection
from phi3v.engine.image import ImageSourcePolicy
from phi3v.engine.video import open_video
from phi3v.engine.video_plan import plan_video
from phi3v.server import ServerSettings
from phi3v.server.prepare_budget import BYTES_PER_PIXEL, estimate_prepare_bytes
from phi3v.server.video_budget import CROP_BYTES, DECODER_FRAMES, video_prepare_bytes
from server_harness import RunningServer, data_uri
from video_fixtures import write_video

MAX_IMAGES = 4


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    # 20 frames at 5 fps, one colour per second; 672x336 frames: a 2x1 crop grid at num_crops 4
    return write_video(tmp_path_factory.mktemp("v") / "clip.mp4", seconds=4, fps=5, width=672, height=336)


@pytest.fixture(scope="module")
def server(tiny_model):
    with RunningServer(tiny_model, ServerSettings(max_images=MAX_IMAGES, max_video_bytes=2**20)) as srv:
        yield srv


def video_part(raw: bytes, mime: str = "video/mp4", **selection) -> dict:
    return {"type": "video_url", "video_url": {"url": data_uri(raw, mime)}, **selection}


def ask(client, content, **kwargs):
    return client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=6, temperature=0,
                                          messages=[{"role": "user", "content": content}], **kwargs)


def png_of(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")  # lossless: the server sees exactly the decoded frame
    return buf.getvalue()


def test_a_video_answers_like_its_frames_as_images(server, clip, tiny_model):
    client = server.client()
    raw = clip.read_bytes()
    got = ask(client, [video_part(raw, frames=3), {"type": "text", "text": "What happens?"}])
    with open_video(clip) as reader:
        plan = plan_video(reader, FrameSelection(frames=3), num_crops=4, context=tiny_model.context_length)
        frames = list(reader.frames(plan.indices))
    assert plan.indices == [3, 10, 16]
    images = [{"type": "image_url", "image_url": {"url": data_uri(png_of(f))}} for f in frames]
    ref = ask(client, images + [{"type": "text", "text": "What happens?"}], extra_body={"num_crops": 4})
    assert got.choices[0].message.content == ref.choices[0].message.content
    assert got.usage.prompt_tokens == ref.usage.prompt_tokens
    extra = got.model_extra["phi3v"]
    assert extra["num_crops"] == 4  # videos: the model card's multi-frame setting
    assert extra["image_tokens"] == plan.image_tokens == ref.model_extra["phi3v"]["image_tokens"]
    (video,) = extra["videos"]
    assert [f["index"] for f in video["frames"]] == [3, 10, 16]
    assert [f["time_s"] for f in video["frames"]] == [0.6, 2.0, 3.2]
    assert video["frame_count"] == 20 and (video["width"], video["height"]) == (672, 336)


def test_default_frames_fill_the_room_max_images_leaves(server, clip):
    client = server.client()
    one_image = {"type": "image_url", "image_url": {"url": data_uri(png_of(_solid((30, 30, 200))))}}
    done = ask(client, [one_image, video_part(clip.read_bytes()), {"type": "text", "text": "?"}])
    (video,) = done.model_extra["phi3v"]["videos"]
    assert len(video["frames"]) == MAX_IMAGES - 1  # the image took one of the 4


def test_default_frames_fit_half_a_short_context(tiny_model_dir, clip):
    """The engine's default rule: no more frames than fill half the context (at the costliest frame
    shape, 781 tokens at num_crops 4, the clip's size being unknown yet): 4000 // 2 // 781 = 2."""
    import phi3v

    short = phi3v.load(str(tiny_model_dir), device="cpu", dtype="float32", progress=False, max_context=4000)
    with RunningServer(short, ServerSettings(max_images=8)) as srv:
        done = ask(srv.client(), [video_part(clip.read_bytes()), {"type": "text", "text": "?"}])
    assert [f["index"] for f in done.model_extra["phi3v"]["videos"][0]["frames"]] == [5, 15]


def test_stream_names_the_frames_in_a_header(server, clip):
    body = {"model": server.client().models.list().data[0].id, "max_tokens": 4, "stream": True,
            "messages": [{"role": "user", "content": [video_part(clip.read_bytes(), fps=0.5, start=1),
                                                      {"type": "text", "text": "When does it change?"}]}]}
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        header = r.headers["x-phi3v-video-frames"]
        text = "".join(r.iter_text())
    assert header == "1,3"  # moments 1 s and 3 s: frames 5 and 15
    assert text.rstrip().endswith("data: [DONE]")


def test_pages_of_allowed_origins_may_read_the_frames_header(tiny_model, clip):
    body = {"model": "x", "max_tokens": 1, "stream": True,
            "messages": [{"role": "user", "content": [video_part(clip.read_bytes(), frames=1)]}]}
    with RunningServer(tiny_model, ServerSettings(allowed_origins="http://app.test")) as srv:
        body["model"] = srv.client().models.list().data[0].id
        with httpx.stream("POST", srv.base_url + "/v1/chat/completions", json=body, timeout=120,
                          headers={"Origin": "http://app.test"}) as r:
            assert r.status_code == 200
            assert r.headers["x-phi3v-video-frames"] == "2"  # frame 10 of 20: the middle one
            assert "x-phi3v-video-frames" in r.headers["access-control-expose-headers"].lower()
            r.read()


def test_time_labels_reach_the_prompt(server, clip):
    client = server.client()
    plain = ask(client, [video_part(clip.read_bytes(), frames=2), {"type": "text", "text": "?"}])
    labelled = ask(client, [video_part(clip.read_bytes(), frames=2, time_labels=True),
                            {"type": "text", "text": "?"}])
    assert labelled.usage.prompt_tokens > plain.usage.prompt_tokens  # "frame 1 at 00:01\nframe 2 at 00:03"


def _solid(colour):
    from PIL import Image

    return Image.new("RGB", (32, 32), colour)


def _error(call) -> dict:
    with pytest.raises(openai.BadRequestError) as info:
        call()
    return info.value.body


@pytest.mark.parametrize("part, code, words", [
    ({"frames": MAX_IMAGES + 1}, "too_many_images", "at most 4 images"),
    ({"fps": 5}, "too_many_images", "20 images given, at most 4"),  # counted once planned
    ({"frames": 2, "fps": 1}, "invalid_video", "give frames or fps, not both"),
    ({"start": 3, "end": 2}, "invalid_video", "must be after start"),
    ({"start": 9}, "invalid_video", "past the end of the video"),
])
def test_bad_selection_is_a_400(server, clip, part, code, words):
    body = _error(lambda: ask(server.client(), [video_part(clip.read_bytes(), **part),
                                                {"type": "text", "text": "?"}]))
    assert body["code"] == code and words in body["message"]


def test_bad_videos_are_400s_and_the_server_stays_up(server, clip, tmp_path):
    client = server.client()
    raw = clip.read_bytes()
    cases = [
        (video_part(raw[: len(raw) // 2]), "invalid_video", "not a readable video file"),  # truncated MP4
        (video_part(b"\x00" * 2048), "invalid_video", "not a readable video file"),
        (video_part(raw, mime="image/png"), "invalid_video", "media type 'image/png'"),
        ({"type": "video_url", "video_url": {"url": str(clip)}}, "invalid_video", "Local files cannot be named"),
        ({"type": "video_url", "video_url": {"url": "https://example.com/a.mp4"}}, "invalid_video",
         "remote video URLs are disabled"),
        (video_part(b"\x00" * (2**20 + 10)), "video_too_large", "--max-video-mb"),  # the cap (1 MiB here)
    ]
    for part, code, words in cases:
        body = _error(lambda: ask(client, [{"type": "text", "text": "?"}, part]))
        assert body["code"] == code and words in body["message"], body
        assert body["param"] == "messages[0].content[1]" and body["message"].startswith(body["param"] + ": ")
    assert server.health()["status"] == "ok"
    assert ask(client, [video_part(raw, frames=1), {"type": "text", "text": "?"}]).choices[0].message.content is not None


def test_unknown_field_in_a_video_part_is_refused(server, clip):
    body = _error(lambda: ask(server.client(), [video_part(clip.read_bytes(), frame=2),
                                                {"type": "text", "text": "?"}]))
    assert "frame" in body["message"]


class _OneFile(http.server.BaseHTTPRequestHandler):
    payload = b""

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload)

    def log_message(self, *args):
        pass


def test_remote_video_when_the_operator_allows_it(tiny_model, clip):
    _OneFile.payload = clip.read_bytes()
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OneFile)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{files.server_address[1]}/clip.mp4"
    try:
        remote = {"type": "video_url", "video_url": {"url": url}, "frames": 2}
        with RunningServer(tiny_model, ServerSettings(allow_remote_images=True)) as srv:
            body = _error(lambda: ask(srv.client(), [remote, {"type": "text", "text": "?"}]))
            assert "local or private network address" in body["message"]  # the image fetcher's rule
        settings = ServerSettings(allow_remote_images=True, allow_private_image_urls=True, max_video_bytes=2**20)
        with RunningServer(tiny_model, settings) as srv:
            got = ask(srv.client(), [remote, {"type": "text", "text": "?"}])
            want = ask(srv.client(), [video_part(clip.read_bytes(), frames=2), {"type": "text", "text": "?"}])
            assert got.choices[0].message.content == want.choices[0].message.content
            assert [f["index"] for f in got.model_extra["phi3v"]["videos"][0]["frames"]] == [5, 15]
        with RunningServer(tiny_model, ServerSettings(allow_remote_images=True, allow_private_image_urls=True,
                                                      max_video_bytes=1000)) as srv:
            body = _error(lambda: ask(srv.client(), [remote, {"type": "text", "text": "?"}]))
            assert body["code"] == "video_too_large"
    finally:
        files.shutdown()


def test_the_memory_gate_counts_a_videos_decoding(clip):
    raw = clip.read_bytes()
    policy = ImageSourcePolicy(allow_paths=False)
    part = {"type": "video", "video": raw, "frames": 3}
    estimate = estimate_prepare_bytes([{"role": "user", "content": [part]}], policy, None, video_num_crops=4)
    per_pixel = DECODER_FRAMES * 1.5 + BYTES_PER_PIXEL
    assert estimate == int(len(raw) + 672 * 336 * per_pixel + 3 * 5 * CROP_BYTES)
    # without `frames`: the most frames a request may hold (--max-images)
    part.pop("frames")
    assert estimate_prepare_bytes([{"role": "user", "content": [part]}], policy, None, video_num_crops=4,
                                  max_frames=8) == video_prepare_bytes(raw, 8, 4, policy.max_pixels, BYTES_PER_PIXEL)
    # an unreadable header counts its bytes and frames only: prepare() refuses it with its reason
    assert video_prepare_bytes(b"\x00" * 100, 1, 4, policy.max_pixels, BYTES_PER_PIXEL) == 100 + 5 * CROP_BYTES

