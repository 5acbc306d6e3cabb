"""A prompt read from standard input: `echo "question" | phi3v ask photo.jpg`, or `--prompt -`.

`phi3v ask` reads its question from stdin when -p is `-`, or when -p is absent and stdin is not
a terminal (a pipe or a file). The other answer commands read `--prompt -` only. Stdin carries
one thing: a prompt or an image (`-` as IMAGE), never both.
"""

from __future__ import annotations

import sys

from .output import is_tty


def wants_stdin_prompt(prompt: str | None, required: bool) -> bool:
    """Whether the prompt comes from stdin: `-`, or missing where one is required and stdin is piped."""
    return prompt == "-" or (prompt is None and required and not is_tty(sys.stdin))


def prompt_from_stdin(args, required: bool) -> None:
    """Replace args.prompt by stdin's text when it is meant to come from there; usage errors exit 2."""
    if not wants_stdin_prompt(args.prompt, required):
        if required and args.prompt is None:
            args.parser.error("a question is required: -p/--prompt QUESTION, -p - (stdin), or piped in: "
                              "echo 'What is this?' | phi3v ask photo.jpg")
        return
    if "-" in args.images:
        args.parser.error("stdin holds the image (IMAGE -), so it cannot hold the prompt too: give it with -p")
    text = sys.stdin.read().strip()
    if not text and args.prompt is None:  # nothing piped in (stdin was /dev/null, say)
        args.parser.error("a question is required: -p/--prompt QUESTION, -p - (stdin), or piped in")
    if not text:
        args.parser.error("the prompt read from stdin is empty")
    args.prompt = text
