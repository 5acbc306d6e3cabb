"""The `phi3v` command (console script `phi3v`, also `python -m phi3v`): the command table.

Each command lives in the module COMMANDS names; that module's `register(subparsers, name)`
adds the sub-parser (its options, `func=` to run it and optionally `check=` for usage rules)
and imports nothing heavy at module level: torch, the model, fastapi and ray are imported when
a command runs, so `phi3v --help`, every `phi3v COMMAND --help` and usage errors are quick.

    answer.py    describe, ocr, table, compare, ask     chat.py      chat
    video.py     video (a clip's frames as the images; describe hands videos to it)
    extract.py   extract (JSON following a schema)
    download.py  download                               info.py      info
    serve.py     serve                                  batch.py     batch
    quantize.py  quantize                               bench.py     bench
    eval.py      eval (accuracy on labelled images, variants compared)
    config_command.py  config (defaults from the environment and the config file: configuration.py)
    completion.py  completion (bash, zsh, fish scripts made from these parsers)
    models.py    list, rm (the models on this machine: local_models.py)

Shared: arguments.py (option groups, argument types), running.py (errors, hints, exit codes),
loading.py (--model etc. -> phi3v.load), streaming.py, output.py, images.py.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from . import (answer, batch, bench, chat, completion, config_command, download, eval, extract, info,
               models, quantize, serve)
from .running import run_parsed
from . import video

# command -> the module that registers it; the order of `phi3v --help`
COMMANDS = {
    "describe": answer,
    "ocr": answer,
    "table": answer,
    "compare": answer,
    "ask": answer,
    "video": video,
    "extract": extract,
    "chat": chat,
    "download": download,
    "info": info,
    "serve": serve,
    "batch": batch,
    "quantize": quantize,
    "bench": bench,
    "eval": eval,
    "config": config_command,
    "completion": completion,
    "list": models,
    "rm": models,
}

MAIN_EPILOG = """examples:
  phi3v describe photo.jpg
  phi3v ocr receipt.png --format markdown
  phi3v table chart.png --format csv
  phi3v ask photo.jpg -p "What colour is the car?"
  phi3v extract receipt.png --schema receipt.schema.json
  phi3v chat photo.jpg

`phi3v COMMAND --help` shows every option and examples. The model is chosen with --model
or the PHI3V_MODEL environment variable."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phi3v", description="Ask Phi-3-Vision / Phi-3.5-Vision about images, from a terminal.",
        epilog=MAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"phi3v {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        module.register(sub, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_parsed(build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
