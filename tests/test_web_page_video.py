"""The web page with a video (issue 14), in a real headless Chromium like tests/test_web_page.py.

Pick a video: a thumbnail (its first frame) waits with the next question. Ask: the page sends the
video whole as a data: URI `video_url` part; the server chooses the frames and names their times
(X-Phi3V-Video-Frames); the page draws those moments from its file as thumbnails in the question's
bubble, and the answer streams in. Each second of the clip has its own colour, so the thumbnails'
colours show that the page drew the frames the server chose. The answer equals the Python API's.
"""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("av")

from phi3v.server import ServerSettings
from server_harness import RunningServer
from test_web_page import WATCH_ANSWERS, PacedModel, browser  # noqa: F401  (browser: the fixture)
from video_fixtures import colour_at, write_video

# Reads each thumbnail's colour at its right half (clear of the white bar on the left quarter).
THUMB_COLOURS = """() => [...document.querySelectorAll('.msg.user .frames img')].map((img) => {
  const c = document.createElement('canvas');
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  const g = c.getContext('2d');
  g.drawImage(img, 0, 0);
  const d = g.getImageData(Math.floor(c.width * 3 / 4), Math.floor(c.height / 2), 1, 1).data;
  return [d[0], d[1], d[2], Number(img.dataset.time)];
})"""


@pytest.fixture(scope="module")
def server(tiny_model):
    with RunningServer(PacedModel(tiny_model), ServerSettings(max_images=6)) as srv:
        yield srv


def test_pick_a_video_see_its_frames_and_the_answer(browser, server, tiny_model, tmp_path):  # noqa: F811
    clip = write_video(tmp_path / "clip.webm", seconds=4, fps=5, codec="libvpx-vp9", width=96, height=64)
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    console = []
    page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: console.append(str(e)))
    bodies = []
    page.on("request", lambda req: bodies.append(json.loads(req.post_data))
            if req.url.endswith("/v1/chat/completions") else None)
    try:
        page.goto(server.base_url + "/")
        page.wait_for_function("document.getElementById('status').textContent === 'ready'")
        page.set_input_files("#file-input", str(clip))
        page.wait_for_selector("#thumbs .thumb.video img[src^='data:image/png']")  # its first frame
        page.fill("#video-frames", "3")
        page.fill("#max-tokens", "8")
        page.evaluate(WATCH_ANSWERS)
        page.fill("#prompt", "What happens in this video?")
        page.click("#send")
        page.wait_for_selector(".msg.assistant[data-done='1']", timeout=60_000)
        page.wait_for_function("document.querySelectorAll('.msg.user .frames img').length === 3", timeout=30_000)

        assert page.locator("#error").is_hidden()
        answer = page.locator(".msg.assistant .text").nth(0).text_content()
        assert len(page.evaluate("window.__answerStates")) > 1  # it streamed in
        (sent,) = bodies
        part = sent["messages"][0]["content"][0]
        assert part["type"] == "video_url" and part["frames"] == 3
        assert part["video_url"]["url"].startswith("data:video/webm;base64,")

        # the frames the server chose (20 frames, 3 of them: 3, 10, 16 at 0.6, 2.0, 3.2 s), in their colours
        shots = page.evaluate(THUMB_COLOURS)
        assert [s[3] for s in shots] == [0.6, 2.0, 3.2]
        for r, g, b, t in shots:
            want = colour_at(int(t))
            assert max(abs(r - want[0]), abs(g - want[1]), abs(b - want[2])) <= 24, (t, (r, g, b), want)
        captions = page.locator(".msg.user .frames figcaption").all_text_contents()
        assert captions == ["0:00.6", "0:02.0", "0:03.2"]

        ref = tiny_model.chat([{"role": "user", "content": [
            {"type": "video", "video": clip.read_bytes(), "frames": 3},
            {"type": "text", "text": "What happens in this video?"}]}], max_new_tokens=8)
        assert answer == ref.text
        assert console == []
        if os.environ.get("PHI3V_SCREENSHOT"):
            page.screenshot(path=os.environ["PHI3V_SCREENSHOT"], full_page=True)
    finally:
        page.close()


def test_a_bad_video_shows_the_servers_error(browser, server, tmp_path):  # noqa: F811
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00" * 4096)
    page = browser.new_page()
    console = []
    page.on("pageerror", lambda e: console.append(str(e)))
    try:
        page.goto(server.base_url + "/")
        page.wait_for_function("document.getElementById('status').textContent === 'ready'")
        page.set_input_files("#file-input", str(bad))
        page.wait_for_selector("#thumbs .thumb.video .missing")  # no first frame to show: a grey tile
        page.fill("#prompt", "What happens?")
        page.click("#send")
        page.wait_for_selector("#error:visible", timeout=30_000)
        text = page.locator("#error").text_content()
        assert "HTTP 400" in text and "not a readable video file" in text
        assert page.locator("#thumbs .thumb.video").count() == 1  # given back, to retry
        assert console == []  # the 400 is shown, not thrown
    finally:
        page.close()
