"""Terminal output for the `phi3v` command: colours, the spinner, streaming, timings, JSON.

Plain ANSI escapes, no dependencies. Colour is used only when the stream is a terminal,
TERM is not "dumb" and NO_COLOR is unset or empty (https://no-color.org). The answer itself
goes to stdout uncoloured, so it can be piped; everything about the answer (errors, hints,
spinner, timings) goes to stderr.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import threading
import time

_CODES = {"red": "31", "green": "32", "yellow": "33", "blue": "34", "cyan": "36",
          "bold": "1", "dim": "2"}


def is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def use_colour(stream) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("TERM") == "dumb":
        return False
    return is_tty(stream)


def style(text: str, colour: str, stream=None) -> str:
    """`text` wrapped in the ANSI code of `colour` when `stream` (default stderr) shows colour."""
    stream = sys.stderr if stream is None else stream
    if not use_colour(stream):
        return text
    return f"\033[{_CODES[colour]}m{text}\033[0m"


def print_error(message: str, hint: str | None = None) -> None:
    """One line `phi3v: error: ...` and an optional `hint: ...` line, on stderr."""
    err = sys.stderr
    print(f"{style('phi3v: error:', 'red')} {message}", file=err)
    if hint:
        print(f"{style('hint:', 'yellow')} {hint}", file=err)
    err.flush()


def note(message: str) -> None:
    """A dim informational line on stderr (timings, saved files)."""
    print(style(message, "dim"), file=sys.stderr, flush=True)


class Spinner:
    """`with Spinner("encoding image"):` shows `⠋ encoding image 1.3s` on stderr until the block ends.

    A daemon thread redraws the line ten times a second; torch releases the GIL in its kernels,
    so the spinner keeps turning during the vision encoder and the prefill. Disabled (no output
    at all) when stderr is not a terminal or `enabled` is False. `stop()` may be called early,
    e.g. when the first token arrives, and is idempotent.
    """

    FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"

    def __init__(self, message: str, enabled: bool = True, stream=None):
        self.message = message
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled and is_tty(self.stream)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Spinner":
        if self.enabled:
            self._started = time.perf_counter()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        for frame in itertools.cycle(self.FRAMES):
            elapsed = time.perf_counter() - self._started
            self.stream.write(f"\r{style(frame, 'cyan', self.stream)} {self.message} "
                              f"{style(f'{elapsed:.1f}s', 'dim', self.stream)}")
            self.stream.flush()
            if self._stop.wait(0.1):
                break
        self.stream.write("\r\033[K")  # clear the spinner line
        self.stream.flush()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def __exit__(self, *exc) -> None:
        self.stop()


def format_timings(timings: dict, usage: dict | None = None, load_s: float | None = None) -> str:
    """One line for --verbose: load, preprocessing, vision, prefill, decode tokens/s."""
    parts = []
    if load_s is not None:
        parts.append(f"load {load_s:.2f}s")
    parts.append(f"preprocess {timings.get('preprocess_s', 0.0):.2f}s")
    parts.append(f"vision {timings.get('vision_s', 0.0):.2f}s")
    parts.append(f"prefill {timings.get('prefill_s', 0.0):.2f}s")
    parts.append(f"first token {timings.get('first_token_s', 0.0):.2f}s")
    decode = f"decode {timings.get('decode_s', 0.0):.2f}s ({timings.get('decode_tokens_per_s', 0.0):.1f} tok/s)"
    parts.append(decode)
    if usage:
        parts.append(f"tokens: prompt {usage.get('prompt_tokens', 0)} "
                     f"(image {usage.get('image_tokens', 0)}), completion {usage.get('completion_tokens', 0)}")
    return " · ".join(parts)


def write_answer_delta(delta: str) -> None:
    sys.stdout.write(delta)
    sys.stdout.flush()


def finish_answer(text: str) -> None:
    """End the streamed answer with exactly one newline (the model rarely ends with one)."""
    if not text.endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()


def print_json(obj: dict) -> None:
    """One JSON object on one line of stdout (UTF-8 text as is, not \\u escapes)."""
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()
