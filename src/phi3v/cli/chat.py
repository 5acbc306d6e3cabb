"""`phi3v chat [IMAGE…]`: an interactive multi-turn session on the terminal (or a script on stdin).

Lines typed are questions; the answer streams back. Commands:
    /image PATH   attach an image (path or URL) to the next question
    /reset        forget the conversation (the images given on the command line are attached again)
    /save FILE    write the conversation as JSON: {"model": ..., "messages": [OpenAI-style messages]}
    /help         list the commands
    /quit         leave (so does Ctrl-D; Ctrl-C stops an answer, or clears the line)

The history is a list of turns holding the opened images, so each question re-sends the whole
conversation to model.stream(messages) with the image parts as PIL images; /save writes the
images as {"type": "image", "image": "<absolute path or URL>"} parts, which phi3v.engine.chat_template accepts.
A question that fails (too long for the context, bad image) is not added to the history.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

from ..errors import ImageError, Phi3VError, PromptTooLongError
from .arguments import (HelpFormatter, generation_parent, model_parent, options_from_args, output_parent,
                        structured_parent)
from .images import CliImage, is_url, open_cli_image, open_cli_images
from .loading import load_model_from_args
from .output import format_timings, is_tty, note, print_error, style
from .running import hint_for
from .streaming import stream_answer

EXAMPLES = """examples:
  phi3v chat
  phi3v chat photo.jpg --device cuda
  phi3v chat photo.jpg --choices yes,no        (every answer is yes or no)
  printf 'What is this?\\n/image b.png\\nAnd this one?\\n/save chat.json\\n' | phi3v chat a.png

in the session: /image PATH, /reset, /save FILE, /help, /quit (or Ctrl-D)"""

HELP = """commands:
  /image PATH   attach an image (file or http(s) URL) to the next question
  /reset        start over (images from the command line are attached again)
  /save FILE    write the conversation as JSON
  /help         this list
  /quit         leave (or Ctrl-D); Ctrl-C stops an answer"""


def register(sub, name: str) -> None:
    # no --json (answer_parent): a session's answers stream to the terminal; one JSON answer is `phi3v ask --json`
    p = sub.add_parser(name, parents=[model_parent(), output_parent(), generation_parent(), structured_parent()],
                       help="an interactive multi-turn session",
                       description="Chat about images: type questions; the answers stream.",
                       epilog=EXAMPLES, formatter_class=HelpFormatter)
    p.add_argument("images", nargs="*", metavar="IMAGE", help="images attached to the first question")
    p.add_argument("--no-stream", action="store_true", help="print each answer once it is complete")
    p.set_defaults(func=run)


def run(args) -> int:
    if "-" in args.images:
        raise ImageError("chat reads questions from stdin, so \"-\" cannot be an image; give a file name")
    args.initial_images = open_cli_images(args.images)
    args.json = False  # chat always streams to the terminal
    options = options_from_args(args)
    model = load_model_from_args(args)
    return run_chat(args, model, options)


@dataclass
class Turn:
    role: str  # "system" | "user" | "assistant"
    text: str
    images: list[CliImage] = field(default_factory=list)


def _saved_source(label: str) -> str:
    """How an image is named in a saved conversation: URLs as given, paths made absolute."""
    return label if is_url(label) else os.path.abspath(os.path.expanduser(label))


class ChatSession:
    """The conversation state; no terminal I/O here, so it is easy to reason about."""

    def __init__(self, initial_images: list[CliImage], system: str | None = None):
        self.initial_images = list(initial_images)
        self.system = system
        self.reset()

    def reset(self) -> None:
        self.turns: list[Turn] = [Turn("system", self.system)] if self.system else []
        self.pending: list[CliImage] = list(self.initial_images)

    def messages(self, question: str | None = None, *, for_save: bool = False) -> list[dict]:
        """OpenAI-style messages of the history (+ `question` with the pending images)."""
        turns = list(self.turns)
        if question is not None:
            turns.append(Turn("user", question, list(self.pending)))
        out = []
        for turn in turns:
            if not turn.images:
                out.append({"role": turn.role, "content": turn.text})
                continue
            parts = [{"type": "image", "image": _saved_source(im.label) if for_save else im.image}
                     for im in turn.images]
            parts.append({"type": "text", "text": turn.text})
            out.append({"role": turn.role, "content": parts})
        return out

    def all_images(self) -> list[CliImage]:
        """Every image the next question sends: the history's and the pending ones."""
        return [im for turn in self.turns for im in turn.images] + self.pending

    def record(self, question: str, answer: str) -> None:
        self.turns.append(Turn("user", question, self.pending))
        self.turns.append(Turn("assistant", answer))
        self.pending = []

    def save(self, path: str, model_name: str) -> None:
        data = {"model": model_name, "messages": self.messages(for_save=True)}
        with open(os.path.expanduser(path), "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=2)
            f.write("\n")


def _read_line(prompt: str, interactive: bool) -> str:
    """One line of input; raises EOFError at the end. The prompt is shown only on a terminal."""
    if interactive:
        return input(prompt)
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def run_chat(args, model, options) -> int:
    """The read-answer loop: each question streams its answer (stream_answer) with the whole history."""
    interactive = is_tty(sys.stdin)
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:  # pragma: no cover - not on every platform
            pass
    session = ChatSession(args.initial_images, system=args.system)
    if interactive and not args.quiet:
        print(style(f"phi3v chat with {model.name}: type a question, /help for commands, "
                    "Ctrl-D to leave", "dim"), file=sys.stderr)
        for im in session.pending:
            note(f"attached {im.label}")
    prompt = style("you> ", "green", sys.stdout)

    while True:
        try:
            line = _read_line(prompt, interactive).strip()
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:  # Ctrl-C at the prompt clears the line, as in a shell
            print(file=sys.stderr)
            continue
        if not line:
            continue
        if line.startswith("/"):
            if _command(line, session, model, args) == "quit":
                return 0
            continue
        try:
            completion = stream_answer(model, session.messages(line), options, session.all_images(), args)
        except KeyboardInterrupt:  # the answer was stopped: the question is not kept
            print(file=sys.stderr)
            continue
        except Phi3VError as err:
            message, hint = hint_for(err, args)
            if isinstance(err, PromptTooLongError):  # --num-crops and --max-tokens are fixed for the session
                hint = ("/reset to start a new conversation (or ask without the new images); for cheaper "
                        "images start phi3v chat again with a smaller --num-crops")
            print_error(message, hint)
            continue
        if args.no_stream:
            print(completion.text, flush=True)
        session.record(line, completion.text)
        if args.verbose:
            note(format_timings(completion.timings.to_dict(), completion.usage.to_dict()))


def _command(line: str, session: ChatSession, model, args) -> str | None:
    name, _, rest = line.partition(" ")
    rest = rest.strip()
    if name in ("/quit", "/exit", "/q"):
        return "quit"
    if name == "/help":
        print(HELP, file=sys.stderr)
    elif name == "/reset":
        session.reset()
        note("conversation cleared")
    elif name == "/image":
        if not rest:
            print_error("/image needs a path or URL", "e.g. /image photos/cat.jpg")
        elif rest == "-":
            print_error("chat reads its questions from stdin, so \"-\" cannot be an image here",
                        "give the image a file name")
        else:
            try:
                session.pending.append(open_cli_image(rest))
                note(f"attached {rest} to the next question")
            except ImageError as err:  # the hint that fits: the path, the format, ... (cli/running.py)
                print_error(*hint_for(err, args))
    elif name == "/save":
        if not rest:
            print_error("/save needs a file name", "e.g. /save chat.json")
        else:
            try:
                session.save(rest, model.name)
                note(f"saved {len(session.turns)} messages to {rest}")
            except OSError as err:
                print_error(f"cannot write {rest}: {err.strerror or err}")
    else:
        print_error(f"unknown command {name}", "type /help for the list")
    return None
