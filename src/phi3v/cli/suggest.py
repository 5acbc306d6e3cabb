""""did you mean describe?": a mistyped command becomes a usage error that names the closest ones."""

from __future__ import annotations

import difflib


def unknown_command_message(token: str, commands) -> str | None:
    """The error for `phi3v TOKEN ...` when TOKEN is not a command (None when it is one).

    Close matches come from difflib (ratio >= 0.6, at most three); a prefix of exactly one command
    (`phi3v desc`) names that one too.
    """
    names = list(commands)
    if token in names:
        return None
    close = difflib.get_close_matches(token, names, n=3, cutoff=0.6)
    prefixed = [n for n in names if n.startswith(token)] if len(token) >= 2 else []
    guesses = list(dict.fromkeys(close + prefixed))[:3]
    message = f"unknown command {token!r}"
    if guesses:
        return f"{message}; did you mean {' or '.join(guesses)}?"
    return f"{message} (commands: {', '.join(names)})"


def first_command_token(argv: list[str]) -> str | None:
    """The token where argparse expects the command: the first that is not an option."""
    return next((t for t in argv if not t.startswith("-")), None)
