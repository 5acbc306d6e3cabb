"""Structured output: a row's tokens constrained to a JSON Schema, any JSON object, a regular
expression or a choice among strings, with llguidance (MIT; the grammar engine of llama.cpp,
vLLM's and ORT GenAI's structured output).

    fmt = OutputFormat.json_schema({"type": "object", ...})     # or .json_object(), .regex(r), .choice([...])
    grammars = Grammars(tokenizer, vocab_size)                  # one per model: the token table
    state = grammars.start(fmt)                                 # one per row (compiled once per format)
    allowed = state.allowed()                                   # (vocab,) bool: tokens that keep it valid
    state.advance(token)                                        # after sampling one of them
    state.finished                                              # the structure is complete

Why llguidance: its mask costs ~0.1 ms per token for a JSON Schema on this CPU (the decoder's step
is ~200 ms at full size, so well under 1%), it compiles a schema in about a millisecond without a
warm-up, and it needs no torch.compile. The end-of-turn tokens are the grammar's end: once the
structure is complete only they are allowed, so generation ends with finish_reason "stop".

JSON is generated compact (no free whitespace between tokens): with free whitespace a model may
emit spaces forever, which random weights (the tests') readily do.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import Phi3VError

_JSON_OPTIONS = {"whitespace_flexible": False}
_CACHE_ENTRIES = 64  # compiled formats kept per model


class OutputFormatError(Phi3VError):
    """A schema, regex or choice list that cannot be used (says why)."""


@dataclass(frozen=True)
class OutputFormat:
    kind: str  # "json_schema" | "json_object" | "regex" | "choice"
    source: str  # the schema as canonical JSON, the regex, or the choices as a JSON list

    @classmethod
    def json_schema(cls, schema: dict | str) -> "OutputFormat":
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as err:
                raise OutputFormatError(f"the JSON Schema is not valid JSON: {err}") from None
        if not isinstance(schema, dict):
            raise OutputFormatError(f"a JSON Schema must be an object, got {type(schema).__name__}")
        # Canonical spacing, the author's key order: objects are generated in the schema's order
        # (a model writes "merchant" before "total" better than the alphabet would have it).
        return cls("json_schema", json.dumps(schema, separators=(",", ":")))

    @classmethod
    def json_object(cls) -> "OutputFormat":
        return cls("json_object", '{"type":"object"}')

    @classmethod
    def regex(cls, pattern: str) -> "OutputFormat":
        if not isinstance(pattern, str) or not pattern:
            raise OutputFormatError("regex must be a non-empty string")
        return cls("regex", pattern)

    @classmethod
    def choice(cls, choices) -> "OutputFormat":
        choices = list(choices) if not isinstance(choices, str) else None
        if not choices or not all(isinstance(c, str) and c for c in choices):
            raise OutputFormatError("choices must be a list of non-empty strings")
        return cls("choice", json.dumps(choices))

    @classmethod
    def from_options(cls, json_schema: Any = None, regex: str | None = None, choices=None) -> "OutputFormat | None":
        """The format named by at most one of the three (None when none is given). json_schema may
        be a dict, a JSON string, a pydantic model class, or "json_object" for any JSON object."""
        given = [name for name, v in (("json_schema", json_schema), ("regex", regex), ("choices", choices))
                 if v is not None]
        if len(given) > 1:
            raise OutputFormatError(f"give one output constraint, not {' and '.join(given)}")
        if json_schema is not None:
            if json_schema == "json_object":
                return cls.json_object()
            if hasattr(json_schema, "model_json_schema"):  # a pydantic model class
                return cls.json_schema(json_schema.model_json_schema())
            return cls.json_schema(json_schema)
        if regex is not None:
            return cls.regex(regex)
        if choices is not None:
            return cls.choice(choices)
        return None

    def grammar(self) -> str:
        """The llguidance grammar (a JSON string) for this format."""
        from llguidance import LLMatcher

        if self.kind in ("json_schema", "json_object"):
            return LLMatcher.grammar_from_json_schema(self.source, defaults=_JSON_OPTIONS)
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.source)
        alternatives = "|".join(_regex_literal(c) for c in json.loads(self.source))
        return LLMatcher.grammar_from_regex(f"({alternatives})")


def _regex_literal(text: str) -> str:
    """`text` as a regex matching exactly it (llguidance's regex syntax is Rust's)."""
    return "".join("\\" + ch if ch in r"\.+*?()|[]{}^$#&-~" else ch for ch in text)


class Grammars:
    """The token table of one tokenizer for llguidance, and the formats compiled against it
    (cached by content: the same schema twice compiles once). Thread-safe."""

    def __init__(self, tokenizer, vocab_size: int):
        """tokenizer: engine.tokenizer.Tokenizer; vocab_size: the model's logits width (>= the
        tokenizer's vocabulary: the extra ids are never allowed)."""
        try:
            from llguidance import LLTokenizer
        except ImportError:
            raise Phi3VError("structured output needs llguidance: pip install 'phi3v[structured]'") from None
        self.vocab_size = vocab_size
        self._tokenizer = LLTokenizer(tokenizer.hf_json(), n_vocab=vocab_size,
                                      eos_token=sorted(tokenizer.stop_ids))
        self._compiled: OrderedDict[OutputFormat, Any] = OrderedDict()
        self._lock = threading.Lock()

    def start(self, fmt: OutputFormat) -> "ConstraintState":
        """A fresh matcher for one row (OutputFormatError when the format cannot be compiled)."""
        with self._lock:
            proto = self._compiled.get(fmt)
            if proto is not None:
                self._compiled.move_to_end(fmt)
        if proto is None:
            proto = self._compile(fmt)
            with self._lock:
                self._compiled[fmt] = proto
                while len(self._compiled) > _CACHE_ENTRIES:
                    self._compiled.popitem(last=False)
        return ConstraintState(proto.deep_copy(), self.vocab_size)

    def check(self, fmt: OutputFormat) -> None:
        """Compile now (and cache): an unusable schema is an error before any generation."""
        self.start(fmt)

    def _compile(self, fmt: OutputFormat):
        from llguidance import LLMatcher

        try:
            grammar = fmt.grammar()
        except ValueError as err:
            raise OutputFormatError(f"cannot use this {fmt.kind.replace('_', ' ')}: {err}") from None
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, self._tokenizer)
        if is_error:
            raise OutputFormatError(f"cannot use this {fmt.kind.replace('_', ' ')}: {messages[0]}")
        matcher = LLMatcher(self._tokenizer, grammar)
        if matcher.is_error():
            raise OutputFormatError(f"cannot use this {fmt.kind.replace('_', ' ')}: {matcher.get_error()}")
        return matcher


class ConstraintState:
    """One row's position in its grammar."""

    def __init__(self, matcher, vocab_size: int):
        self._matcher = matcher
        self.vocab_size = vocab_size

    @property
    def finished(self) -> bool:
        """The structure is complete (and an end token was consumed, or nothing else may follow)."""
        return self._matcher.is_stopped()

    def allowed(self) -> torch.Tensor:
        """(vocab,) bool: the tokens that keep the output a valid prefix."""
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        mask = np.unpackbits(bits, bitorder="little")[: self.vocab_size]
        return torch.from_numpy(mask.astype(np.bool_))

    def advance(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise Phi3VError(f"token {token} does not follow the output format: {self._matcher.get_error()}")


def parse_output(fmt: OutputFormat, model_class: type | None, text: str) -> Any:
    """A finished constrained answer as data: JSON parsed (then validated into `model_class` when
    given), regex and choice answers as the text. ValueError when it is not whole."""
    if fmt.kind not in ("json_schema", "json_object"):
        return text
    value = json.loads(text)
    return model_class.model_validate(value) if model_class is not None else value
