"""--server URL (or PHI3V_SERVER): the answer commands ask a running `phi3v serve` instead of
loading the model here, so repeated commands skip the load (as `ollama run` uses its server).

The request is the OpenAI-compatible POST /v1/chat/completions the server offers: the images as
data: URIs (a local file's own bytes; stdin and URL images re-encoded as PNG), the prompt, the
generation options under their request field names (phi3v.options.OPTIONS), --schema and table
--format json as response_format json_schema. The reply is streamed (SSE, stream_options
include_usage) and printed as the local answer is; its last chunk's usage and phi3v timings
make the Completion that --json and --verbose print. Standard library only (urllib).

The model sent is the one the server lists at GET /v1/models, unless --model was given on the
command line (then the server refuses a model it does not serve). An API key comes from
PHI3V_API_KEY (the variable `phi3v serve` reads too). A server that is down, unreachable or not
phi3v is one error line with a hint; so is any error the server answers.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass

from ..errors import Phi3VError
from ..options import OPTIONS
from .configuration import configurable
from .output import Spinner, finish_answer, write_answer_delta

SERVER_ENV = "PHI3V_SERVER"
FRAMES_HEADER = "X-Phi3V-Video-Frames"  # server/video_parts.py: the times of a video's frames, on a stream
API_KEY_ENV = "PHI3V_API_KEY"
CONNECT_TIMEOUT_S = 10.0  # GET /v1/models: a server that is up answers at once
ANSWER_TIMEOUT_S = 600.0  # between two chunks of the reply (a long prefill on CPU sends nothing for a while)
HINT_DOWN = (f"start one with `phi3v serve`, check the URL, or drop --server (and unset {SERVER_ENV}) "
             "to load the model here")


def add_server_flag(parser) -> None:
    """--server URL on an answer command; PHI3V_SERVER or `server = "..."` in the config file too."""
    configurable(parser.add_argument(
        "--server", default=None, metavar="URL",
        help=f"ask a running `phi3v serve` at URL (e.g. http://127.0.0.1:8000) instead of loading the model "
             f"here (environment: {SERVER_ENV})"))


def base_url(url: str) -> str:
    """http://host:port[/prefix] without a trailing / or /v1; other schemes are an error."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise Phi3VError(f"--server must be an http:// or https:// URL, got {url!r}")
    return url[:-3].rstrip("/") if url.endswith("/v1") else url


@dataclass
class ServedModel:
    """What the answer report prints as "model", "device" and "dtype" for a server's answer."""

    name: str
    device: str
    dtype: str = "unknown"  # the server does not say
    default_num_crops: int | None = None
    video_frame_times: list[float] | None = None  # a video's frames (seconds), as the server reported them


def _request(url: str, body: dict | None = None) -> urllib.request.Request:
    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers.update({"Content-Type": "application/json", "Accept": "text/event-stream"})
    if os.environ.get(API_KEY_ENV):
        headers["Authorization"] = f"Bearer {os.environ[API_KEY_ENV]}"
    return urllib.request.Request(url, data=data, headers=headers, method="POST" if body is not None else "GET")


def _server_error(base: str, err: urllib.error.HTTPError) -> Phi3VError:
    """The server's own error message (OpenAI shape) as one line."""
    try:
        message = json.loads(err.read().decode("utf-8", "replace"))["error"]["message"]
    except Exception:  # not phi3v, or not JSON: the status alone
        message = err.reason
    failure = Phi3VError(f"the server at {base} answered {err.code}: {' '.join(str(message).split())}"[:500])
    if err.code == 401:
        failure.cli_hint = f"set {API_KEY_ENV} to the server's --api-key"
    elif err.code == 404:
        failure.cli_hint = "is it a phi3v server? (GET /v1/models lists what it serves)"
    return failure


def _unreachable(base: str, err: Exception) -> Phi3VError:
    reason = getattr(err, "reason", err)
    failure = Phi3VError(f"cannot reach a phi3v server at {base}: {reason}")
    failure.cli_hint = HINT_DOWN
    return failure


def served_model_id(base: str) -> str:
    """The id the server lists at GET /v1/models (also: is it up?)."""
    try:
        with urllib.request.urlopen(_request(f"{base}/v1/models"), timeout=CONNECT_TIMEOUT_S) as resp:
            listing = json.loads(resp.read().decode())
        return listing["data"][0]["id"]
    except urllib.error.HTTPError as err:
        raise _server_error(base, err) from None
    except (urllib.error.URLError, socket.timeout, ConnectionError) as err:
        raise _unreachable(base, err) from None
    except (ValueError, KeyError, IndexError, TypeError):
        raise Phi3VError(f"{base}/v1/models did not answer as a phi3v (OpenAI-compatible) server") from None


def image_data_uri(cli_image) -> str:
    """A data: URI of one CliImage: a local file's bytes as they are, anything else as PNG."""
    path = cli_image.label
    if path not in ("<stdin>",) and not path.startswith(("http://", "https://")) and os.path.isfile(
            os.path.expanduser(path)):
        with open(os.path.expanduser(path), "rb") as f:
            raw = f.read()
        mime = f"image/{(cli_image.format or 'png').lower()}"
    else:
        buf = io.BytesIO()
        cli_image.image.save(buf, format="PNG")
        raw, mime = buf.getvalue(), "image/png"
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


VIDEO_MIME = {".mp4": "video/mp4", ".m4v": "video/mp4", ".mov": "video/quicktime", ".mkv": "video/x-matroska",
              ".webm": "video/webm", ".avi": "video/x-msvideo", ".mpg": "video/mpeg", ".mpeg": "video/mpeg",
              ".gif": "image/gif", ".webp": "image/webp"}


def video_part(source: str, selection: dict) -> dict:
    """The `video_url` content part (docs/server.md "Video") of a local clip: its bytes as a data:
    URI, with the frame selection keys that were given (the server picks the frames by the same
    rules; without frames/fps it fits them to its --max-images)."""
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        raise Phi3VError(f"{source}: a folder of frames cannot be sent with --server (the server takes video "
                         "files); run it without --server, or make a video of the frames")
    mime = VIDEO_MIME.get(os.path.splitext(path)[1].lower(), "video/mp4")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise Phi3VError(f"{source}: {err.strerror or err}") from None
    keys = {k: v for k, v in selection.items() if v is not None and v is not False}
    return {"type": "video_url", "video_url": {"url": f"data:{mime};base64,{base64.b64encode(raw).decode()}"}, **keys}


def request_body(model_id: str, prompt: str, images, options, args, video: dict | None = None) -> dict:
    """The chat completion request of one answer command (`video`: a video_part, instead of images)."""
    if getattr(args, "regex", None) is not None or getattr(args, "choices", None) is not None:
        raise Phi3VError("--regex and --choices are not available with --server (the OpenAI API has no such "
                         "request field); use --schema, or run without --server")
    content = [{"type": "image_url", "image_url": {"url": image_data_uri(im)}} for im in images]
    if video is not None:
        content.insert(0, video)
    content.append({"type": "text", "text": prompt})
    messages = [{"role": "user", "content": content}]
    if getattr(args, "system", None):
        messages.insert(0, {"role": "system", "content": args.system})
    body = {"model": model_id, "messages": messages, "stream": True, "stream_options": {"include_usage": True}}
    for spec in OPTIONS:  # each generation option under its request field name
        value = getattr(options, spec.name)
        if value is not None and not (spec.repeatable and not value):
            body[spec.server_fields[-1]] = list(value) if spec.repeatable else value
    if getattr(args, "schema", None) is not None:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "answer", "schema": args.schema, "strict": True}}
    return body


def _events(resp):
    """The JSON bodies of an SSE stream, up to `data: [DONE]`."""
    for raw in resp:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def _completion(text: str, finish_reason: str, last: dict | None, schema):
    """A phi3v Completion from the streamed text and the final usage chunk."""
    from ..results import Completion, Timings, Usage

    usage = (last or {}).get("usage") or {}
    extra = (last or {}).get("phi3v") or {}
    timings = dict(extra.get("timings") or {})
    per_s = timings.pop("decode_tokens_per_s", 0.0)
    fields = {k: float(timings.get(k, 0.0)) for k in ("preprocess_s", "vision_s", "prefill_s", "decode_s",
                                                      "first_token_s")}
    completion = Completion(
        text=text, finish_reason=finish_reason,
        usage=Usage(usage.get("prompt_tokens", 0), extra.get("image_tokens", 0), usage.get("completion_tokens", 0)),
        timings=Timings(**fields, _decode_tokens=round(per_s * fields["decode_s"])))
    if schema is not None and finish_reason == "stop":
        try:
            completion.parsed = json.loads(text)
        except ValueError:
            completion.parsed = None
    return completion, extra.get("num_crops")


def remote_answer(args, prompt: str, images, options, video: dict | None = None):
    """(ServedModel, Completion): the answer of the server at args.server, printed as it streams.
    With `video` (a video_part), ServedModel.video_frame_times has the times of the frames used."""
    base = base_url(args.server)
    model_id = served_model_id(base)
    if (getattr(args, "config_sources", None) or {}).get("model") == "command line":
        model_id = args.model  # asked for by name: the server refuses another model
    body = request_body(model_id, prompt, images, options, args, video)
    printing = not (getattr(args, "json", False) or getattr(args, "no_stream", False))
    spinner = Spinner(f"asking {base}", enabled=not getattr(args, "quiet", False))
    text, finish_reason, last = [], "stop", None
    resp = None
    try:
        with spinner:
            try:
                resp = urllib.request.urlopen(_request(f"{base}/v1/chat/completions", body), timeout=ANSWER_TIMEOUT_S)
            except urllib.error.HTTPError as err:
                raise _server_error(base, err) from None
            except (urllib.error.URLError, socket.timeout, ConnectionError) as err:
                raise _unreachable(base, err) from None
            try:
                for event in _events(resp):
                    if "error" in event:  # an error after the stream began (the server is stopping, ...)
                        raise Phi3VError(f"the server at {base} stopped the answer: {event['error'].get('message')}")
                    if event.get("usage") is not None and not event.get("choices"):
                        last = event
                        continue
                    for choice in event.get("choices") or ():
                        delta = (choice.get("delta") or {}).get("content") or ""
                        if delta:
                            if printing:
                                spinner.stop()
                                write_answer_delta(delta)
                            text.append(delta)
                        if choice.get("finish_reason"):
                            finish_reason = choice["finish_reason"]
            except (socket.timeout, ConnectionError, urllib.error.URLError) as err:
                raise Phi3VError(f"the connection to {base} broke during the answer: "
                                 f"{getattr(err, 'reason', err)}") from None
    except KeyboardInterrupt:
        if printing and text:
            finish_answer("".join(text))
        raise  # closing the connection (below) cancels the generation on the server
    finally:
        if resp is not None:
            resp.close()
    if printing:
        finish_answer("".join(text))
    completion, num_crops = _completion("".join(text), finish_reason, last, getattr(args, "schema", None))
    served = ServedModel(model_id, f"server {base}", default_num_crops=num_crops)
    if video is not None:  # "0.5,1.5,2.5": the frames the server chose (server/video_parts.py)
        times = (resp.headers.get(FRAMES_HEADER) or "").split(";")[0]
        served.video_frame_times = [float(t) for t in times.split(",") if t]
    return served, completion
