"""What a generation returns: text, why it stopped, token usage and timings."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Usage:
    prompt_tokens: int = 0  # every prompt position, image placeholders included
    image_tokens: int = 0  # the part of prompt_tokens that are image placeholders
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict:
        d = asdict(self)
        d["total_tokens"] = self.total_tokens
        return d


@dataclass
class Timings:
    """Seconds spent in each phase of one request (0.0 when the phase did not run)."""

    preprocess_s: float = 0.0  # image decoding + HD transform + tokenization
    vision_s: float = 0.0  # CLIP + projector
    prefill_s: float = 0.0  # decoder over the prompt
    decode_s: float = 0.0  # all decode steps
    first_token_s: float = 0.0  # from request start to the first generated token

    @property
    def decode_tokens_per_s(self) -> float:
        return 0.0 if self.decode_s <= 0 else self._decode_tokens / self.decode_s

    _decode_tokens: int = field(default=0, repr=False)

    def to_dict(self) -> dict:
        return {
            "preprocess_s": self.preprocess_s,
            "vision_s": self.vision_s,
            "prefill_s": self.prefill_s,
            "decode_s": self.decode_s,
            "first_token_s": self.first_token_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
        }


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (end token or stop string) or "length" (max_new_tokens)
    usage: Usage
    timings: Timings
    token_ids: list[int] = field(default_factory=list)  # generated ids, a final stop token included
    # With an output constraint: the answer as data (json_schema: the parsed JSON, or the pydantic
    # model's instance; regex/choices: the text); None when it ended before the structure did.
    parsed: Any = None

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "usage": self.usage.to_dict(),
            "timings": self.timings.to_dict(),
            **({"parsed": _jsonable(self.parsed)} if self.parsed is not None else {}),
        }


def _jsonable(value: Any) -> Any:
    return value.model_dump() if hasattr(value, "model_dump") else value
