"""describe, ocr, table, compare, ask: one answer about zero or more images.

Each is a preset prompt of phi3v.tasks (`ask` takes the question as --prompt), the images
opened before the model loads (a wrong path fails in milliseconds), the answer streamed to
stdout, or printed whole with --no-stream, or as one JSON object with --json.
"""

from __future__ import annotations

import sys

from .. import tasks
from ..errors import Phi3VError
from .arguments import (HelpFormatter, answer_parent, constraint_kwargs, generation_parent, model_parent,
                        options_from_args, output_parent, structured_parent, video_parent)
from .images import open_cli_images
from .loading import dtype_name, load_model_from_args
from .remote import add_server_flag
from .stdin_prompt import prompt_from_stdin
from .output import finish_answer, format_timings, note, print_json
from .streaming import stream_answer
from .video import answer_video, is_video_argument, selection_given

IMAGE_HELP = "an image: file path, - for stdin, or http(s) URL"
IMAGES = {  # command -> (nargs of IMAGE, its help)
    "describe": ("?", IMAGE_HELP + ", or a video: file or folder of frames (docs/video.md)"),
    "ocr": ("?", IMAGE_HELP),
    "table": ("?", IMAGE_HELP),
    "compare": ("*", "two or more images"),
    "ask": ("*", "zero or more images"),
}

EXAMPLES = {
    "describe": """examples:
  phi3v describe photo.jpg
  phi3v describe photo.jpg --max-tokens 200 --json
  phi3v describe clip.mp4 --frames 8              (a video: its frames, in order)
  curl -s https://example.com/a.png | phi3v describe -
  phi3v describe --show-prompt""",
    "ocr": """examples:
  phi3v ocr receipt.png
  phi3v ocr page.jpg --format markdown > page.md
  phi3v ocr scan.tiff --num-crops 16 --no-stream""",
    "table": """examples:
  phi3v table chart.png
  phi3v table table.png --format csv > data.csv
  phi3v table chart.png --format json          (JSON: {"columns": [...], "rows": [[...], ...]})
  phi3v table chart.png --format json --json   (the answer's data under "parsed")""",
    "compare": """examples:
  phi3v compare before.png after.png
  phi3v compare a.jpg b.jpg c.jpg --num-crops 4
  phi3v compare v1.png v2.png --prompt "Which one has more contrast?\"""",
    "ask": """examples:
  phi3v ask photo.jpg -p "How many people are in this picture?"
  phi3v ask a.png b.png -p "Which of the two images is brighter?"
  phi3v ask -p "Write a haiku about autumn."            (text only)
  echo "What is in this picture?" | phi3v ask photo.jpg  (the question from stdin; also -p -)
  phi3v ask https://example.com/cat.jpg -p "What breed?" --temperature 0.7 --seed 1
  phi3v ask photo.jpg -p "Is there a dog?" --choices yes,no
  phi3v ask receipt.png -p "The total?" --regex '[0-9]+\\.[0-9]{2}'
  phi3v ask receipt.png -p "Read the receipt." --schema receipt.schema.json
  phi3v ask photo.jpg -p "What is this?" --server http://127.0.0.1:8000   (a running phi3v serve answers)""",
}


def register(sub, name: str) -> None:
    task = tasks.TASKS[name]
    nargs, image_help = IMAGES[name]
    parents = [model_parent(), output_parent(), generation_parent(), answer_parent(), structured_parent()]
    if name == "describe":  # `phi3v describe clip.mp4` describes a video (cli/video.py)
        parents.append(video_parent())
    p = sub.add_parser(name, parents=parents, help=task.summary, description=f"{name}: {task.summary}.", epilog=EXAMPLES[name],
                       formatter_class=HelpFormatter)
    p.add_argument("images", nargs=nargs, metavar="IMAGE", help=image_help)
    if name != "ask" and len(task.formats) > 1:
        p.add_argument("--format", choices=task.formats, default=task.default_format,
                       help="output format (default: %(default)s)")
    if name == "ask":
        p.add_argument("-p", "--prompt", default=None, metavar="QUESTION",
                       help="the question; - reads it from stdin, as does a pipe when -p is absent")
    else:
        p.add_argument("--prompt", default=None, metavar="TEXT",
                       help="use TEXT instead of the built-in prompt (- reads it from stdin)")
        p.add_argument("--show-prompt", action="store_true", help="print the prompt and exit")
    add_server_flag(p)  # --server URL: a running `phi3v serve` answers (cli/remote.py)
    p.set_defaults(func=run, check=check_usage, show_prompt=False, parser=p)


def check_usage(args) -> None:
    """Image-count rules argparse cannot express; violations are usage errors (exit 2)."""
    if not isinstance(args.images, list):  # nargs="?" gives one string or None
        args.images = [] if args.images is None else [args.images]
    if args.command in ("describe", "ocr", "table") and not args.images and not args.show_prompt:
        args.parser.error("an IMAGE is required (a path, - for stdin, or a URL)")
    if args.command == "compare" and len(args.images) < 2 and not args.show_prompt:
        args.parser.error(f"compare needs at least two images, got {len(args.images)}")
    if args.command == "describe" and args.images and is_video_argument(args.images[0]):
        if len(args.images) > 1:
            args.parser.error("describe takes one video")
    elif selection_given(args):
        args.parser.error("--frames, --fps, --start, --end and --time-labels apply to a video "
                          "(a video file or a folder of frames)")
    prompt_from_stdin(args, required=args.command == "ask")  # -p -, or `echo question | phi3v ask`
    if args.command == "ask" and not args.prompt.strip():
        args.parser.error("the --prompt is empty")


def run(args) -> int:
    if args.command == "describe" and args.images and is_video_argument(args.images[0]):
        prompt = args.prompt or tasks.VIDEO_DESCRIBE_PROMPT
        if args.show_prompt:
            print(prompt)
            return 0
        return answer_video(args, args.images[0], prompt)
    prompt = task_prompt(args)
    if args.show_prompt:
        print(prompt)
        return 0
    images = open_cli_images(args.images)  # before loading: bad paths fail in milliseconds
    options = options_from_args(args)
    if not constraint_kwargs(args):  # table --format json: the table's shape
        args.schema = tasks.task_schema(args.command, getattr(args, "format", None))
    if args.server:  # a running `phi3v serve` answers: no model load here (cli/remote.py)
        from .remote import remote_answer

        model, completion = remote_answer(args, prompt, images, options)
    else:
        model = load_model_from_args(args)
        completion = stream_answer(model, source_for(prompt, images, args.system), options, images, args)
    report(args, model, completion, prompt, images)
    check_structured(args, completion)
    return 0


def check_structured(args, completion) -> None:
    """With an output constraint, an answer that ended before its structure did is an error (exit 1)."""
    if constraint_kwargs(args) and completion.parsed is None:
        what = "JSON" if getattr(args, "schema", None) is not None else "answer"
        err = Phi3VError(f"the {what} is incomplete: generation ended ({completion.finish_reason}) "
                         "before the structure was complete")
        err.cli_hint = ("raise --max-tokens" if completion.finish_reason == "length"
                        else "a --stop string may have cut it; drop --stop")
        raise err


def task_prompt(args) -> str:
    """The prompt of a task command: --prompt overrides the built-in one."""
    if args.command == "ask":
        return tasks.task_prompt("ask", question=args.prompt)
    if args.prompt:
        return args.prompt
    return tasks.task_prompt(args.command, getattr(args, "format", None))


def source_for(prompt: str, images, system: str | None):
    """A plain prompt (+ images) or, with a system message, the equivalent messages."""
    if not system:
        return prompt
    parts = [{"type": "image", "image": im.image} for im in images]
    parts.append({"type": "text", "text": prompt})
    return [{"role": "system", "content": system}, {"role": "user", "content": parts}]


def report(args, model, completion, prompt: str, images) -> None:
    """--json object, or --no-stream text; --verbose timings on stderr."""
    if args.json:
        timings = completion.timings.to_dict()
        timings["load_s"] = getattr(args, "load_s", None)
        print_json({
            "command": args.command,
            "model": model.name,
            "device": str(model.device),
            "dtype": dtype_name(model.dtype),
            "num_crops": args.num_crops or getattr(model, "default_num_crops", None),
            "prompt": prompt,
            "images": [im.label for im in images],
            "text": completion.text,
            **({"parsed": completion.to_dict().get("parsed")} if constraint_kwargs(args) else {}),
            "finish_reason": completion.finish_reason,
            "usage": completion.usage.to_dict(),
            "timings": timings,
        })
    elif args.no_stream:
        sys.stdout.write(completion.text)
        finish_answer(completion.text)
    if args.verbose:
        note(format_timings(completion.timings.to_dict(), completion.usage.to_dict(),
                            getattr(args, "load_s", None)))
