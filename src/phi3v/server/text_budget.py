"""The character budget of a request's text, checked before anything is tokenized.

Tokenizing takes time and memory in proportion to the text (issue 11: a 20 MB prompt took 49 s
and 4 GB to be refused as too long), while a prompt that long could never fit the context. No
token of the Phi-3 vocabulary spells more than 16 characters (`▁transformations`,
`________________`), so text of more than 16 x context characters cannot tokenize into the
context: the default budget refuses only requests that would fail anyway, and in microseconds.
An operator may set a smaller one (`--max-prompt-chars`).
"""

from __future__ import annotations

from .api_errors import APIError

MAX_CHARS_PER_TOKEN = 16  # the longest token of the Phi-3 (and Phi-3.5) vocabulary


def default_max_prompt_chars(context_length: int) -> int:
    return MAX_CHARS_PER_TOKEN * context_length


def text_chars(messages: list[dict]) -> int:
    """Characters of text in phi3v messages (string contents and text parts; images not counted)."""
    total = 0
    for msg in messages:
        content = msg.get("content")
        if isinstance(content, str):
            total += len(content)
        elif content:
            total += sum(len(part.get("text") or "") for part in content if part.get("type") == "text")
    return total


def check_prompt_chars(messages: list[dict], limit: int | None) -> None:
    """APIError 400 when the messages hold more than `limit` characters of text (None: no budget)."""
    if limit is None:
        return
    n = text_chars(messages)
    if n > limit:
        raise APIError(400, f"The messages hold {n} characters of text; this server accepts at most {limit} "
                            f"per request (the model's context could not hold more). Please shorten the "
                            f"messages.", param="messages", code="context_length_exceeded")
