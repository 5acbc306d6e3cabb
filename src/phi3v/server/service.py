"""One chat-completions request: validate -> phi3v messages -> prepare -> queue -> response or SSE.

Everything a client can get wrong is checked before the request waits for the engine, so a
request joins a batch only once nothing about it can fail: the body's types and ranges (schemas.py),
the model name, image URLs, the image count and the characters of text (here, on the event loop,
all cheap), then the response_format's schema (compiled), the base64, the images, the tokens and
the fit in the context (preparation, in threads with a deadline: preparation.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from .. import __version__
from ..errors import ImageError, Phi3VError, PromptTooLongError, TooManyImagesError, VideoError
from ..engine.constraints import OutputFormat
from ..engine.frame_select import VIDEO_NUM_CROPS
from ..engine.image import ImageSourcePolicy
from ..engine.image_source import InvalidBase64Error, decode_data_uri
from ..options import GenerationOptions
from .api_errors import APIError, context_length_error, from_phi3v_error, internal_error
from .engine_worker import EngineWorker, GenerationJob, QueueFullError
from .prepare_budget import PrepareBudget
from .preparation import Preparer
from .schemas import ChatCompletionRequest, requested_options
from .settings import ServerSettings
from .text_budget import check_prompt_chars, default_max_prompt_chars
from .video_parts import VideoURLSource, fill_default_frames, frames_header, video_bytes, video_part, videos_report

log = logging.getLogger("phi3v.server")

SYSTEM_FINGERPRINT = f"phi3v-{__version__}"
DISCONNECT_POLL_S = 0.25


@dataclass
class Plan:
    """A request checked and converted, before any image is decoded."""

    messages: list  # phi3v messages (data: images as DataURI until decode_images)
    options: GenerationOptions  # max_new_tokens may still be the default
    max_tokens_given: bool
    num_crops: int | None
    stream: bool
    include_usage: bool
    has_images: bool = False
    response_format: Any = None  # schemas.ResponseFormat, or None; made an OutputFormat in preparation
    has_videos: bool = False  # video parts (server/video_parts.py): their bytes read in decode_images
    videos: list | None = None  # once prepared: the frames each video used (video_parts.videos_report)
    video_params: tuple = ()  # where each video part was ("messages[0].content[1]"), for its 400


@dataclass(frozen=True)
class DataURI:
    """An image sent as a data: URI, its base64 decoded later, off the event loop (decode_images)."""

    url: str
    param: str  # where it was in the request, for the 400 if its base64 is bad


class ChatService:
    def __init__(self, model, settings: ServerSettings, worker: EngineWorker, model_id: str,
                 accepted_names: frozenset[str]):
        self.model = model
        self.settings = settings
        self.worker = worker
        self.model_id = model_id
        self.accepted_names = accepted_names
        self.policy = ImageSourcePolicy(
            allow_paths=False,
            allow_remote=settings.allow_remote_images,
            allow_private=settings.allow_private_image_urls,
            timeout_s=settings.remote_timeout_s,
            max_bytes=settings.remote_max_bytes,
            max_pixels=settings.max_image_pixels,
            max_request_pixels=settings.max_request_pixels,
        )
        self.preparer = Preparer(settings.prepare_threads, settings.prepare_timeout_s)
        context = getattr(model, "context_length", None)
        self.max_prompt_chars = settings.max_prompt_chars or (default_max_prompt_chars(context) if context else None)
        # Preparations in flight share a memory budget (estimated from image headers).
        self.prepare_budget = PrepareBudget(settings.prepare_memory_bytes, self.policy,
                                            getattr(model, "default_num_crops", None), settings.max_images)

    def close(self) -> None:
        self.preparer.close()

    # ---- checks that need no image decoding --------------------------------------------
    def plan(self, req: ChatCompletionRequest) -> Plan:
        if req.model not in self.accepted_names:
            raise APIError(404, f"The model `{req.model}` does not exist. This server serves `{self.model_id}`.",
                           param="model", code="model_not_found")
        messages = self._convert_messages(req)
        check_prompt_chars(messages, self.max_prompt_chars)  # before anything is tokenized
        requested = requested_options(req)  # {GenerationOptions field: value or None}
        num_crops = requested["num_crops"] or self.settings.default_num_crops
        max_tokens = requested["max_new_tokens"]
        stop = requested["stop"]
        stop = [stop] if isinstance(stop, str) else list(stop or [])  # at most 4: the schema says so
        try:
            options = GenerationOptions.from_kwargs(**{
                **requested,
                "max_new_tokens": max_tokens or self.settings.default_max_tokens,
                "stop": tuple(stop),
                "num_crops": num_crops,
            })
        except Phi3VError as err:
            raise from_phi3v_error(err) from None
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        has_images = any(isinstance(m["content"], list) and any(p["type"] != "text" for p in m["content"])
                         for m in messages)
        video_params = tuple(p["video"].param for m in messages if isinstance(m["content"], list)
                             for p in m["content"] if p["type"] == "video")
        return Plan(messages, options, max_tokens is not None, num_crops, bool(req.stream), include_usage,
                    has_images, req.response_format, bool(video_params), video_params=video_params)

    def _convert_messages(self, req: ChatCompletionRequest) -> list:
        """OpenAI messages -> phi3v messages; data: URIs kept as DataURI, for decode_images."""
        out, n_images = [], 0
        default_videos = []  # video parts with neither frames nor fps: they share the room left (below)
        for i, msg in enumerate(req.messages):
            role = "system" if msg.role == "developer" else msg.role
            if msg.content is None or isinstance(msg.content, str):
                out.append({"role": role, "content": msg.content or ""})
                continue
            parts = []
            for j, part in enumerate(msg.content):
                param = f"messages[{i}].content[{j}]"
                if part.type == "text":
                    parts.append({"type": "text", "text": part.text})
                    continue
                if role != "user":
                    raise APIError(400, f"{param}: images are only allowed in user messages, not in {msg.role} messages.",
                                   param=param, code="invalid_image")
                if part.type == "video_url":
                    video = video_part(part, param, self.settings.allow_remote_images)
                    parts.append(video)
                    if "fps" not in video and "frames" not in video:
                        default_videos.append(video)
                    n_images += video.get("frames", 0)  # fps: counted once planned (prepare's max_images)
                    if n_images > self.settings.max_images:
                        raise _too_many_frames(self.settings.max_images)
                    continue
                n_images += 1
                if n_images > self.settings.max_images:
                    raise APIError(400, f"Too many images: this server accepts at most {self.settings.max_images} "
                                        f"images per request (over all messages).", param="messages",
                                   code="too_many_images")
                parts.append(self._image_part(part.image_url.url, param))
            out.append({"role": role, "content": parts})
        if default_videos:  # the frames the engine would choose, within the room --max-images leaves
            crops = requested_options(req)["num_crops"] or self.settings.default_num_crops or VIDEO_NUM_CROPS
            fill_default_frames(default_videos, n_images, self.settings.max_images, crops,
                                getattr(self.model, "context_length", None))
        return out

    def _image_part(self, url: str, param: str) -> dict:
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            return {"type": "image", "image": DataURI(url, param)}
        if scheme in ("http", "https"):
            if not self.settings.allow_remote_images:
                raise APIError(400, f"{param}: remote image URLs are disabled on this server; send the image as a "
                                    f"data: URI (data:image/png;base64,...) or start the server with "
                                    f"--allow-remote-images.", param=param, code="invalid_image")
            return {"type": "image_url", "image_url": {"url": url}}
        raise APIError(400, f"{param}: image_url.url must be a data: URI (data:image/png;base64,...)"
                            f"{' or an http(s) URL' if self.settings.allow_remote_images else ''}; "
                            f"got a URL starting with {url[:16]!r}. Local files cannot be named.",
                       param=param, code="invalid_image")

    def _decode_data_uri(self, url: str, param: str) -> bytes:
        """data: URI -> image bytes by the engine's rules (docs/images.md), or a 400 naming what is wrong."""
        try:
            return decode_data_uri(url, max_bytes=self.policy.max_bytes)
        except ImageError as err:
            code = "invalid_base64" if isinstance(err, InvalidBase64Error) else "invalid_image"
            raise APIError(400, f"{param}: {err}", param=param, code=code) from None

    # ---- preparation: the output format, base64, images, tokens (threads, preparation.py) --
    def output_format(self, plan: Plan) -> OutputFormat | None:
        """response_format -> the engine's OutputFormat, compiled now (and cached by content, so a
        schema sent again costs nothing): a schema it cannot use is a 400 before any generation."""
        fmt = plan.response_format
        if fmt is None or fmt.type == "text":
            return None
        try:
            out = OutputFormat.json_object() if fmt.type == "json_object" else \
                OutputFormat.json_schema(fmt.json_schema.json_schema)
            self.model.grammars.check(out)
        except Phi3VError as err:  # OutputFormatError, or no grammar engine installed
            raise APIError(400, f"response_format: {err}", param="response_format",
                           code="invalid_response_format") from None
        return out

    def decode_images(self, plan: Plan) -> Plan:
        """The plan with its data: URIs decoded to bytes (a 400 naming the part if one is bad); with
        videos, also their remote videos and images fetched (each capped by its own limit)."""
        if not plan.has_images:
            return plan
        messages = [m if not isinstance(m["content"], list) else
                    {**m, "content": [self._decoded_part(p, plan.has_videos) for p in m["content"]]}
                    for m in plan.messages]
        return replace(plan, messages=messages)

    def _decoded_part(self, part: dict, fetch_remote: bool) -> dict:
        if isinstance(part.get("image"), DataURI):
            return {**part, "image": self._decode_data_uri(part["image"].url, part["image"].param)}
        if isinstance(part.get("video"), VideoURLSource):
            s = self.settings
            return {**part, "video": video_bytes(part["video"], max_bytes=s.max_video_bytes,
                                                 timeout_s=s.remote_timeout_s, allow_private=s.allow_private_image_urls)}
        if fetch_remote and part.get("type") == "image_url":
            # The request's sources are all bytes before prepare, whose policy then allows a video's
            # size (video_policy): a remote image is fetched here, under the image limit.
            from ..engine.remote_image import fetch_image_bytes

            try:
                data = fetch_image_bytes(part["image_url"]["url"], timeout_s=self.policy.timeout_s,
                                         max_bytes=self.policy.max_bytes, allow_private=self.policy.allow_private)
            except ImageError as err:
                raise APIError(400, f"messages: {err}", param="messages", code="invalid_image") from None
            return {"type": "image", "image": data}
        return part

    def video_policy(self) -> ImageSourcePolicy:
        """The policy of a request with videos: every source is bytes by then, each already capped
        (decode_images), so the byte limit is the larger of the image and video limits."""
        return replace(self.policy, max_bytes=max(self.policy.max_bytes, self.settings.max_video_bytes))

    def prepare(self, plan: Plan):
        """-> (PreparedPrompt, GenerationOptions with the final max_new_tokens). Runs off the loop."""
        try:
            prepared = self.model.prepare(messages=plan.messages, num_crops=plan.num_crops,
                                          image_policy=self.video_policy() if plan.has_videos else self.policy,
                                          max_images=self.settings.max_images if plan.has_videos else None)
        except TooManyImagesError as err:  # a video's fps gave more frames than the limit
            raise _too_many_frames(self.settings.max_images, str(err)) from None
        except VideoError as err:  # a bad video; with one in the request, the 400 names its part
            if len(plan.video_params) != 1:
                raise from_phi3v_error(err) from None
            where = plan.video_params[0]
            text = str(err).removeprefix("video bytes: ")
            raise APIError(400, f"{where}: {text}", param=where, code="invalid_video") from None
        except Phi3VError as err:
            raise from_phi3v_error(err) from None
        options = plan.options
        n_prompt, limit = len(prepared.input_ids), self.model.context_length
        if not plan.max_tokens_given:
            # Default: up to default_max_tokens, less when the prompt leaves less room.
            room = limit - n_prompt
            options = GenerationOptions.from_kwargs(options, max_new_tokens=max(1, min(options.max_new_tokens, room)))
        try:  # OpenAI rule: prompt + max_tokens must fit (check_fits counts both)
            self.model.check_fits(prepared, options.max_new_tokens)
        except PromptTooLongError as err:
            raise context_length_error(prompt_tokens=getattr(err, "prompt_tokens", n_prompt),
                                       image_tokens=getattr(err, "image_tokens", _image_tokens(prepared)),
                                       max_new_tokens=options.max_new_tokens, context_length=limit) from None
        except Phi3VError as err:
            raise from_phi3v_error(err) from None
        return prepared, options

    async def _prepare(self, plan: Plan, *, pool):
        """The output format, base64, then the memory budget, then images and tokens: each
        blocking step in `pool`. -> (PreparedPrompt, GenerationOptions, OutputFormat or None)"""
        loop = asyncio.get_running_loop()
        output_format = None
        if plan.response_format is not None:
            output_format = await loop.run_in_executor(pool, self.output_format, plan)
        plan = await loop.run_in_executor(pool, self.decode_images, plan)
        prepared, options = await self.prepare_budget.run(pool, self.prepare, plan)
        return prepared, options, output_format

    async def admit(self, plan: Plan) -> GenerationJob:
        """Prepare and queue the request; raise APIError (400 / 429) before it waits."""
        if not self.worker.has_room():  # cheap early 429: do not decode images for nothing
            raise _too_busy(self.worker.reject())
        loop = asyncio.get_running_loop()
        try:
            prepared, options, output_format = await self.preparer.run(self._prepare, plan, images=plan.has_images)
        except APIError:
            raise
        except Exception:
            log.exception("preparing a request failed")
            raise internal_error() from None
        plan.videos = videos_report(prepared)  # the worker drops `prepared` when the job ends
        job = GenerationJob(prepared=prepared, options=options, loop=loop, stream=plan.stream,
                            output_format=output_format)
        try:
            self.worker.submit(job)
        except QueueFullError as full:
            raise _too_busy(full) from None
        return job

    # ---- responses ----------------------------------------------------------------------
    async def complete(self, req: ChatCompletionRequest, request: Request) -> dict:
        plan = self.plan(req)
        job = await self.admit(plan)
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        try:
            while True:
                kind, payload = await job.events.get()
                if kind == "done":
                    return self._completion_body(payload, job, plan)
                if kind == "error":
                    raise internal_error()
                if kind == "cancelled":
                    if payload == "shutdown":  # the server stops (shutdown.py): the client may retry
                        raise _shutting_down()
                    raise APIError(499, "The client closed the request.", code="client_closed_request")
        finally:
            watcher.cancel()
            job.cancel()  # no-op once finished; stops the generation if this task was cancelled

    async def stream(self, req: ChatCompletionRequest, request: Request) -> StreamingResponse:
        plan = self.plan(req)
        job = await self.admit(plan)  # errors here still get their HTTP status
        cid, created = _new_id(), int(time.time())

        def chunk(delta: dict, finish_reason=None) -> str:
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.model_id,
                    "system_fingerprint": SYSTEM_FINGERPRINT,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
            if plan.include_usage:
                body["usage"] = None
            return _sse(body)

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    try:
                        kind, payload = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S * 4)
                    except asyncio.TimeoutError:  # still queued or in prefill: is anyone listening?
                        if await request.is_disconnected():
                            return
                        continue
                    if kind == "delta":
                        yield chunk({"content": payload})
                    elif kind == "done":
                        yield chunk({}, _finish_reason(payload.finish_reason))
                        if plan.include_usage:
                            body = self._completion_body(payload, job, plan)
                            yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                                        "model": self.model_id, "system_fingerprint": SYSTEM_FINGERPRINT,
                                        "choices": [], "usage": body["usage"], "phi3v": body["phi3v"]})
                        break
                    elif kind == "error":
                        yield _sse(internal_error().body())
                        break
                    elif payload == "shutdown":  # cancelled: the server stops (shutdown.py); say so
                        yield _sse(_shutting_down().body())
                        break
                    else:  # cancelled: the client went away
                        return
                yield "data: [DONE]\n\n"
            finally:
                job.cancel()  # the client hung up (this generator was closed): stop generating

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                   **frames_header(plan.videos)}  # the frames used: the web page's thumbnails
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    def _completion_body(self, completion, job: GenerationJob, plan: Plan) -> dict:
        usage = completion.usage
        queue_s = (job.started_at or job.submitted_at) - job.submitted_at
        return {
            "id": _new_id(),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_id,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": completion.text, "refusal": None},
                "logprobs": None,
                "finish_reason": _finish_reason(completion.finish_reason),
            }],
            "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                      "total_tokens": usage.prompt_tokens + usage.completion_tokens},
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "phi3v": {
                "image_tokens": usage.image_tokens,
                "num_crops": plan.num_crops or (VIDEO_NUM_CROPS if plan.has_videos else  # videos: the model card's 4
                                                getattr(self.model, "default_num_crops", None)),
                "queue_s": round(queue_s, 4),
                "timings": {k: round(float(v), 4) for k, v in completion.timings.to_dict().items()},
                **({"videos": plan.videos} if plan.videos else {}),
            },
        }


async def _cancel_on_disconnect(request: Request, job: GenerationJob) -> None:
    while not job.cancelled:
        if await request.is_disconnected():
            job.cancel()
            return
        await asyncio.sleep(DISCONNECT_POLL_S)


def _too_busy(full: QueueFullError) -> APIError:
    return APIError(429, f"The server is busy: the request queue is full. Retry after {full.retry_after_s} s.",
                    type="rate_limit_error", code="queue_full", headers={"Retry-After": str(full.retry_after_s)})


def _too_many_frames(max_images: int, detail: str | None = None) -> APIError:
    said = f" ({detail})" if detail else ""
    return APIError(400, f"Too many images: this server accepts at most {max_images} images per request (over all "
                         f"messages; a video's frames count as images){said}. Ask for fewer frames or a lower fps.",
                    param="messages", code="too_many_images")


def _shutting_down() -> APIError:
    return APIError(503, "The server is shutting down; this request was cancelled. Retry it.", type="server_error",
                    code="server_shutting_down", headers={"Retry-After": "1"})


def _image_tokens(prepared) -> int:
    images = getattr(prepared, "images", None)
    return sum(images.num_img_tokens) if images is not None else 0


def _finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def _sse(body: dict) -> str:
    return "data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")) + "\n\n"
