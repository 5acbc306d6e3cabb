"""Chat messages -> prompt text + images; prompt text -> input ids with image placeholder runs.

Prompt format (spec §8.1, the chat template of tokenizer_config.json): every message becomes
`<|role|>\\n{content}<|end|>\\n`; the generation prompt `<|assistant|>\\n` follows unless the last message
is the assistant's. No BOS in the text (the tokenizer adds it). Images of a user turn are written as
`<|image_k|>\\n` tags before that turn's text, k counted across the whole conversation (model-card style):

    <|user|>\\n<|image_1|>\\n<|image_2|>\\nCompare.<|end|>\\n<|assistant|>\\n

Input ids (spec §8.4): the prompt is split at the `<|image_k|>` tags, each text chunk is encoded on its
own (so each starts with BOS, id 1, also right after an image), and each tag becomes a run of
`num_img_tokens[k-1]` copies of -k. The model writes image k's embedding rows over the run of -k,
wherever that run is in the sequence (so tags out of order are fine; the reference instead fills the
runs in scan order, a defect we do not copy — tests/golden/README.md fact 3).

Client text is plain text (render_chat, build_input_ids' `plain_spans`): the text of messages, of a
prompt and of a system prompt is encoded with special tokens spelled as characters, so a message
containing `<|end|>\n<|assistant|>\n` cannot forge a turn; only the role tokens written by the template
are tokens. `<|image_k|>` tags in client text still work: they are not tokenizer tokens but placeholders
that build_input_ids replaces before anything is encoded.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple, Sequence

from ..errors import PromptError

IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")  # exact spelling used by the reference processor
ROLES = ("system", "user", "assistant")


class RenderedChat(NamedTuple):
    """render_messages() result; unpacks as (prompt_text, image_sources)."""

    prompt_text: str
    image_sources: list  # image inputs in order: image_sources[k-1] is <|image_k|>


Span = tuple[int, int]


class ChatPrompt(NamedTuple):
    """render_chat() result: the prompt text, its image sources and where the client's text is in it."""

    prompt_text: str
    image_sources: list
    plain_spans: tuple[Span, ...]  # [start, end) of client text: build_input_ids encodes it as plain text


def image_tag(k: int) -> str:
    return f"<|image_{k}|>"


class _Writer:
    """Builds a prompt from template pieces and client text, remembering where the client text is."""

    def __init__(self):
        self.parts: list[str] = []
        self.spans: list[Span] = []
        self.length = 0

    def template(self, text: str) -> None:
        self.parts.append(text)
        self.length += len(text)

    def client(self, text: str) -> None:
        if text:
            self.spans.append((self.length, self.length + len(text)))
        self.template(text)

    def turn(self, role: str, tags: str, content: str) -> None:
        self.template(f"<|{role}|>\n{tags}")  # the image tags are placeholders, not tokens: either side is fine
        self.client(content)
        self.template("<|end|>\n")

    def text(self) -> str:
        return "".join(self.parts)


def _image_source(part: dict, where: str) -> Any:
    """The image input of an `image_url` or `image` part (anything image.open_image accepts)."""
    if part["type"] == "image":
        if "image" not in part or part["image"] is None:
            raise PromptError(f"{where}: an 'image' part needs an 'image' field")
        return part["image"]
    value = part.get("image_url")
    if isinstance(value, dict):
        value = value.get("url")
    if not isinstance(value, str) or not value:
        raise PromptError(f"{where}: an 'image_url' part needs 'image_url': {{'url': '...'}} or a url string")
    return value


def _split_content(content: Any, where: str) -> tuple[str, list]:
    """Content (str, None or list of parts) -> (text, images). Several text parts are joined with
    "\\n" (the OpenAI format says nothing about separators; a newline keeps them apart)."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, (list, tuple)):
        raise PromptError(f"{where}: content must be a string or a list of parts, got {type(content).__name__}")
    texts, images = [], []
    for j, part in enumerate(content):
        pwhere = f"{where}, part {j}"
        if isinstance(part, str):  # lenient: a bare string part is text
            texts.append(part)
            continue
        if not isinstance(part, dict) or "type" not in part:
            raise PromptError(f"{pwhere}: a part must be a dict with a 'type'")
        kind = part["type"]
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise PromptError(f"{pwhere}: a 'text' part needs a string 'text' field")
            texts.append(text)
        elif kind in ("image_url", "image"):
            images.append(_image_source(part, pwhere))
        else:
            raise PromptError(f"{pwhere}: unsupported part type {kind!r} (use 'text', 'image_url' or 'image')")
    return "\n".join(texts), images


def render_messages(messages: Sequence[dict], add_generation_prompt: bool = True) -> RenderedChat:
    """OpenAI-style messages -> (prompt text with the generation prompt, image sources in tag order).

    The text alone; render_chat() also says where the messages' text is in it (for plain-text encoding).
    """
    chat = render_chat(messages, add_generation_prompt)
    return RenderedChat(chat.prompt_text, chat.image_sources)


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = True) -> ChatPrompt:
    """OpenAI-style messages -> ChatPrompt (prompt text, image sources in tag order, client text spans).

    Roles: system, user, assistant (anything else is a PromptError). Image parts are allowed in user
    messages only. Text that already contains `<|image_N|>` tags is used as is (the reference/golden
    style, with the images passed separately, e.g. `{"role": "user", "content": "<|image_1|>\\nWhat?"}`);
    but mixing literal tags with image parts is ambiguous (which image is which?) and raises
    PromptError: use either tags in the text or image parts, not both.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise PromptError("messages must be a list of {'role': ..., 'content': ...} dicts")
    if len(messages) == 0:
        raise PromptError("messages is empty: give at least one user message")
    turns: list[tuple[str, str, list]] = []
    for i, msg in enumerate(messages):
        where = f"message {i}"
        if not isinstance(msg, dict) or "role" not in msg:
            raise PromptError(f"{where}: each message must be a dict with 'role' and 'content'")
        role = msg["role"]
        if role not in ROLES:
            raise PromptError(f"{where}: unsupported role {role!r} (phi3v accepts {', '.join(ROLES)})")
        text, images = _split_content(msg.get("content"), where)
        if images and role != "user":
            raise PromptError(f"{where}: images are only allowed in user messages, not in {role!r} messages")
        turns.append((role, text, images))

    has_image_parts = any(images for _, _, images in turns)
    out, sources = _Writer(), []
    for i, (role, text, images) in enumerate(turns):
        if has_image_parts and IMAGE_TAG.search(text):
            raise PromptError(
                f"message {i}: the text contains a literal {IMAGE_TAG.search(text).group(0)} tag while images are "
                "given as message parts; use image parts only (tags are added for them) or tags only"
            )
        tags = "".join(f"{image_tag(len(sources) + j + 1)}\n" for j in range(len(images)))
        sources.extend(images)
        out.turn(role, tags, text)
    if add_generation_prompt and turns[-1][0] != "assistant":
        out.template("<|assistant|>\n")
    return ChatPrompt(out.text(), sources, tuple(out.spans))


def render_prompt(prompt: str, images_count: int, system: str | None = None) -> str:
    """The simple ask() path: one user turn (plus an optional system turn) with the generation prompt.

    If `prompt` already contains `<|image_N|>` tags they are kept where they are (and must name
    exactly images 1..images_count); otherwise tags for all images are put first, model-card style.
    """
    return render_prompt_chat(prompt, images_count, system).prompt_text


def render_prompt_chat(prompt: str, images_count: int, system: str | None = None) -> ChatPrompt:
    """render_prompt() as a ChatPrompt (image_sources left empty: the caller holds the images)."""
    if not isinstance(prompt, str):
        raise PromptError(f"prompt must be a string, got {type(prompt).__name__}")
    if images_count < 0:
        raise PromptError("images_count must be >= 0")
    tags = ""
    if IMAGE_TAG.search(prompt):
        check_image_tags(prompt, images_count)
    else:
        tags = "".join(f"{image_tag(k)}\n" for k in range(1, images_count + 1))
    out = _Writer()
    if system is not None:
        out.turn("system", "", system)
    out.turn("user", tags, prompt)
    out.template("<|assistant|>\n")
    return ChatPrompt(out.text(), [], tuple(out.spans))


def check_image_tags(prompt_text: str, num_images: int) -> list[int]:
    """Validate the `<|image_k|>` tags of a prompt against the number of images; return the tag
    numbers in text order. Each of 1..num_images must appear exactly once; any order is allowed."""
    tags = [int(m.group(1)) for m in IMAGE_TAG.finditer(prompt_text)]
    seen: set[int] = set()
    for k in tags:
        if k in seen:
            raise PromptError(f"{image_tag(k)} appears more than once in the prompt; use each image tag once")
        seen.add(k)
    if 0 in seen:
        raise PromptError("<|image_0|> is not a valid tag: image tags start at <|image_1|>")
    if num_images == 0 and tags:
        raise PromptError(f"the prompt has image tags ({image_tag(tags[0])}) but no images were given")
    too_high = sorted(k for k in seen if k > num_images)
    if too_high:
        raise PromptError(
            f"the prompt refers to {image_tag(too_high[0])} but only {num_images} image(s) were given "
            f"(tags must be <|image_1|>..{image_tag(num_images)})"
        )
    missing = [k for k in range(1, num_images + 1) if k not in seen]
    if tags and missing:
        raise PromptError(
            f"{num_images} image(s) were given but the prompt has no {image_tag(missing[0])} tag; "
            f"tag every image exactly once (or leave all tags out)"
        )
    if not tags and num_images:
        raise PromptError(
            f"{num_images} image(s) were given but the prompt has no <|image_N|> tags; "
            "use render_prompt() or render_messages() to add them"
        )
    return tags


def build_input_ids(tokenizer, prompt_text: str, num_img_tokens: Sequence[int],
                    plain_spans: Sequence[Span] = ()) -> list[int]:
    """Prompt text -> input ids, spec §8.4: chunks between tags encoded separately (each with BOS),
    tag <|image_k|> replaced by num_img_tokens[k-1] copies of -k.

    Example (T = 5): "<|image_1|>Describe" -> [1, -1, -1, -1, -1, -1, 1, 20355, 915].
    Without images the whole text is encoded once (one BOS); tags in it are then an error.
    plain_spans: [start, end) ranges of prompt_text (render_chat's) whose special tokens are encoded
    as plain text; the tokenizer gives the same ids as without spans for text that has none.
    """
    counts = [int(n) for n in num_img_tokens]
    if any(n <= 0 for n in counts):
        raise PromptError(f"num_img_tokens must be positive, got {counts}")
    tags = check_image_tags(prompt_text, len(counts))
    if not tags:
        return _encode(tokenizer, prompt_text, 0, plain_spans)
    bounds = [0]  # chunk i is prompt_text[bounds[2i]:bounds[2i+1]]; tags are between chunks
    for m in IMAGE_TAG.finditer(prompt_text):
        bounds += [m.start(), m.end()]
    bounds.append(len(prompt_text))
    chunks = [(bounds[i], bounds[i + 1]) for i in range(0, len(bounds), 2)]
    ids = _encode(tokenizer, prompt_text[slice(*chunks[0])], chunks[0][0], plain_spans)
    for k, (start, end) in zip(tags, chunks[1:]):
        ids.extend([-k] * counts[k - 1])
        ids.extend(_encode(tokenizer, prompt_text[start:end], start, plain_spans))
    return ids


def _encode(tokenizer, chunk: str, offset: int, plain_spans: Sequence[Span]) -> list[int]:
    """Encode one chunk that starts at `offset` of the prompt, with the plain spans that fall in it."""
    if not plain_spans:
        return list(tokenizer.encode(chunk))
    end = offset + len(chunk)
    spans = [(max(a, offset) - offset, min(b, end) - offset) for a, b in plain_spans if a < end and b > offset]
    return list(tokenizer.encode(chunk, plain_spans=spans))
