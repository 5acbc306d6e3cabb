"""Request and response bodies of the OpenAI chat-completions API, in the API's field order.

Only what a vision chat needs is modelled; fields that OpenAI defines but this server cannot
honour are accepted by name so that a non-default value gets a clear 400 (service.py checks
them), and names OpenAI does not define are refused ("Unrecognized request argument").
Our own additions are fenced at the end of each model under "phi3v extension".

The generation fields (max_tokens, temperature, top_p, seed, stop, num_crops, ...) take their
range and description from phi3v.options.OPTIONS through `option_field`, the one declaration
the CLI flags come from too; `requested_options` reads them back as GenerationOptions names.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

from ..options import OPTION_BY_NAME, OPTIONS


def option_field(option: str):
    """A request field setting the generation option `option`: None (not given) or a value in its range."""
    spec = OPTION_BY_NAME[option]
    return Field(default=None, description=spec.help, **spec.request_bounds.pydantic())


# Request bodies are read strictly, as OpenAI reads them: no coercion (true is not 1, "10" is not 10,
# "yes" is not true), no NaN or Infinity (Python's JSON parser accepts them), unknown names refused.
REQUEST_CONFIG = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _valid_unicode(text: str) -> str:
    """Refuse a lone surrogate ("\\ud800" in JSON): it is no character, and the tokenizer cannot take it."""
    if not text.isascii():  # O(1) for ASCII strings, so long ASCII prompts cost nothing here
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise PydanticCustomError(
                "invalid_unicode", "must be valid Unicode text, but holds a lone surrogate (U+{code}) at "
                "character {at}", {"code": f"{ord(text[err.start]):04X}", "at": err.start}) from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]

# Parameters OpenAI defines that this server cannot honour: their fields allow only the value that
# means "off", so the schema says what the server accepts; other values are 400s with code
# "unsupported_parameter" (app.py).
UNSUPPORTED_PARAMETERS = frozenset({
    "frequency_penalty", "logit_bias", "logprobs", "modalities", "n", "presence_penalty", "tool_choice", "tools",
    "top_logprobs"})
CONTENT_PART_TYPES = ("text", "image_url", "video_url")  # the `type` tags of content parts
RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")  # the `type` tags of response_format

# ---- request ------------------------------------------------------------------------------


class ImageURL(BaseModel):
    model_config = REQUEST_CONFIG
    url: Text = Field(description="A `data:image/...;base64,` URI; http(s) only with --allow-remote-images.")
    detail: Literal["auto", "low", "high"] | None = None  # accepted, ignored: use num_crops


class TextPart(BaseModel):
    model_config = REQUEST_CONFIG
    type: Literal["text"]
    text: Text


class ImageURLPart(BaseModel):
    model_config = REQUEST_CONFIG
    type: Literal["image_url"]
    image_url: ImageURL


# ---- phi3v extension: video (vLLM's `video_url` part; docs/server.md "Video") ----
MAX_VIDEO_FRAMES = 1024  # the schema's bound on `frames`; --max-images is the real limit (frames count as images)


class VideoURL(BaseModel):
    model_config = REQUEST_CONFIG
    url: Text = Field(description="A `data:video/mp4;base64,` URI (also video/webm, image/gif, image/webp); "
                                  "http(s) only with --allow-remote-images.")


class VideoURLPart(BaseModel):
    """A video; its chosen frames become the prompt's images (engine/frame_select.py rules).
    frames or fps (not both; neither: as many as --max-images leaves, at most 16), start/end in seconds."""

    model_config = REQUEST_CONFIG
    type: Literal["video_url"]
    video_url: VideoURL
    frames: int | None = Field(None, ge=1, le=MAX_VIDEO_FRAMES, description="frames spread evenly over the clip")
    fps: float | None = Field(None, gt=0, description="frames per second of video instead of `frames`")
    start: float | None = Field(None, ge=0, description="only frames from this second on")
    end: float | None = Field(None, gt=0, description="only frames before this second")
    time_labels: bool | None = Field(None, description='a line "frame k at MM:SS" per frame before the text')


MAX_STOP_STRINGS = 4

ContentPart = Annotated[Union[TextPart, ImageURLPart, VideoURLPart], Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = REQUEST_CONFIG
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[Text, list[ContentPart], None] = None
    name: Text | None = None  # accepted, ignored
    refusal: Text | None = None  # accepted on assistant turns echoed back by clients, ignored


class StreamOptions(BaseModel):
    model_config = REQUEST_CONFIG
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # accepted, ignored


class ResponseFormatText(BaseModel):
    model_config = REQUEST_CONFIG
    type: Literal["text"]


class ResponseFormatJSONObject(BaseModel):
    model_config = REQUEST_CONFIG
    type: Literal["json_object"]


class JSONSchemaFormat(BaseModel):
    model_config = REQUEST_CONFIG
    name: Text = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$", description="a-z, A-Z, 0-9, _ and -; at most 64.")
    description: Text | None = None
    # `schema` would shadow a BaseModel attribute: the field has another name, the request's is "schema".
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema",
                                        description="The JSON Schema the answer follows ({}: any JSON value).")
    strict: bool | None = None  # accepted: the answer always follows the schema


class ResponseFormatJSONSchema(BaseModel):
    model_config = REQUEST_CONFIG
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[Union[ResponseFormatText, ResponseFormatJSONObject, ResponseFormatJSONSchema],
                           Field(discriminator="type")]  # tags: RESPONSE_FORMAT_TYPES


class ChatCompletionRequest(BaseModel):
    model_config = REQUEST_CONFIG

    messages: list[ChatMessage] = Field(min_length=1)
    model: Text
    frequency_penalty: float | None = Field(None, ge=0, le=0)  # only 0 / null supported
    logit_bias: dict[Text, float] | None = Field(None, max_length=0)  # only empty / null supported
    logprobs: Literal[False] | None = None  # only false / null supported
    max_completion_tokens: int | None = option_field("max_new_tokens")
    max_tokens: int | None = option_field("max_new_tokens")
    metadata: dict[Text, Text] | None = None  # accepted, ignored
    modalities: list[Literal["text"]] | None = Field(None, min_length=1, max_length=1)  # only ["text"] supported
    n: int | None = Field(None, ge=1, le=1)  # only 1 supported
    parallel_tool_calls: bool | None = None  # accepted, ignored (no tools)
    presence_penalty: float | None = Field(None, ge=0, le=0)  # only 0 / null supported
    response_format: ResponseFormat | None = None  # text, json_object or json_schema (constrained decoding)
    seed: int | None = option_field("seed")
    service_tier: Text | None = None  # accepted, ignored
    stop: Union[Text, Annotated[list[Text], Field(max_length=MAX_STOP_STRINGS)], None] = option_field("stop")
    store: bool | None = None  # accepted, ignored
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = option_field("temperature")
    tool_choice: Literal["none"] | None = None  # only null / "none" supported
    tools: list[Any] | None = Field(None, max_length=0)  # only empty / null supported
    top_logprobs: int | None = Field(None, ge=0, le=0)  # only 0 / null supported
    top_p: float | None = option_field("top_p")
    user: Text | None = None  # accepted, ignored

    # ---- phi3v extension ----
    num_crops: int | None = option_field("num_crops")
    top_k: int | None = option_field("top_k")
    repetition_penalty: float | None = option_field("repetition_penalty")


def requested_options(req: ChatCompletionRequest) -> dict:
    """{GenerationOptions field: the request's value or None} (max_completion_tokens before max_tokens)."""
    values = {}
    for spec in OPTIONS:
        given = [getattr(req, name) for name in spec.server_fields]
        values[spec.name] = next((v for v in given if v is not None), None)
    return values


# ---- responses ----------------------------------------------------------------------------


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class CompletionUsage(BaseModel):
    prompt_tokens: int  # image placeholder tokens included
    completion_tokens: int
    total_tokens: int


class Phi3VStats(BaseModel):
    """phi3v extension: what the request cost, for people tuning num_crops and image sizes."""

    image_tokens: int
    num_crops: int | None
    queue_s: float  # waiting for the engine
    timings: dict[str, float]  # preprocess_s, vision_s, prefill_s, decode_s, first_token_s, decode_tokens_per_s
    videos: list[dict] | None = None  # per video part: the frames used ({"index", "time_s"}), server/video_parts.py


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage
    system_fingerprint: str | None = None

    # ---- phi3v extension ----
    phi3v: Phi3VStats | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "phi3v"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
