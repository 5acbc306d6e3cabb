"""`phi3v download [MODEL]`: fetch a model into the Hugging Face cache ahead of use, print its folder."""

from __future__ import annotations

import os
import sys

from .. import DEFAULT_MODEL
from .arguments import MODEL_ENV, HelpFormatter, output_parent
from .output import is_tty

EXAMPLES = """examples:
  phi3v download                                     (the default model)
  phi3v download microsoft/Phi-3.5-vision-instruct"""


def register(sub, name: str) -> None:
    # Not model_parent(): --device, --dtype, --quantize... mean nothing to a download.
    p = sub.add_parser(name, parents=[output_parent()], help="fetch a model into the cache ahead of use",
                       description="Download a model into the Hugging Face cache (with a progress bar) "
                                   "and print its folder.",
                       epilog=EXAMPLES, formatter_class=HelpFormatter)
    p.add_argument("model_name", nargs="?", metavar="MODEL", help="hub id (default: --model)")
    p.add_argument("-m", "--model", default=os.environ.get(MODEL_ENV) or DEFAULT_MODEL,
                   help=f"the same, as an option (default: %(default)s; environment: {MODEL_ENV})")
    p.add_argument("--revision", default=None, help="branch, tag or commit")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..engine.hub import resolve_model_dir

    progress = not args.quiet and is_tty(sys.stderr)
    folder = resolve_model_dir(args.model_name or args.model, progress=progress, revision=args.revision)
    print(folder)
    return 0
