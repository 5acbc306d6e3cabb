"""Streaming one answer to the terminal (the answer commands and chat), with the too-long hint."""

from __future__ import annotations

from dataclasses import asdict

from ..errors import Phi3VError, PromptTooLongError
from .arguments import constraint_kwargs
from .output import Spinner, finish_answer, write_answer_delta


def stream_answer(model, source, options, images, args, extra: dict | None = None):
    """Generate for `source` (a prompt string or messages), printing as the text arrives.

    `images` are the CliImages of the request (sent with a prompt string; inside the messages
    otherwise), used for the too-long hint. While the image is encoded and the prompt prefilled
    a spinner turns on stderr (terminal only); deltas go to stdout unless --json / --no-stream.
    Returns the Completion. Ctrl-C closes the stream (generation stops at once), ends the
    partial answer's line and lets the KeyboardInterrupt propagate (exit 130; chat drops that
    question). `extra`: more model.stream keywords (a video and its frame selection).
    """
    printing = not (getattr(args, "json", False) or getattr(args, "no_stream", False))
    pil_images = [im.image for im in images] if isinstance(source, str) else None
    spinner = Spinner("encoding and prefilling" if printing else "generating",
                      enabled=not getattr(args, "quiet", False))
    stream = None
    text = []
    try:
        with spinner:
            kwargs = {**asdict(options), **constraint_kwargs(args), **(extra or {})}  # --schema / --regex / --choices
            if pil_images is None:
                stream = model.stream(source, **kwargs)
            else:
                stream = model.stream(source, images=pil_images, **kwargs)
            for delta in stream:
                if printing:
                    spinner.stop()
                    write_answer_delta(delta)
                text.append(delta)
    except PromptTooLongError as err:
        if extra and extra.get("video") is not None:
            err.cli_hint = "ask for fewer --frames (or a lower --fps), a shorter --start/--end window or a smaller --num-crops"
            raise
        err.cli_hint = too_long_hint(err, images, options.max_new_tokens, options.num_crops
                                     or getattr(model, "default_num_crops", None))
        raise
    except Phi3VError as err:  # a schema/regex the grammar engine refuses: one line and where to read more
        from ..engine.constraints import OutputFormatError

        if isinstance(err, OutputFormatError):
            failure = OutputFormatError(" ".join(str(err).split()))
            failure.cli_hint = "docs/structured.md says what a schema may contain"
            raise failure from None
        raise
    except KeyboardInterrupt:
        if stream is not None:
            stream.close()
        if printing and text:
            finish_answer("".join(text))
        raise
    if printing:
        finish_answer("".join(text))
    return stream.completion


def too_long_hint(err: PromptTooLongError, images, max_new_tokens: int, num_crops: int | None) -> str:
    """Suggest the largest --num-crops with which the prompt and the answer fit the context.

    The engine shortens the answer to the room left, so "fits" means: the prompt plus the
    requested --max-tokens if possible, else the prompt plus at least one new token.
    """
    from ..engine.image import num_image_tokens

    text_tokens = err.prompt_tokens - err.image_tokens
    if not images:
        return "shorten the prompt (or the conversation: /reset in chat)"

    def image_tokens_at(n: int) -> int:
        return sum(num_image_tokens(*im.image.size, n) for im in images)

    candidates = range((num_crops or 16) - 1, 0, -1)
    for room in (max_new_tokens, 1):
        for n in candidates:
            tokens = image_tokens_at(n)
            if text_tokens + tokens + room <= err.limit:
                while n > 1 and image_tokens_at(n - 1) == tokens:  # same grid: name the smallest n
                    n -= 1
                return (f"try --num-crops {n}: the images then cost {tokens} tokens instead of "
                        f"{err.image_tokens} (or use fewer images)")
    return (f"even at --num-crops 1 the images cost {image_tokens_at(1)} tokens; "
            "use fewer images or a shorter prompt")
