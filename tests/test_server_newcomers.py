"""A request joining the server's continuous batch does its work a piece per decode step.

Real server on loopback with the tiny checkpoint: a newcomer's images go through the vision tower
at most --vision-chunk crops per step while a stream runs (the stream gets a token between any two
pieces), a client that hangs up in the vision stage stops it, and a failure in one newcomer's
vision fails that request only.
"""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from phi3v.server import ServerSettings
from server_harness import RunningServer, image_part, png_bytes

def three_images(seed: int) -> list[bytes]:
    """Images no other test sends (the feature cache would skip their vision stage)."""
    return [png_bytes(420, 200, seed=seed), png_bytes(300, 400, seed=seed + 1), png_bytes(500, 500, seed=seed + 2)]


def with_images(model_id, images) -> dict:
    """A request body: three images at num_crops 4 (13 crops through the vision tower), 3 tokens."""
    content = [image_part(raw) for raw in images] + [{"type": "text", "text": "Compare them."}]
    return dict(model=model_id, messages=[{"role": "user", "content": content}], max_tokens=3, temperature=0,
                num_crops=4)


class Traced:
    """The tiny model; its loops record ("piece", crops) at each CLIP call and ("token", rows
    without images) after each step, and each CLIP call can be slowed or made to fail."""

    def __init__(self, model):
        self._model = model
        self.events: list[tuple] = []
        self.piece_delay = 0.0
        self.fail_pieces = False
        self._lock = threading.Lock()
        vision = model.module.model.vision_embed_tokens
        self._real_encode = vision.encode_crops

    def __getattr__(self, name):
        return getattr(self._model, name)

    def encode_crops(self, crops):
        with self._lock:
            self.events.append(("piece", int(crops.shape[0])))
        time.sleep(self.piece_delay)
        if self.fail_pieces:
            raise RuntimeError("the vision tower failed on this request")
        return self._real_encode(crops)

    def new_loop(self, *args, **kwargs):
        loop = self._model.new_loop(*args, **kwargs)
        step = loop.step

        def traced_step():
            events = step()
            text_rows = sum(1 for row, _ in events if not row.image_embeds and row.features is None
                            and row.finish_reason != "error")
            with self._lock:
                self.events.append(("step", text_rows))
            return events

        loop.step = traced_step
        return loop


@pytest.fixture()
def traced(tiny_model, monkeypatch):
    traced = Traced(tiny_model)
    monkeypatch.setattr(tiny_model.module.model.vision_embed_tokens, "encode_crops", traced.encode_crops)
    return traced


def stream_text(model_id):
    """A text-only stream that runs long (the tiny model's greedy answer to "go" does not stop early)."""
    return dict(model=model_id, messages=[{"role": "user", "content": "go"}], max_tokens=400, temperature=0,
                stream=True)


def test_a_newcomers_vision_pieces_alternate_with_the_streams_tokens(traced, tiny_model):
    settings = ServerSettings(default_num_crops=1, vision_chunk=1, prefill_chunk=32)
    with RunningServer(traced, settings) as srv:
        model_id = srv.health()["model"]
        client = srv.client()
        stream = iter(client.chat.completions.create(**stream_text(model_id)))
        next(stream), next(stream)  # role chunk, then text: the stream is decoding
        traced.events.clear()
        images = three_images(31)
        body = with_images(model_id, images)
        answer = client.chat.completions.create(extra_body={"num_crops": body.pop("num_crops")}, **body)
        stream_alive = srv.health()["queue"]["running"] == 1
        events = list(traced.events)
        stream.close()
        srv.wait_health(lambda h: h["queue"]["running"] == 0)
    assert stream_alive, "the stream must outlive the newcomer for this test to mean anything"
    pieces = [e for e in events if e[0] == "piece"]
    assert len(pieces) >= 10 and all(n == 1 for _, n in pieces), "one crop per CLIP call while the stream runs"
    tokens_since_piece = None
    for e in events:
        if e[0] == "piece":
            assert tokens_since_piece in (None, 1), "two vision pieces without a stream token between"
            tokens_since_piece = 0
        elif tokens_since_piece is not None:
            tokens_since_piece = min(1, tokens_since_piece + e[1])
    alone = tiny_model.chat([{"role": "user", "content": [{"type": "image", "image": raw} for raw in images]
                              + [{"type": "text", "text": "Compare them."}]}], max_new_tokens=3, num_crops=4)
    assert answer.choices[0].message.content == alone.text


def test_hanging_up_in_the_vision_stage_stops_its_pieces(traced):
    traced.piece_delay = 0.4
    with RunningServer(traced, ServerSettings(default_num_crops=1, vision_chunk=1)) as srv:
        model_id = srv.health()["model"]
        before = srv.health()["queue"]
        body = with_images(model_id, three_images(41))
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.base_url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=0.6))
        health = srv.wait_health(lambda h: h["queue"]["cancelled"] > before["cancelled"]
                                 and h["queue"]["running"] == 0)
        time.sleep(0.5)
        pieces = [e for e in traced.events if e[0] == "piece"]
        assert health["queue"]["served"] == before["served"]
        assert 1 <= len(pieces) < 4, "it stopped in its vision stage (the model's pieces: 4 crops alone)"
        assert srv.worker.snapshot()["kv_bytes"] == 0
        traced.piece_delay = 0.0
        after = srv.client().chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=2)
        assert after.usage.completion_tokens == 2


def test_a_failure_in_a_newcomers_vision_fails_only_that_request(traced, tiny_model):
    with RunningServer(traced, ServerSettings(default_num_crops=1, vision_chunk=1)) as srv:
        model_id = srv.health()["model"]
        client = srv.client()
        stream = iter(client.chat.completions.create(**dict(stream_text(model_id), max_tokens=60)))
        first = next(stream).choices[0].delta.content or ""
        traced.fail_pieces = True
        body = with_images(model_id, three_images(51))
        with pytest.raises(openai.InternalServerError) as err:
            client.chat.completions.create(extra_body={"num_crops": body.pop("num_crops")}, **body)
        traced.fail_pieces = False
        assert "vision tower failed" not in str(err.value)  # nothing internal named
        rest = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        health = srv.health()
        assert health["status"] == "ok" and health["queue"]["failed"] == 1
    assert first + rest == tiny_model.chat([{"role": "user", "content": "go"}], max_new_tokens=60).text
