"""The Phi-3-vision tokenizer: `tokenizer.json` through the `tokenizers` library.

The reference runtime (transformers 4.40-4.43, LlamaTokenizerFast) uses exactly the rules stored in
tokenizer.json, and `tokenizers` reproduces them (spec §8.2):

- added tokens (`<|user|>`, `<|end|>`, ...) are matched first; every text segment between them is
  normalized on its own, so each segment gets its own leading "▁" (`"<|user|>\\n"` -> 1, 32010, 29871, 13);
- tokens with `rstrip` (`<|assistant|>`, `</s>`, the placeholders) swallow the whitespace after them;
- the post-processor prepends BOS (id 1) to every encoded string.

We must *not* go through transformers 5.x, which rebuilds the Llama tokenizer and honours
`legacy: false`, giving different ids (spec §8.2 item 3).

Decoding follows the tokenizer.json decoder: "▁" -> " ", byte fallback (`<0xE2>` ...), fuse, strip one
leading space. With skip_special_tokens the tokens flagged special are removed (0, 1, 32000-32044);
`</s>` (id 2) is not flagged special and stays as text, as in the reference (spec §8.6).
"""

from __future__ import annotations

import json
import pathlib
import re
import threading
from typing import Iterable, Sequence

from tokenizers import Tokenizer as _HFTokenizer

from ..errors import CheckpointError, PromptError

_REPLACEMENT = "\ufffd"  # what byte fallback produces for an incomplete / invalid UTF-8 byte run
# Unicode White_Space (Rust's char::is_whitespace), what an added token's lstrip/rstrip swallows in
# `tokenizers`; Python's str.isspace differs (it also counts U+001C..U+001F).
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_LEADING_WS = re.compile(f"^[{_WHITESPACE}]+")
_TRAILING_WS = re.compile(f"[{_WHITESPACE}]+$")


def _check_unicode(text: str) -> None:
    """PromptError for a lone surrogate ("\\ud800" from JSON, or os.fsdecode's escapes): it is no
    character, and `tokenizers` refuses the whole string with a bare TypeError."""
    if text.isascii():  # O(1) for ASCII strings
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise PromptError(f"the text is not valid Unicode: it holds a lone surrogate (U+{ord(text[err.start]):04X}) "
                          f"at character {err.start} of the prompt") from None


def _plain_tokenizer(tok: _HFTokenizer) -> _HFTokenizer:
    """A copy of `tok` that encodes every added token's spelling as ordinary text.

    `encode_special_tokens` makes `tokenizers` skip the added tokens flagged special, and `</s>` is
    not flagged: the copy flags them all. A copy, not a flag flipped on the shared tokenizer, because
    other threads encode and decode with that one at the same time.
    """
    spec = json.loads(tok.to_str())
    for added in spec.get("added_tokens", []):
        added["special"] = True
    plain = _HFTokenizer.from_str(json.dumps(spec))
    plain.encode_special_tokens = True
    return plain


def _token_id(tok: _HFTokenizer, token: str, path) -> int:
    tid = tok.token_to_id(token)
    if tid is None:
        raise CheckpointError(f"{path}: the tokenizer has no {token!r} token; is this a Phi-3-vision tokenizer.json?")
    return tid


class Tokenizer:
    """Encode prompts and decode generated ids exactly like the reference processor's tokenizer."""

    def __init__(self, hf_tokenizer: _HFTokenizer, *, source: str = "<memory>"):
        self._tok = hf_tokenizer
        self.source = source
        self.bos_id: int = _token_id(hf_tokenizer, "<s>", source)
        self.end_id: int = _token_id(hf_tokenizer, "<|end|>", source)  # 32007, end of turn
        self.endoftext_id: int = _token_id(hf_tokenizer, "<|endoftext|>", source)  # 32000, eos / pad
        # Generation stops on either (spec §1.6): the chat model ends its turn with <|end|>,
        # the model cards pass <|endoftext|> as eos_token_id.
        self.stop_ids: frozenset[int] = frozenset({self.end_id, self.endoftext_id})
        # Tokenizer vocabulary incl. added tokens (32045); the model's embedding has more rows (32064),
        # ids without a token decode to nothing.
        self.vocab_size: int = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        # Ids removed by decode(skip_special_tokens=True): the added tokens flagged special.
        self.special_ids: frozenset[int] = frozenset(
            tid for tid, added in hf_tokenizer.get_added_tokens_decoder().items() if added.special
        )
        # Byte-fallback tokens "<0x00>".."<0xFF>": their text may be an incomplete UTF-8 character.
        self._byte_ids = frozenset(
            tid for tid in (hf_tokenizer.token_to_id(f"<0x{b:02X}>") for b in range(256)) if tid is not None
        )
        # A plain, non-space, non-byte token used as left context when decoding a window of ids in
        # the middle of a text (so the decoder's "strip one leading space" does not eat real spaces).
        self._anchor_id = _token_id(hf_tokenizer, "a", source)
        # For encode(plain_spans=...): the added tokens (longest spelling first, so the regex finds
        # what tokenizers' leftmost-longest matching finds) and a copy that spells them as text.
        added = sorted(hf_tokenizer.get_added_tokens_decoder().values(), key=lambda t: -len(t.content))
        self._added = {t.content: t for t in added}
        self._added_re = re.compile("|".join(re.escape(t.content) for t in added)) if added else None
        self._plain: _HFTokenizer | None = None  # made on first use: the copy takes ~0.2 s of every load otherwise
        self._plain_lock = threading.Lock()

    # --- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path) -> "Tokenizer":
        path = pathlib.Path(path)
        if not path.is_file():
            raise CheckpointError(f"tokenizer file not found: {path}")
        try:
            tok = _HFTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a plain Exception on malformed json
            raise CheckpointError(f"cannot read tokenizer {path}: {err}") from err
        return cls(tok, source=str(path))

    @classmethod
    def from_dir(cls, model_dir) -> "Tokenizer":
        """Load `<model_dir>/tokenizer.json` (the only tokenizer file the reference uses)."""
        model_dir = pathlib.Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{model_dir} has no tokenizer.json (a Phi-3-vision model folder needs one)")
        return cls.from_file(path)

    # --- encoding --------------------------------------------------------------------------------
    def hf_json(self) -> str:
        """The tokenizer as tokenizer.json text (for libraries that build their own token tables)."""
        return self._tok.to_str()

    def encode(self, text: str, plain_spans: Sequence[tuple[int, int]] = ()) -> list[int]:
        """Ids of `text` with the leading BOS, reference rules (added tokens in the text are honoured).

        plain_spans: [start, end) ranges of `text` (client text) in which added tokens are not
        honoured: `<|end|>` there is the characters "<", "|", "end", ... Text with no added token
        in these ranges gets exactly the ids of encode(text).
        """
        _check_unicode(text)
        if not plain_spans or self._added_re is None:
            return self._tok.encode(text, add_special_tokens=True).ids
        return [self.bos_id, *self._encode_segments(self._segments(text, plain_spans))]

    def _plain_tokenizer(self) -> _HFTokenizer:
        if self._plain is None:
            with self._plain_lock:  # the server's preparation threads may get here together
                if self._plain is None:
                    self._plain = _plain_tokenizer(self._tok)
        return self._plain

    def _segments(self, text: str, plain_spans: Sequence[tuple[int, int]]) -> list:
        """`text` split the way `tokenizers` splits it before normalizing: added tokens (outside the
        plain spans) as AddedToken objects, the text between them as strings."""
        out: list = []
        pos = 0

        def trusted(end: int) -> None:  # text[pos:end], in which added tokens count
            at = pos
            for m in self._added_re.finditer(text, pos, end):
                out.extend([text[at:m.start()], self._added[m.group(0)]])
                at = m.end()
            out.append(text[at:end])

        for start, end in sorted(plain_spans):
            if start < pos or end > len(text):
                raise ValueError(f"plain spans must be ordered, disjoint ranges of the text, got {plain_spans}")
            trusted(start)
            out.append(text[start:end])
            pos = end
        trusted(len(text))
        return out

    def _encode_segments(self, segments: list) -> list[int]:
        ids: list[int] = []
        pending: list[str] = []  # adjacent strings form one segment, as in a single encode()
        strip_next = False  # the token before swallows the whitespace after it (rstrip)
        for item in segments + [None]:
            if isinstance(item, str):
                pending.append(item)
                continue
            segment = "".join(pending)
            pending = []
            if strip_next:
                segment = _LEADING_WS.sub("", segment)
            if item is not None and item.lstrip:
                segment = _TRAILING_WS.sub("", segment)
            if segment:
                ids.extend(self._plain_tokenizer().encode(segment, add_special_tokens=False).ids)
            if item is not None:
                ids.append(self._tok.token_to_id(item.content))
                strip_next = item.rstrip
        return ids

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    # --- decoding --------------------------------------------------------------------------------
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` (the generated ids only, spec §8.6). Negative ids (image placeholders) are
        dropped; ids without a token (32045..32063) decode to nothing, as in the reference."""
        ids = [int(i) for i in ids if int(i) >= 0]
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def is_byte_token(self, token_id: int) -> bool:
        return token_id in self._byte_ids

    def incremental(self, skip_special_tokens: bool = True) -> "IncrementalDecoder":
        """A streaming decoder for one generation: push ids one by one, get text deltas."""
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    def _decode_window(self, ids: list[int], at_start: bool) -> str:
        """Decode ids that start a new piece of text. `at_start`: the piece begins the generated text,
        so the decoder strips one leading space like decode() does; otherwise an anchor token is put
        in front so the strip hits the anchor instead, and the anchor's text is cut off again."""
        if at_start:
            return self._tok.decode(ids, skip_special_tokens=False)
        anchored = self._tok.decode([self._anchor_id, *ids], skip_special_tokens=False)
        return anchored[1:]  # the anchor "a" decodes to exactly one character


class IncrementalDecoder:
    """Turns a stream of generated ids into text deltas.

    push(id) returns only the new text. It never returns part of a UTF-8 character: a character
    spelled with byte-fallback tokens (`<0xF0>` `<0x9F>` `<0x98>` `<0x80>`) decodes to U+FFFD until
    its last byte arrives, and the decoder holds text back while the decoded text ends with U+FFFD.
    flush() returns what is still held back at the end (U+FFFD for bytes that never completed).

    The concatenated deltas (push... + flush) equal `tokenizer.decode(all ids)`, including the one
    leading space stripped at the start of the generated text. One exception, only for invalid
    UTF-8: the tokenizers byte fallback turns a whole run of consecutive byte tokens into U+FFFDs
    when any byte of the run is invalid; if the run's beginning was already valid and emitted (say
    `<0x41>` "A", then a stray `<0x80>`), the stream keeps "A" and adds one U+FFFD, while decode()
    gives two U+FFFDs. Text of the same length, never a partial character.

    Cost: each push decodes only the ids since the last non-byte token (a short window), not the
    whole generation.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = tokenizer.special_ids if skip_special_tokens else frozenset()
        self._window: list[int] = []  # kept ids since the window start (a non-byte token, or the start)
        self._at_start = True  # the window begins the generated text
        self._window_emitted = ""  # text of the window already returned
        self._parts: list[str] = []  # every delta returned so far
        self.token_ids: list[int] = []  # every id pushed, special ones included

    @property
    def text(self) -> str:
        """All text returned so far (concatenated deltas)."""
        return "".join(self._parts)

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        self.token_ids.append(token_id)
        if token_id < 0 or token_id in self._skip:
            return ""  # removed by decode(skip_special_tokens=True) too, and does not split a byte run
        self._window.append(token_id)
        window_text = self._tokenizer._decode_window(self._window, self._at_start)
        if window_text.endswith(_REPLACEMENT):
            return ""  # an incomplete character (or invalid bytes): wait for more bytes or flush()
        delta = self._emit(window_text)
        if not self._tokenizer.is_byte_token(token_id):
            # A non-byte token closes any byte run before it, so the text up to here can no longer
            # change: start a new window at this token. Its unstripped text counts as emitted (the
            # one space decode() strips at the very start is never emitted). While the decoder has
            # produced no character at all (e.g. ids without a token), the strip is still pending:
            # keep the window from the start.
            if self._tokenizer._decode_window(self._window, at_start=False):
                self._window = [token_id]
                self._at_start = False
                self._window_emitted = self._tokenizer._decode_window(self._window, at_start=False)
        return delta

    def flush(self) -> str:
        """Return the text still held back (bytes that never formed a character), at the end."""
        if not self._window:
            return ""
        return self._emit(self._tokenizer._decode_window(self._window, self._at_start))

    def _emit(self, window_text: str) -> str:
        # Normally window_text extends what was emitted; see the class docstring for the exception.
        delta = window_text[len(self._window_emitted):]
        self._window_emitted = window_text
        if delta:
            self._parts.append(delta)
        return delta
