"""The server's engine worker never dies from a request, and one request never fails another.

Real server on loopback with the tiny checkpoint; failures are injected at the worker's seams
(start_row: encoding a request's images; the loop's step: one decode step of the batch).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from phi3v.server import ServerSettings
from phi3v.server.engine_worker import EngineWorker
from server_harness import RunningServer, image_part, png_bytes

IMG = png_bytes(40, 30, seed=21)


def request(model_id, text="What is this?", max_tokens=4, **kw):
    content = [image_part(IMG), {"type": "text", "text": text}]
    return dict(model=model_id, messages=[{"role": "user", "content": content}], max_tokens=max_tokens,
                temperature=0, **kw)


class Injected:
    """The tiny model; its loops' steps can be slowed, or made to fail once."""

    def __init__(self, model):
        self._model = model
        self.step_delay = 0.0
        self.fail_step = False

    def __getattr__(self, name):
        return getattr(self._model, name)

    def new_loop(self, *args, **kwargs):
        loop = self._model.new_loop(*args, **kwargs)
        step = loop.step

        def injected_step():
            time.sleep(self.step_delay)
            if self.fail_step and loop.running:
                self.fail_step = False
                # what a failing decoder call does: the loop marks the rows of the step as failed
                loop._fail_running(RuntimeError("simulated decode failure /secret/path"))
                raise RuntimeError("simulated decode failure /secret/path")
            return step()

        loop.step = injected_step
        return loop


@pytest.fixture()
def injected(tiny_model):
    return Injected(tiny_model)


def test_identical_requests_queued_behind_a_stream_all_get_answers(injected, tiny_model):
    """Finding 1 of the issue: A (plain), S (streamed) and B (plain), equal in image, text and
    num_crops, queued while a long stream runs, killed the engine thread (jobs compared by value).
    Now all three are answered, equal to a run alone, and the server stays healthy."""
    injected.step_delay = 0.01
    with RunningServer(injected, ServerSettings(max_queue=8, default_num_crops=1)) as srv:
        model_id = srv.health()["model"]
        client = srv.client()
        long_stream = client.chat.completions.create(**request(model_id, "long", max_tokens=400), stream=True)
        next(iter(long_stream))
        with ThreadPoolExecutor(3) as pool:
            a = pool.submit(client.chat.completions.create, **request(model_id))
            s = pool.submit(lambda: "".join(c.choices[0].delta.content or "" for c in
                                            client.chat.completions.create(**request(model_id), stream=True)
                                            if c.choices))
            b = pool.submit(client.chat.completions.create, **request(model_id))
            texts = [a.result(20).choices[0].message.content, s.result(20), b.result(20).choices[0].message.content]
        long_stream.close()
        health = srv.wait_health(lambda h: h["queue"]["running"] == 0)
        assert health["status"] == "ok" and srv.worker.alive
    ref = tiny_model.chat([{"role": "user", "content": [{"type": "image", "image": IMG},
                                                        {"type": "text", "text": "What is this?"}]}],
                          max_new_tokens=4, num_crops=1).text
    assert texts == [ref, ref, ref]


def test_a_failed_decode_step_fails_its_requests_and_the_engine_goes_on(injected):
    with RunningServer(injected, ServerSettings(default_num_crops=1)) as srv:
        model_id = srv.health()["model"]
        client = srv.client()
        injected.fail_step = True
        with pytest.raises(openai.InternalServerError) as err:
            client.chat.completions.create(**request(model_id))
        assert "secret" not in str(err.value) and "Traceback" not in str(err.value)
        after = client.chat.completions.create(**request(model_id))
        assert after.usage.completion_tokens == 4
        health = srv.health()
        assert health["status"] == "ok" and health["queue"]["failed"] == 1 and health["queue"]["served"] == 1


def test_a_request_that_fails_to_start_does_not_touch_the_running_ones(injected, tiny_model):
    injected.step_delay = 0.01
    real_start = tiny_model.start_row

    def start_row(prepared, options, **kw):
        if prepared.prompt_text.find("poison") >= 0:
            raise RuntimeError("cannot start this one")
        return real_start(prepared, options, **kw)

    injected.start_row = start_row
    with RunningServer(injected, ServerSettings(default_num_crops=1)) as srv:
        model_id = srv.health()["model"]
        client = srv.client()
        stream = iter(client.chat.completions.create(**request(model_id, "steady", max_tokens=30), stream=True))
        first = next(stream).choices[0].delta.content or ""
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(**request(model_id, "poison"))
        rest = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert srv.health()["status"] == "ok"
    ref = tiny_model.chat([{"role": "user", "content": [{"type": "image", "image": IMG},
                                                        {"type": "text", "text": "steady"}]}],
                          max_new_tokens=30, num_crops=1).text
    assert first + rest == ref


def test_a_dead_worker_turns_unhealthy_and_ends_the_process(tiny_model):
    """Only when the worker thread itself cannot continue: on_fatal runs (the server exits 70)."""
    ended = threading.Event()

    class Broken:
        def __getattr__(self, name):
            return getattr(tiny_model, name)

        def new_loop(self, *a, **kw):
            raise MemoryError("no memory for a loop")

    worker = EngineWorker(Broken(), max_queue=4, on_fatal=ended.set)
    worker.start()
    assert ended.wait(10)
    assert not worker.alive


def test_jobs_and_prompts_compare_by_identity(tiny_model):
    """Equal-looking requests are different jobs: comparing them never touches their tensors."""
    import asyncio

    from phi3v.server.engine_worker import GenerationJob

    prepared = [tiny_model.prepare(prompt="Same?", images=[IMG]) for _ in range(2)]
    assert prepared[0] != prepared[1] and prepared[0] == prepared[0]
    loop = asyncio.new_event_loop()
    try:
        jobs = [GenerationJob(p, None, loop, stream=False) for p in prepared]
        assert jobs[0] != jobs[1] and jobs.index(jobs[1]) == 1
    finally:
        loop.close()
