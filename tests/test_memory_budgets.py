"""Every request's memory is bounded (issue 11): pixel budgets checked from image headers before
decoding, reduced-scale JPEG decoding, the server's memory gate for preparations, byte-bounded caches.
"""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from phi3v.engine.feature_cache import ImageFeatureCache
from phi3v.engine.image import ImageSourcePolicy, crop_grid, open_image, open_images
from phi3v.errors import ImageError
from phi3v.server import ServerSettings
from phi3v.server.prepare_budget import BYTES_PER_PIXEL, PrepareBudget, estimate_prepare_bytes
from server_harness import RunningServer, image_part


def _encoded(image: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    """13000x13000 = 169 Mpx, all zero, 1-bit: ~20 KB on disk, >1 GB once decoded and converted."""
    return _encoded(Image.new("1", (13000, 13000)), optimize=True)


@pytest.fixture(scope="module")
def line_png() -> bytes:
    """178,000,000 x 1, 1-bit: once a MemoryError in the image-cache key."""
    return _encoded(Image.new("1", (178_000_000, 1)), optimize=True)


@pytest.fixture(scope="module")
def big_png() -> bytes:
    """36 Mpx (under the 40 Mpx per-image budget), palette mode, a few KB."""
    return _encoded(Image.new("P", (6000, 6000)), optimize=True)


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    """6000x4500 (27 Mpx) photo-like JPEG."""
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (45, 60, 3), dtype=np.uint8))
    return _encoded(small.resize((6000, 4500), Image.Resampling.BILINEAR), "JPEG", quality=80)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


# ---- pixel budgets, from the header ---------------------------------------------------------


@pytest.mark.parametrize("which, size", [("bomb_png", "13000x13000"), ("line_png", "178000000x1")])
def test_pixel_bomb_refused_before_decoding(tiny_model, request, which, size):
    data = request.getfixturevalue(which)
    assert len(data) < 100_000
    before, start = _rss_mb(), time.perf_counter()
    with pytest.raises(ImageError) as err:
        tiny_model.prepare(prompt="What is this?", images=[data])
    elapsed, grown = time.perf_counter() - start, _rss_mb() - before
    message = str(err.value)
    assert message.startswith("image 1 ") and size in message, message
    w, h = map(int, size.split("x"))
    assert f"{w * h:,} pixels" in message and "40,000,000" in message
    assert elapsed < 1.0, f"took {elapsed:.2f} s: was it decoded?"
    assert grown < 50, f"RSS grew {grown:.0f} MB"


def test_no_pillow_warning_or_path_on_stderr(bomb_png, tmp_path):
    """Pillow's DecompressionBombWarning (with its site-packages path) never reaches the terminal."""
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png)
    code = ("import sys; from phi3v.engine.image import open_image\n"
            "try:\n    open_image(sys.argv[1])\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    run = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert run.stdout.startswith("ImageError bomb.png is a PNG image of 13000x13000"), run.stdout
    assert "Warning" not in run.stderr and "site-packages" not in run.stderr, run.stderr


def test_request_pixel_budget_refuses_eight_large_images(tiny_model, big_png):
    start = time.perf_counter()
    with pytest.raises(ImageError, match=r"add up to 288,000,000 decoded pixels.*120,000,000 per request"):
        tiny_model.prepare(prompt="Compare.", images=[big_png] * 8)
    assert time.perf_counter() - start < 1.0  # headers only: nothing was decoded
    # Two of them fit the request budget (72 Mpx); a smaller budget refuses those too.
    with pytest.raises(ImageError, match="per request"):
        list(open_images([big_png] * 2, ImageSourcePolicy(max_request_pixels=50_000_000)))


def test_budgets_configurable(big_png):
    with pytest.raises(ImageError, match="image 2 is a PNG image of 6000x6000 = 36,000,000 pixels"):
        open_images([_encoded(Image.new("RGB", (8, 8))), big_png], ImageSourcePolicy(max_pixels=30_000_000))
    assert open_image(big_png, ImageSourcePolicy(max_pixels=36_000_000)).size == (6000, 6000)


def test_open_images_decodes_lazily_one_at_a_time(big_png):
    small = _encoded(Image.new("RGB", (8, 8)))
    images = open_images([small, big_png], ImageSourcePolicy())  # both headers read, nothing decoded
    first = next(images)
    assert first.size == (8, 8)
    assert next(images).size == (6000, 6000)


# ---- reduced-scale JPEG decoding --------------------------------------------------------------


def test_large_jpeg_decoded_with_draft(big_jpeg):
    full = open_image(big_jpeg)
    assert full.size == (6000, 4500)
    start = time.perf_counter()
    small = open_image(big_jpeg, num_crops=4)
    elapsed = time.perf_counter() - start
    # The HD transform keeps 672x504 at 4 crops: 1/8 scale still covers it.
    assert small.size == (750, 563)
    assert crop_grid(*small.size, 4) == crop_grid(6000, 4500, 4)
    assert elapsed < 0.5
    # 16 crops need more pixels: a smaller reduction.
    assert open_image(big_jpeg, num_crops=16).size == (1500, 1125)


def test_large_jpeg_through_prepare(tiny_model, big_jpeg):
    """The model's prepare decodes at reduced scale: same image tokens as the full decode."""
    from phi3v.engine.image import preprocess

    prepared = tiny_model.prepare(prompt="What is this?", images=[big_jpeg], num_crops=4)
    reference = preprocess([open_image(big_jpeg)], 4)
    assert prepared.images.image_sizes.tolist() == reference.image_sizes.tolist()
    assert prepared.images.num_img_tokens == reference.num_img_tokens
    # Pixels differ only by the decoder's scaling, not in content.
    diff = (prepared.images.pixel_values - reference.pixel_values).abs().mean().item()
    assert diff < 0.1


def test_small_jpeg_decoded_in_full():
    data = _encoded(Image.new("RGB", (500, 375), (10, 120, 200)), "JPEG")
    assert open_image(data, num_crops=16).size == (500, 375)


# ---- the server -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_model):
    with RunningServer(tiny_model, ServerSettings(default_num_crops=1)) as srv:
        srv.model_id = srv.health()["model"]
        yield srv


def _post(srv, images, text="What is this?"):
    import httpx

    body = {"model": srv.model_id, "max_tokens": 2,
            "messages": [{"role": "user", "content": [*map(image_part, images), {"type": "text", "text": text}]}]}
    return httpx.post(srv.base_url + "/v1/chat/completions", json=body, timeout=60)


@pytest.mark.parametrize("which, size", [("bomb_png", "13000x13000"), ("line_png", "178000000x1")])
def test_server_refuses_pixel_bomb_with_400(server, request, which, size):
    start = time.perf_counter()
    r = _post(server, [request.getfixturevalue(which)])
    assert time.perf_counter() - start < 2.0
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_image" and error["message"].startswith("image 1 ")
    assert size in error["message"] and "pixels" in error["message"]
    assert server.health()["status"] == "ok"


def test_server_request_pixel_budget(server, big_png):
    r = _post(server, [big_png] * 8)
    assert r.status_code == 400 and "per request" in r.json()["error"]["message"]


def test_server_pixel_settings(tiny_model, big_png):
    settings = ServerSettings(default_num_crops=1, max_image_pixels=1_000_000)
    with RunningServer(tiny_model, settings) as srv:
        srv.model_id = srv.health()["model"]
        r = _post(srv, [big_png])
        assert r.status_code == 400 and "1,000,000 decoded pixels per image" in r.json()["error"]["message"]


# ---- the preparation memory gate ------------------------------------------------------------


def _plan(*images: bytes):
    content = [{"type": "image", "image": data} for data in images] + [{"type": "text", "text": "hi"}]
    return SimpleNamespace(messages=[{"role": "user", "content": content}], num_crops=None)


def test_estimate_from_headers():
    policy = ImageSourcePolicy()
    img = _encoded(Image.new("RGB", (10, 20)))
    assert estimate_prepare_bytes(_plan(img).messages, policy, None) == 200 * BYTES_PER_PIXEL
    assert estimate_prepare_bytes(_plan().messages, policy, None) == 0  # text only: never waits
    remote = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    assert estimate_prepare_bytes(remote, policy, None) == policy.max_pixels * BYTES_PER_PIXEL


def test_gate_queues_concurrent_large_preparations():
    """Two preparations that each take most of the budget run one after the other; a text-only
    one runs meanwhile; the budget is held until the thread finishes, even if the waiter gives up."""
    img = _encoded(Image.new("RGB", (10, 10)))  # estimated 1200 bytes
    gate = PrepareBudget(2000, ImageSourcePolicy(), None)
    executor = ThreadPoolExecutor(4)
    running, peak, lock = [0], [0], threading.Lock()
    release = threading.Event()

    def prepare(plan):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        release.wait(5)
        with lock:
            running[0] -= 1
        return len(plan.messages[0]["content"])

    async def main():
        big1 = asyncio.create_task(gate.run(executor, prepare, _plan(img)))
        await asyncio.sleep(0.1)
        big2 = asyncio.create_task(gate.run(executor, prepare, _plan(img)))
        await asyncio.sleep(0.1)
        assert gate.snapshot() == {"in_use_bytes": 1200, "waiting": 1}
        text = asyncio.create_task(gate.run(executor, lambda plan: "text", _plan()))
        assert await asyncio.wait_for(text, 2) == "text"  # not behind the queue
        big1.cancel()  # the waiter gives up, but its thread still holds the memory
        await asyncio.sleep(0.1)
        assert gate.snapshot() == {"in_use_bytes": 1200, "waiting": 1}
        release.set()
        assert await asyncio.wait_for(big2, 5) == 2
        assert gate.snapshot() == {"in_use_bytes": 0, "waiting": 0}

    try:
        asyncio.run(main())
    finally:
        release.set()
        executor.shutdown()
    assert peak[0] == 1


def test_gate_cancelled_waiter_lets_the_next_one_in():
    gate = PrepareBudget(100, ImageSourcePolicy(), None)

    async def main():
        await gate.acquire(60)
        first = asyncio.create_task(gate.acquire(90))  # head of the queue, cannot fit
        second = asyncio.create_task(gate.acquire(30))  # would fit, but waits its turn (FIFO)
        await asyncio.sleep(0.05)
        assert not second.done()
        first.cancel()
        await asyncio.wait_for(second, 1)
        assert gate.in_use == 90
        gate.release(30)
        gate.release(60)
        assert gate.snapshot() == {"in_use_bytes": 0, "waiting": 0}

    asyncio.run(main())


def test_request_larger_than_budget_runs_alone():
    gate = PrepareBudget(100, ImageSourcePolicy(), None)
    img = _encoded(Image.new("RGB", (10, 10)))  # 1200 bytes > 100: clipped to the whole budget
    with ThreadPoolExecutor(1) as executor:
        assert asyncio.run(gate.run(executor, lambda plan: "done", _plan(img))) == "done"
    assert gate.in_use == 0


# ---- caches with byte budgets ---------------------------------------------------------------


def test_feature_cache_resize_evicts_to_budget():
    import torch

    cache = ImageFeatureCache(1000)
    for key in "abcd":
        cache.put(key, torch.zeros(50, dtype=torch.float32))  # 200 bytes each
    assert cache.nbytes == 800
    cache.resize(450)
    assert cache.nbytes == 400 and cache.get("a") is None and cache.get("d") is not None
    cache.resize(0)
    assert len(cache) == 0


def test_server_settings_set_cache_budgets(tiny_model_dir):
    import phi3v

    model = phi3v.load(str(tiny_model_dir), device="cpu", dtype="float32", progress=False)
    settings = ServerSettings(default_num_crops=1, image_cache_bytes=4 * 2**20, retained_kv_bytes=2**20)
    with RunningServer(model, settings):
        assert model.images.pixel_cache.max_bytes + model.images.feature_cache.max_bytes == 4 * 2**20
        assert model.conversation.max_bytes == 2**20


def test_retained_conversation_byte_budget(tiny_model_dir):
    import phi3v

    model = phi3v.load(str(tiny_model_dir), device="cpu", dtype="float32", progress=False)
    model.ask("Hello there, how are you?", max_new_tokens=3, temperature=0)
    assert model.conversation.retained is not None
    model.conversation.max_bytes = 16  # smaller than any KV cache
    model.ask("Hello there, how are you?", max_new_tokens=3, temperature=0)
    assert model.conversation.retained is None


# ---- freed heap memory goes back to the OS ------------------------------------------------------


def test_heap_trim_returns_freed_memory():
    """glibc keeps freed buffers of a few MB in its arenas; trim_heap hands them back."""
    from phi3v.server import heap_trim

    if heap_trim._malloc_trim is None:
        pytest.skip("not glibc")
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    # Raise the mmap threshold as a freed large block does, then fill and free 200 MB of 512 KiB
    # blocks (below the threshold whether the server pinned it at 1 MiB or glibc raised it).
    big = libc.malloc(8 << 20)
    libc.free(big)
    blocks = [libc.malloc(1 << 19) for _ in range(400)]
    for b in blocks:
        libc.memset(b, 1, 1 << 19)
    for b in blocks[:-1]:  # the last one keeps the heap's top in use: only a trim frees below it
        libc.free(b)
    before = _rss_mb()
    assert heap_trim.trim_heap()
    assert _rss_mb() < before - 100
    libc.free(blocks[-1])


def test_pinned_mmap_threshold_gives_large_buffers_back_at_free():
    """After a large free glibc would keep the next 4 MB buffers in its arenas; pinned, each is a
    mapping of its own and leaves RSS when freed."""
    from phi3v.server import heap_trim

    if heap_trim._malloc_trim is None:
        pytest.skip("not glibc")
    import ctypes

    assert heap_trim.pin_mmap_threshold()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    libc.free(libc.malloc(32 << 20))  # what would raise glibc's dynamic threshold to 32 MB
    blocks = [libc.malloc(4 << 20) for _ in range(50)]
    for b in blocks:
        libc.memset(b, 1, 4 << 20)
    filled = _rss_mb()
    for b in blocks:
        libc.free(b)
    assert _rss_mb() < filled - 150  # 200 MB handed back at free(), no trim needed


def test_heap_trimmer_thread_starts_and_stops():
    from phi3v.server.heap_trim import HeapTrimmer, _malloc_trim

    off = HeapTrimmer(0)
    off.start()
    assert off._thread is None
    on = HeapTrimmer(0.01)
    on.start()
    assert (on._thread is not None) == (_malloc_trim is not None)
    time.sleep(0.05)
    on.stop()
    assert on._thread is None


def test_serve_flags_for_memory_budgets():
    from phi3v.cli.main import build_parser
    from phi3v.cli.serve import settings_from_args

    args = build_parser().parse_args(["serve", "--max-image-mpx", "0.5", "--max-request-mpx", "2",
                                      "--prepare-memory-mb", "64", "--image-cache-mb", "0",
                                      "--retained-kv-mb", "1", "--heap-trim-s", "0"])
    settings = settings_from_args(args)
    assert (settings.max_image_pixels, settings.max_request_pixels) == (500_000, 2_000_000)
    assert (settings.prepare_memory_bytes, settings.image_cache_bytes) == (64 * 2**20, 0)
    assert (settings.retained_kv_bytes, settings.heap_trim_s) == (2**20, 0)
