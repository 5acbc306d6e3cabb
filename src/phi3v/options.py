"""Generation settings: each option declared once, here, and validated once at the API boundary.

GenerationOptions holds the defaults (its dataclass fields); OPTIONS holds, for each field, what
the three surfaces need: the allowed range, the help text, the CLI flag and the request-body
fields of the server. From these two declarations come

  - GenerationOptions' validation (`__post_init__` below),
  - the generation flags of the answer commands and of `phi3v batch`, and `--num-crops`
    (phi3v.cli.arguments.generation_parent / model_parent),
  - the generation fields of the server's request body (phi3v.server.schemas.option_field).

So a new option is one field here plus one OptionSpec, and it reaches all three. This module
stays light (no torch, no pydantic): `phi3v --help` imports it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import MISSING, dataclass, field, fields, replace

from .errors import Phi3VError


@dataclass(frozen=True)
class Bounds:
    """The allowed range of a number: lo <= value <= hi (lo < value when lo_open); None = unbounded."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False

    def contains(self, value) -> bool:
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return False
        return self.hi is None or value <= self.hi

    def describe(self, whole: bool = False) -> str:
        """The range in words, as error messages end: "must be <this>, got X".

        ">= 1", "> 0", "between 1 and 64" (whole numbers), "in (0, 1]" or "in [0, 100]".
        """
        if self.lo is None and self.hi is None:
            return "any number"
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo}"
        if self.lo is None:
            return f"<= {self.hi}"
        if whole and not self.lo_open:
            return f"between {self.lo} and {self.hi}"
        return f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}]"

    def pydantic(self) -> dict:
        """The same range as pydantic Field keywords: {"ge" or "gt": lo, "le": hi}."""
        out = {}
        if self.lo is not None:
            out["gt" if self.lo_open else "ge"] = self.lo
        if self.hi is not None:
            out["le"] = self.hi
        return out

    def scaled(self, unit: float) -> "Bounds":
        """The range of the same quantity counted in `unit`s (bytes -> MiB: unit = 2**20)."""
        return Bounds(None if self.lo is None else self.lo / unit, None if self.hi is None else self.hi / unit,
                      self.lo_open)


ANY = Bounds()


@dataclass(frozen=True)
class OptionSpec:
    """How one GenerationOptions field is offered to people and clients."""

    name: str  # the GenerationOptions field
    kind: type  # int, float or str: the type of one value
    help: str  # CLI help and server field description; the default is added by the CLI
    flag: str  # the CLI flag
    server_fields: tuple[str, ...]  # request-body fields that set it; the first one given wins
    bounds: Bounds = ANY
    server_bounds: Bounds | None = None  # narrower on the server where the OpenAI API documents a range
    metavar: str | None = None
    default_text: str | None = None  # the default in words, where the value alone says little
    repeatable: bool = False  # a list of values (--stop A --stop B)

    @property
    def request_bounds(self) -> Bounds:
        return self.server_bounds or self.bounds


OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec("max_new_tokens", int, "most tokens to generate", "--max-tokens",
               ("max_completion_tokens", "max_tokens"), Bounds(1), metavar="N"),
    OptionSpec("temperature", float, "sampling temperature", "--temperature", ("temperature",),
               Bounds(0, 100), server_bounds=Bounds(0, 2), metavar="T", default_text="0 = greedy"),
    OptionSpec("top_p", float, "nucleus sampling: sample from the likeliest tokens holding this mass",
               "--top-p", ("top_p",), Bounds(0, 1, lo_open=True), metavar="P", default_text="1.0 = off"),
    OptionSpec("top_k", int, "sample from the K likeliest tokens", "--top-k", ("top_k",), Bounds(0),
               metavar="K", default_text="0 = off"),
    OptionSpec("repetition_penalty", float, "divide the scores of tokens already in the prompt or answer "
               "by this (above 1 repeats less)", "--repetition-penalty", ("repetition_penalty",),
               Bounds(0, lo_open=True), metavar="R", default_text="1.0 = off"),
    # Any integer: the Sampler reduces one outside torch's range modulo 2**64 (engine/sampling.py).
    OptionSpec("seed", int, "random seed for sampling", "--seed", ("seed",), metavar="S", default_text="none"),
    OptionSpec("stop", str, "stop when this text is generated; the text is not returned", "--stop", ("stop",),
               metavar="TEXT", repeatable=True),
    OptionSpec("num_crops", int, "max 336px crops per image (fewer = fewer image tokens)", "--num-crops",
               ("num_crops",), Bounds(1, 64), metavar="N", default_text="the model's"),
)
OPTION_BY_NAME = {spec.name: spec for spec in OPTIONS}


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
        elif isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) for s in self.stop):
            object.__setattr__(self, "stop", tuple(s for s in self.stop if s))
        else:
            raise Phi3VError(f"stop must be a string or a list of strings, got {self.stop!r}"[:200])
        for spec in OPTIONS:
            value = getattr(self, spec.name)
            if value is None or spec.repeatable:
                continue
            value = _number(spec, value)
            object.__setattr__(self, spec.name, value)
            if spec.bounds is ANY:
                continue
            if not spec.bounds.contains(value):
                raise Phi3VError(f"{spec.name} must be {spec.bounds.describe(spec.kind is int)}, got {value}")

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


def _number(spec: OptionSpec, value):
    """`value` as the option's kind (int or float), or a Phi3VError naming the option.

    A bool is not a number here (True would be max_new_tokens=1), nor is text; NaN and infinities
    are refused because no range check can order them sensibly (NaN compares false with
    everything). Integers of other types (numpy) become int, so the engine sees plain Python values.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise Phi3VError(f"{spec.name} must be {'an integer' if spec.kind is int else 'a number'}, "
                         f"got {type(value).__name__} {value!r}")
    if spec.kind is int:
        if not isinstance(value, numbers.Integral):
            raise Phi3VError(f"{spec.name} must be an integer, got {value!r}")
        return int(value)
    if not math.isfinite(value):
        raise Phi3VError(f"{spec.name} must be a finite number, got {value!r}")
    return float(value)


def option_defaults() -> dict:
    """{field name: default} of GenerationOptions (stop: an empty tuple)."""
    return {f.name: f.default_factory() if f.default_factory is not MISSING else f.default
            for f in fields(GenerationOptions)}
