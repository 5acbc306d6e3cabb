"""Running a parsed command: usage checks, one-line errors with hints, exit codes.

    run_parsed(parser, argv)   parse, run the command's usage check, run its function
    run_with_errors(fn, args)  fn(args) -> exit code; a Phi3VError becomes one line + a hint
    run_alone(register, name)  one command without the others (`python -m phi3v.cli.quantize`)
    missing_extra(err, ...)    the error for an optional dependency that is not installed

A command's sub-parser sets `func=` (args -> exit code, None meaning 0) and may set `check=`
(args -> None, calling `args.parser.error(...)` for rules argparse cannot express).
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import (
    CheckpointError,
    DeviceError,
    ImageFormatError,
    ModelNotFoundError,
    Phi3VError,
    PromptError,
    PromptTooLongError,
    TooManyImagesError,
)
from .output import print_error

_HINTS = [
    (PromptTooLongError, "use a smaller --num-crops, fewer images, a shorter prompt or a smaller --max-tokens"),
    (TooManyImagesError, "give fewer images"),
    # only for a format problem: a missing, empty or too large image says what to do in its message
    (ImageFormatError, "supported: PNG, JPEG, GIF (first frame), WebP, BMP, TIFF files, \"-\" for stdin, http(s) URLs"),
    (ModelNotFoundError, "pass a checkpoint folder with --model, or fetch the model once while "
                         "online: phi3v download MODEL"),
    (CheckpointError, "the folder is not a complete Phi-3-vision checkpoint; download it again "
                      "with `phi3v download MODEL`"),
    (DeviceError, "use --device cpu or --device auto; for a GPU, install a PyTorch build with CUDA "
                  "(see https://pytorch.org/get-started/locally/)"),
    (PromptError, "see `phi3v COMMAND --help` for how prompts and images are given"),
]


def hint_for(err: Phi3VError, args=None) -> tuple[str, str | None]:
    """(message, hint) for a person; a hint set on the error (`cli_hint`) wins over the default."""
    hint = getattr(err, "cli_hint", None)
    if hint is None:
        hint = next((h for cls, h in _HINTS if isinstance(err, cls)), None)
    return str(err) or type(err).__name__, hint


def missing_extra(err: ModuleNotFoundError, command: str, extra: str) -> Phi3VError:
    """`phi3v COMMAND` needs an optional dependency that is not installed: say which extra brings it."""
    failure = Phi3VError(f"phi3v {command} needs the '{extra}' extra ({err.name or err} is not installed)")
    failure.cli_hint = f"pip install 'phi3v[{extra}]'"
    return failure


def run_with_errors(fn, args) -> int:
    """Run `fn(args)`; turn failures into one line on stderr and an exit code.

    Phi3VError -> message + hint, exit 1. Ctrl-C -> exit 130. A closed stdout pipe -> exit 0.
    Anything else -> one line naming the exception, exit 1. With --verbose the traceback follows.
    """
    verbose = getattr(args, "verbose", False)
    try:
        code = fn(args)
        return 0 if code is None else int(code)
    except Phi3VError as err:
        if verbose:
            import traceback

            traceback.print_exc()
        message, hint = hint_for(err, args)
        print_error(message, hint)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `phi3v ... | head`: the reader left; not an error
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:  # pragma: no cover
            pass
        return 0
    except Exception as err:  # a bug or an environment problem: still one clear line
        if verbose:
            import traceback

            traceback.print_exc()
            print_error(f"{type(err).__name__}: {err}")
        else:  # a command without --verbose must not be told to use it
            hint = ("run again with --verbose for the traceback" if hasattr(args, "verbose")
                    else "this is a bug or an environment problem: please report it with the command line")
            print_error(f"unexpected {type(err).__name__}: {err}", hint)
        return 1


def run_parsed(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse `argv` with `parser` (sub-commands), check the usage, run the command: the exit code.

    Before parsing: a mistyped command is a usage error with "did you mean ...?" (suggest.py),
    and the command's configurable flags take their defaults from the environment and the
    config file (configuration.py: flag > environment > file > default).
    """
    from .configuration import apply_configuration, command_parsers
    from .suggest import first_command_token, unknown_command_message

    argv = sys.argv[1:] if argv is None else list(argv)
    token = first_command_token(argv)
    commands = command_parsers(parser)
    if token is not None and commands and token not in commands:
        parser.error(unknown_command_message(token, commands))
    apply_configuration(parser, argv)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None) or not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return 2
    check = getattr(args, "check", None)
    if check is not None:
        check(args)  # usage errors exit 2 through parser.error
    return run_with_errors(args.func, args)


def run_alone(register, name: str, argv: list[str] | None = None) -> int:
    """`phi3v NAME ARGS` with only NAME registered (for `python -m phi3v.cli.NAME ARGS`)."""
    parser = argparse.ArgumentParser(prog="phi3v")
    register(parser.add_subparsers(dest="command", metavar="COMMAND"), name)
    return run_parsed(parser, [name, *(sys.argv[1:] if argv is None else argv)])
