"""Generation settings, validated once at the API boundary."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from .errors import Phi3VError


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 => greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 => off
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)  # extra stop strings, never emitted
    num_crops: int | None = None  # None => the model's preprocessor_config default

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(s for s in self.stop if s))
        if self.max_new_tokens < 1:
            raise Phi3VError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise Phi3VError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise Phi3VError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise Phi3VError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise Phi3VError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.num_crops is not None and not 1 <= self.num_crops <= 64:
            raise Phi3VError(f"num_crops must be between 1 and 64, got {self.num_crops}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_kwargs(cls, base: "GenerationOptions | None" = None, **kwargs) -> "GenerationOptions":
        """Build from keyword arguments, ignoring None values; unknown names are an error."""
        names = {f.name for f in fields(cls)}
        unknown = set(kwargs) - names
        if unknown:
            raise Phi3VError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
        given = {k: v for k, v in kwargs.items() if v is not None}
        return replace(base or cls(), **given)
