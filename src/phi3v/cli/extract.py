"""`phi3v extract IMAGE --schema FILE.json`: the fields of a receipt, an invoice or a form as JSON.

The answer is constrained to the schema token by token (engine/constraints.py) and the prompt
shows the model the schema. stdout is exactly the JSON object, on one line (compact, so it pipes
into jq or appends to a JSONL file); --json prints the usual answer object with it under "parsed".
An answer cut short by --max-tokens prints nothing on stdout and exits 1.
"""

from __future__ import annotations

import json
import sys

from .. import tasks
from ..errors import Phi3VError
from .answer import IMAGE_HELP, report, source_for
from .arguments import (HelpFormatter, add_schema_argument, generation_parent, model_parent, options_from_args,
                        output_parent)
from .images import open_cli_images
from .loading import load_model_from_args
from .streaming import stream_answer

EXAMPLES = """examples:
  phi3v extract receipt.png --schema receipt.schema.json
  phi3v extract form.jpg --schema form.schema.json --prompt "Dates as YYYY-MM-DD." | jq .name
  phi3v extract receipt.png --schema receipt.schema.json --json     (text, parsed, usage, timings)

see docs/structured.md for a receipt schema and what a schema may not contain"""


def register(sub, name: str) -> None:
    p = sub.add_parser(name, parents=[model_parent(), output_parent(), generation_parent()],
                       help="fields of an image (receipt, form) as JSON following a schema",
                       description="extract: the fields a JSON Schema describes, read from an image, "
                                   "as one JSON object.",
                       epilog=EXAMPLES, formatter_class=HelpFormatter)
    p.add_argument("images", nargs=1, metavar="IMAGE", help=IMAGE_HELP)
    g = p.add_argument_group("extraction")
    add_schema_argument(g, required=True)
    g.add_argument("--prompt", default=None, metavar="TEXT", help="extra instructions after the built-in prompt")
    g.add_argument("--json", action="store_true",
                   help="print one JSON object: text, parsed, finish_reason, usage, timings, model")
    g.add_argument("--show-prompt", action="store_true", help="print the prompt and exit")
    p.set_defaults(func=run, no_stream=True, parser=p)


def run(args) -> int:
    prompt = tasks.extract_prompt(args.schema, args.prompt)
    if args.show_prompt:
        print(prompt)
        return 0
    images = open_cli_images(args.images)
    options = options_from_args(args)
    model = load_model_from_args(args)
    completion = stream_answer(model, source_for(prompt, images, args.system), options, images, args)
    if completion.parsed is None:
        err = Phi3VError(f"the JSON is incomplete: generation ended ({completion.finish_reason}) "
                         f"after {completion.usage.completion_tokens} tokens")
        err.cli_hint = "raise --max-tokens" if completion.finish_reason == "length" else None
        raise err
    if not args.json:
        sys.stdout.write(json.dumps(completion.parsed, ensure_ascii=False) + "\n")
        sys.stdout.flush()
        args.no_stream = False  # report(): timings only (--verbose), the object is printed
    report(args, model, completion, prompt, images)
    return 0
