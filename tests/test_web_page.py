"""The web page at / in a real headless Chromium (Debian's package, driven by Playwright).

Upload an image, ask, watch the answer stream in, ask a follow-up about the same image; the
page's greedy answers must equal the Python API's for the same conversation.
Needs `chromium` (apt) and `playwright` (pip; its browser downloads are never used). Outside CI a
missing browser skips the test; in CI (CI=true) it fails, so the check cannot silently vanish.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from phi3v.server import ServerSettings
from server_harness import RunningServer, png_bytes

CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-extensions", "--no-first-run"]


def chromium_path() -> str | None:
    for candidate in (os.environ.get("PHI3V_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def _need(what: str):
    if os.environ.get("CI", "").lower() in ("1", "true"):
        pytest.fail(f"{what} is required in CI (scripts/dev-setup.sh installs it)")
    pytest.skip(f"{what} is not installed")


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need("the playwright package")
    exe = chromium_path()
    if exe is None:
        _need("Debian's chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


class PacedLoop:
    """A generation loop whose steps come 40 ms apart, the pace of a real model on a GPU, so the
    browser gets (and paints) the pieces one by one instead of in one network read."""

    def __init__(self, loop):
        self._loop = loop

    def step(self):
        time.sleep(0.04)
        return self._loop.step()

    def __getattr__(self, name):  # add, cancel, busy
        return getattr(self._loop, name)


class PacedModel:
    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def new_loop(self, *args, **kwargs):
        return PacedLoop(self._model.new_loop(*args, **kwargs))


@pytest.fixture(scope="module")
def server(tiny_model):
    with RunningServer(PacedModel(tiny_model), ServerSettings(default_num_crops=2)) as srv:
        yield srv


# Counts the distinct texts the newest answer bubble has shown: > 1 means it filled in piece by piece.
WATCH_ANSWERS = """() => {
  window.__answerStates = [];
  new MutationObserver(() => {
    const all = document.querySelectorAll('.msg.assistant .text');
    if (!all.length) return;
    const t = all[all.length - 1].textContent;
    const s = window.__answerStates;
    if (t && s[s.length - 1] !== t) s.push(t);
  }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
}"""


def test_upload_ask_stream_and_follow_up(browser, server, tiny_model, tmp_path):
    image = tmp_path / "noise.png"
    image.write_bytes(png_bytes(64, 48, seed=21))
    page = browser.new_page()
    bodies = []
    page.on("request", lambda req: bodies.append(json.loads(req.post_data))
            if req.url.endswith("/v1/chat/completions") else None)
    external = []
    page.on("request", lambda req: external.append(req.url) if not req.url.startswith(server.base_url) else None)
    try:
        page.goto(server.base_url + "/")
        page.wait_for_function("document.getElementById('status').textContent === 'ready'")
        page.set_input_files("#file-input", str(image))
        page.wait_for_selector("#thumbs img")
        page.select_option("#num-crops", "1")
        page.fill("#max-tokens", "8")
        page.evaluate(WATCH_ANSWERS)

        # first question, about the uploaded image
        page.fill("#prompt", "What is in this picture?")
        page.click("#send")
        page.wait_for_selector(".msg.assistant[data-done='1']", timeout=60_000)
        first = page.locator(".msg.assistant .text").nth(0).text_content()
        states = page.evaluate("window.__answerStates")
        assert page.locator("#error").is_hidden()
        assert len(states) > 1 and states[-1] == first  # the text grew over several updates
        assert page.locator("#thumbs img").count() == 0  # the image moved into the conversation
        assert page.locator(".msg.user .imgs img").count() == 1
        stats = page.locator(".msg.assistant .stats").nth(0).text_content()
        assert "image" in stats and "generated" in stats and "first token" in stats and "num_crops 1" in stats

        history = [{"role": "user", "content": [{"type": "image", "image": image.read_bytes()},
                                                {"type": "text", "text": "What is in this picture?"}]}]
        ref = tiny_model.chat(history, max_new_tokens=8, num_crops=1)
        assert first == ref.text

        # follow-up: same conversation, same image, no new upload
        page.evaluate(WATCH_ANSWERS)
        page.fill("#prompt", "And what colour is it?")
        page.press("#prompt", "Enter")  # Enter sends, like the button
        page.wait_for_function("document.querySelectorAll(\".msg.assistant[data-done='1']\").length === 2",
                               timeout=60_000)
        second = page.locator(".msg.assistant .text").nth(1).text_content()
        history += [{"role": "assistant", "content": first},
                    {"role": "user", "content": [{"type": "text", "text": "And what colour is it?"}]}]
        ref2 = tiny_model.chat(history, max_new_tokens=8, num_crops=1)
        assert second == ref2.text
        assert len(page.evaluate("window.__answerStates")) > 1

        assert len(bodies) == 2
        sent = bodies[1]
        assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
        assert sent["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
        assert sent["stream"] is True and sent["num_crops"] == 1
        assert external == []  # offline page: nothing fetched from anywhere else
        if os.environ.get("PHI3V_SCREENSHOT"):
            page.screenshot(path=os.environ["PHI3V_SCREENSHOT"], full_page=True)
    finally:
        page.close()


def test_error_from_server_is_shown(browser, server):
    page = browser.new_page()
    try:
        page.goto(server.base_url + "/")
        page.wait_for_function("document.getElementById('status').textContent === 'ready'")
        page.fill("#max-tokens", "999999999")  # more than the context: the server answers 400
        page.fill("#prompt", "hello")
        page.click("#send")
        page.wait_for_selector("#error:visible", timeout=30_000)
        text = page.locator("#error").text_content()
        assert "HTTP 400" in text and "maximum context length" in text
        assert page.locator(".msg.assistant").count() == 0
        assert not page.locator("#send").is_disabled()
    finally:
        page.close()
