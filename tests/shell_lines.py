"""Command lines written in docs and --help epilogs -> phi3v's argv (for tests that parse or run them).

    example_argv('phi3v ocr page.jpg --format markdown > page.md   # note') -> ["ocr", "page.jpg", "--format", "markdown"]
"""

from __future__ import annotations

import re
import shlex

SHELL_OPERATORS = {"|", ">", ">>", "<", "&&", "||", ";", "&", "2>"}


def example_argv(line: str) -> list[str]:
    """phi3v's arguments in a shell line "phi3v ARGS [| > < ...] [# comment] [(explanation)]"."""
    line = re.split(r"\s{3,}", line.strip())[0]  # an explanation after a wide gap: "phi3v config      every option"
    lexer = shlex.shlex(line.rstrip("\\"), posix=True, punctuation_chars=True)  # a continued line: its part
    lexer.whitespace_split = True
    words = []
    for word in lexer:
        if word in SHELL_OPERATORS or word.startswith(("(", "#")):
            break
        words.append(word)
    return words[1:]
