"""The `phi3v` command (console script `phi3v`, also `python -m phi3v`).

Subcommands here: describe, ocr, table, compare, ask, chat, download, info.

How other parts add subcommands
-------------------------------
`build_parser()` imports each module of PLUGIN_MODULES (phi3v.cli.serve, phi3v.cli.batch,
phi3v.cli.quantize, phi3v.cli.bench) and calls its

    register(subparsers, common)

`subparsers` is the argparse sub-parser action; `common` is the parent parser carrying the
shared options (--model, --device, --dtype, --num-crops). A plugin writes

    def register(subparsers, common):
        p = subparsers.add_parser("serve", parents=[common], help="...", epilog="examples: ...",
                                  formatter_class=cli.HelpFormatter)
        p.add_argument("--port", type=int, default=8000)
        p.set_defaults(func=serve)          # serve(args) -> int exit code (None means 0)

and inside `serve`: `model = cli.load_model_from_args(args)`. `main()` runs `args.func` through
`run_with_errors`, so a Phi3VError becomes one line + a hint and exit code 1 (a traceback only
with --verbose). `generation_parent()` gives the sampling options (--max-tokens, --temperature,
...) and `options_from_args(args)` turns them into GenerationOptions, for plugins that generate.
`output_parent()` gives --quiet/--verbose (with args.verbose, run_with_errors prints tracebacks).
A plugin module that does not exist (ModuleNotFoundError naming that module or its package) is
skipped silently. Any other failure while importing or registering a plugin prints one warning
line and the rest of the command keeps working; so a plugin should import heavy optional
dependencies (fastapi, ray, ...) inside its command function, not at module level.

Keep this module light to import: argparse and phi3v's small modules only; torch and the
model are imported when a command runs, so `--help`, `--show-prompt` and usage errors are quick.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import time

from .. import tasks as _tasks
from .output import (
    Spinner,
    finish_answer,
    format_timings,
    is_tty,
    note,
    print_error,
    print_json,
    write_answer_delta,
)
from ..errors import (
    CheckpointError,
    DeviceError,
    ImageError,
    ModelNotFoundError,
    Phi3VError,
    PromptError,
    PromptTooLongError,
    TooManyImagesError,
)

PLUGIN_MODULES = ("phi3v.cli.serve", "phi3v.cli.batch", "phi3v.cli.quantize", "phi3v.cli.bench")
MODEL_ENV = "PHI3V_MODEL"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks; defaults are written in the help strings."""


# ---------------------------------------------------------------------------------------------
# argument types: bad values are usage errors (exit code 2) with a message naming the option


def _int_in(lo: int, hi: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


def _float_in(lo: float, hi: float, *, lo_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value < lo or value > hi or (lo_open and value == lo):
            raise argparse.ArgumentTypeError(f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}")
        return value

    return parse


def _device(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or mps, got {text!r}")
    return text


# ---------------------------------------------------------------------------------------------
# shared option groups


def common_parent() -> argparse.ArgumentParser:
    """--model, --device, --dtype, --num-crops: the options every model subcommand shares."""
    from .. import DEFAULT_MODEL

    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model")
    g.add_argument("-m", "--model", default=os.environ.get(MODEL_ENV) or DEFAULT_MODEL,
                   help=f"hub id or local folder (default: %(default)s; environment: {MODEL_ENV})")
    g.add_argument("--device", type=_device, default="auto", help="auto | cpu | cuda | cuda:N | mps (default: auto)")
    g.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="weights and compute dtype (default: auto = bfloat16, float32 on MPS)")
    g.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="quantize the decoder's linear layers while loading (weight-only; less memory, "
                        "faster decode on CPU; a checkpoint from `phi3v quantize` needs no flag)")
    g.add_argument("--low-memory", action=argparse.BooleanOptionalAction, default=None,
                   help="hand the vision tower's weight pages back to the OS after each image "
                        "(~0.6 GB less resident; default: on with --quantize or a quantized checkpoint)")
    g.add_argument("--num-crops", type=_int_in(1, 64), default=None,
                   help="max 336px crops per image (default: the model's; fewer = fewer tokens)")
    return p


def output_parent() -> argparse.ArgumentParser:
    """--quiet and --verbose (run_with_errors shows tracebacks when args.verbose is set)."""
    p = argparse.ArgumentParser(add_help=False)
    o = p.add_argument_group("output")
    o.add_argument("-q", "--quiet", action="store_true", help="no progress bars, spinner or notes")
    o.add_argument("-v", "--verbose", action="store_true",
                   help="timings (load, preprocessing, vision, prefill, decode tokens/s); tracebacks")
    return p


def generation_parent() -> argparse.ArgumentParser:
    """Sampling and output options of the commands that generate text."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("generation")
    g.add_argument("--max-tokens", type=_int_in(1), default=512, help="most tokens to generate (default: %(default)s)")
    g.add_argument("--temperature", type=_float_in(0.0, 100.0), default=0.0,
                   help="sampling temperature; 0 = greedy (default)")
    g.add_argument("--top-p", type=_float_in(0.0, 1.0, lo_open=True), default=1.0,
                   help="nucleus sampling mass (default: 1.0 = off)")
    g.add_argument("--top-k", type=_int_in(0), default=0, help="sample from the K likeliest tokens (default: 0 = off)")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when TEXT is generated (repeatable; TEXT is not printed)")
    g.add_argument("--system", default=None, metavar="TEXT", help="a system message")
    o = p.add_argument_group("answer")
    o.add_argument("--json", action="store_true",
                   help="print one JSON object: text, finish_reason, usage, timings, model")
    o.add_argument("--no-stream", action="store_true", help="print the answer once it is complete")
    return p


def options_from_args(args):
    """GenerationOptions from the parsed generation + common options."""
    from ..options import GenerationOptions

    return GenerationOptions(
        max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed, stop=tuple(args.stop or ()), num_crops=args.num_crops,
    )


# ---------------------------------------------------------------------------------------------
# model loading and error reporting (shared with the plugins)


def load_model_from_args(args):
    """phi3v.load with the common options; the seconds loading took are left in `args.load_s`.

    The model is first resolved to a folder (a hub download shows huggingface_hub's progress
    bars), then loaded under a spinner with the elapsed time; the second resolution inside
    phi3v.load is a cache hit. Bars and spinner only for a person watching a terminal.
    """
    import phi3v

    from ..engine.checkpoint import resolve_model_dir

    dtype = None if args.dtype in (None, "auto") else args.dtype
    show = not getattr(args, "quiet", False) and is_tty(sys.stderr)
    revision = getattr(args, "revision", None)
    resolve_model_dir(args.model, progress=show, revision=revision)
    start = time.perf_counter()
    with Spinner(f"loading {args.model}", enabled=show):
        model = phi3v.load(args.model, device=args.device, dtype=dtype, progress=show, revision=revision,
                           quantize=getattr(args, "quantize", None), low_memory=getattr(args, "low_memory", None))
    args.load_s = time.perf_counter() - start
    if getattr(args, "verbose", False):
        note(f"loaded {model.name} on {model.device} ({_dtype_name(model.dtype)}) in {args.load_s:.2f}s")
    return model


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


_HINTS = [
    (PromptTooLongError, "use a smaller --num-crops, fewer images, a shorter prompt or a smaller --max-tokens"),
    (TooManyImagesError, "give fewer images"),
    (ImageError, "supported: PNG, JPEG, GIF (first frame), WebP, BMP, TIFF files, \"-\" for stdin, http(s) URLs"),
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
        else:
            print_error(f"unexpected {type(err).__name__}: {err}",
                        "run again with --verbose for the traceback")
        return 1


# ---------------------------------------------------------------------------------------------
# generating and printing one answer


def _too_long_hint(err: PromptTooLongError, images, max_new_tokens: int, num_crops: int | None) -> str:
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


def stream_answer(model, source, options, images, args):
    """Generate for `source` (a prompt string or messages), printing as the text arrives.

    While the image is encoded and the prompt prefilled a spinner turns on stderr (terminal
    only); deltas go to stdout unless --json / --no-stream. Returns the Completion.
    Ctrl-C closes the stream (generation stops at once), ends the partial answer's line and
    lets the KeyboardInterrupt propagate (exit 130; chat drops that question).
    """
    printing = not (getattr(args, "json", False) or getattr(args, "no_stream", False))
    pil_images = [im.image for im in images] if isinstance(source, str) else None
    spinner = Spinner("encoding and prefilling" if printing else "generating",
                      enabled=not getattr(args, "quiet", False))
    stream = None
    text = []
    try:
        with spinner:
            if pil_images is None:
                stream = model.stream(source, **_option_kwargs(options))
            else:
                stream = model.stream(source, images=pil_images, **_option_kwargs(options))
            for delta in stream:
                if printing:
                    spinner.stop()
                    write_answer_delta(delta)
                text.append(delta)
    except PromptTooLongError as err:
        err.cli_hint = _too_long_hint(err, images, options.max_new_tokens, options.num_crops
                                      or getattr(model, "default_num_crops", None))
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


def _option_kwargs(options) -> dict:
    from dataclasses import asdict

    return asdict(options)


def _source_for(prompt: str, images, system: str | None):
    """A plain prompt (+ images) or, with a system message, the equivalent messages."""
    if not system:
        return prompt
    parts = [{"type": "image", "image": im.image} for im in images]
    parts.append({"type": "text", "text": prompt})
    return [{"role": "system", "content": system}, {"role": "user", "content": parts}]


def _report(args, model, completion, prompt: str, images) -> None:
    """--json object, or --no-stream text; --verbose timings on stderr."""
    if args.json:
        timings = completion.timings.to_dict()
        timings["load_s"] = getattr(args, "load_s", None)
        print_json({
            "command": args.command,
            "model": model.name,
            "device": str(model.device),
            "dtype": _dtype_name(model.dtype),
            "num_crops": args.num_crops or getattr(model, "default_num_crops", None),
            "prompt": prompt,
            "images": [im.label for im in images],
            "text": completion.text,
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


# ---------------------------------------------------------------------------------------------
# commands


def _task_prompt(args) -> str:
    """The prompt of a task command: --prompt overrides the built-in one."""
    if args.command == "ask":
        return _tasks.task_prompt("ask", question=args.prompt)
    if args.prompt:
        return args.prompt
    return _tasks.task_prompt(args.command, getattr(args, "format", None))


def cmd_task(args) -> int:
    """describe / ocr / table / compare / ask: one answer about the images."""
    from .images import open_cli_images

    prompt = _task_prompt(args)
    if args.show_prompt:
        print(prompt)
        return 0
    images = open_cli_images(args.images)  # before loading: bad paths fail in milliseconds
    options = options_from_args(args)
    model = load_model_from_args(args)
    completion = stream_answer(model, _source_for(prompt, images, args.system), options, images, args)
    _report(args, model, completion, prompt, images)
    return 0


def cmd_chat(args) -> int:
    from .chat import run_chat
    from .images import open_cli_images

    if "-" in args.images:
        raise ImageError("chat reads questions from stdin, so \"-\" cannot be an image; give a file name")
    args.initial_images = open_cli_images(args.images)
    args.json = False  # chat always streams to the terminal
    options = options_from_args(args)
    model = load_model_from_args(args)
    return run_chat(args, model, options, stream_answer)


def cmd_download(args) -> int:
    from ..engine.checkpoint import resolve_model_dir

    progress = not args.quiet and is_tty(sys.stderr)
    folder = resolve_model_dir(args.model_name or args.model, progress=progress, revision=args.revision)
    print(folder)
    return 0


def cmd_info(args) -> int:
    from .info import run_info

    return run_info(args)


# ---------------------------------------------------------------------------------------------
# the parser

EXAMPLES = {
    "describe": """examples:
  phi3v describe photo.jpg
  phi3v describe photo.jpg --max-tokens 200 --json
  curl -s https://example.com/a.png | phi3v describe -
  phi3v describe --show-prompt""",
    "ocr": """examples:
  phi3v ocr receipt.png
  phi3v ocr page.jpg --format markdown > page.md
  phi3v ocr scan.tiff --num-crops 16 --no-stream""",
    "table": """examples:
  phi3v table chart.png
  phi3v table table.png --format csv > data.csv
  phi3v table chart.png --format json --json""",
    "compare": """examples:
  phi3v compare before.png after.png
  phi3v compare a.jpg b.jpg c.jpg --num-crops 4
  phi3v compare v1.png v2.png --prompt "Which one has more contrast?\"""",
    "ask": """examples:
  phi3v ask photo.jpg -p "How many people are in this picture?"
  phi3v ask a.png b.png -p "Which of the two images is brighter?"
  phi3v ask -p "Write a haiku about autumn."            (text only)
  phi3v ask https://example.com/cat.jpg -p "What breed?" --temperature 0.7 --seed 1""",
    "chat": """examples:
  phi3v chat
  phi3v chat photo.jpg --device cuda
  printf 'What is this?\\n/image b.png\\nAnd this one?\\n/save chat.json\\n' | phi3v chat a.png

in the session: /image PATH, /reset, /save FILE, /help, /quit (or Ctrl-D)""",
    "download": """examples:
  phi3v download                                     (the default model)
  phi3v download microsoft/Phi-3.5-vision-instruct""",
    "info": """examples:
  phi3v info photo.jpg
  phi3v info a.png b.png --num-crops 4 --dtype bfloat16
  phi3v info --model microsoft/Phi-3.5-vision-instruct --json""",
}

MAIN_EPILOG = """examples:
  phi3v describe photo.jpg
  phi3v ocr receipt.png --format markdown
  phi3v table chart.png --format csv
  phi3v ask photo.jpg -p "What colour is the car?"
  phi3v chat photo.jpg

`phi3v COMMAND --help` shows every option and examples. The model is chosen with --model
or the PHI3V_MODEL environment variable."""


def _add_task_command(sub, name: str, common, output, generation, image_help: str, nargs: str) -> argparse.ArgumentParser:
    task = _tasks.TASKS[name]
    p = sub.add_parser(name, parents=[common, output, generation], help=task.summary,
                       description=f"{name}: {task.summary}.", epilog=EXAMPLES[name],
                       formatter_class=HelpFormatter)
    p.add_argument("images", nargs=nargs, metavar="IMAGE", help=image_help)
    if name != "ask" and len(task.formats) > 1:
        p.add_argument("--format", choices=task.formats, default=task.default_format,
                       help="output format (default: %(default)s)")
    if name == "ask":
        p.add_argument("-p", "--prompt", required=True, metavar="QUESTION", help="the question")
    else:
        p.add_argument("--prompt", default=None, metavar="TEXT", help="use TEXT instead of the built-in prompt")
        p.add_argument("--show-prompt", action="store_true", help="print the prompt and exit")
    p.set_defaults(func=cmd_task, show_prompt=False, parser=p)
    return p


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="phi3v", description="Ask Phi-3-Vision / Phi-3.5-Vision about images, from a terminal.",
        epilog=MAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"phi3v {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    common, output, generation = common_parent(), output_parent(), generation_parent()

    image = "an image: file path, - for stdin, or http(s) URL"
    _add_task_command(sub, "describe", common, output, generation, image, "?")
    _add_task_command(sub, "ocr", common, output, generation, image, "?")
    _add_task_command(sub, "table", common, output, generation, image, "?")
    _add_task_command(sub, "compare", common, output, generation, "two or more images", "*")
    _add_task_command(sub, "ask", common, output, generation, "zero or more images", "*")

    p = sub.add_parser("chat", parents=[common, output, generation], help="an interactive multi-turn session",
                       description="Chat about images: type questions; the answers stream.",
                       epilog=EXAMPLES["chat"], formatter_class=HelpFormatter)
    p.add_argument("images", nargs="*", metavar="IMAGE", help="images attached to the first question")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("download", parents=[common, output], help="fetch a model into the cache ahead of use",
                       description="Download a model into the Hugging Face cache (with a progress bar) "
                                   "and print its folder.",
                       epilog=EXAMPLES["download"], formatter_class=HelpFormatter)
    p.add_argument("model_name", nargs="?", metavar="MODEL", help="hub id (default: --model)")
    p.add_argument("--revision", default=None, help="branch, tag or commit")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("info", parents=[common, output], help="image sizes, crops, token counts, model memory",
                       description="Without loading the model: each image's size, its crop grid and "
                                   "token count at each --num-crops, and the model's parameter count "
                                   "and memory for the chosen dtype.",
                       epilog=EXAMPLES["info"], formatter_class=HelpFormatter)
    p.add_argument("images", nargs="*", metavar="IMAGE", help="file path, - for stdin, or http(s) URL")
    p.add_argument("--json", action="store_true", help="print the facts as one JSON object")
    p.set_defaults(func=cmd_info)

    _register_plugins(sub, common)
    return parser


def _register_plugins(sub, common) -> None:
    for name in PLUGIN_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            # Skip only when the plugin itself (or its package, e.g. phi3v.server) is absent.
            if err.name and (name == err.name or name.startswith(err.name + ".")):
                continue
            _plugin_warning(name, err)
            continue
        except Exception as err:  # a broken plugin must not take the other commands down
            _plugin_warning(name, err)
            continue
        try:
            module.register(sub, common)
        except Exception as err:
            _plugin_warning(name, err)


def _plugin_warning(name: str, err: Exception) -> None:
    from .output import style

    print(f"{style('phi3v: warning:', 'yellow')} the commands of {name} are unavailable: "
          f"{type(err).__name__}: {err}", file=sys.stderr)


def _check_usage(args) -> None:
    """Image-count rules argparse cannot express; violations are usage errors (exit 2)."""
    parser = getattr(args, "parser", None)
    if parser is None:
        return
    if not isinstance(args.images, list):  # nargs="?" gives one string or None
        args.images = [] if args.images is None else [args.images]
    if args.command in ("describe", "ocr", "table") and not args.images and not args.show_prompt:
        parser.error("an IMAGE is required (a path, - for stdin, or a URL)")
    if args.command == "compare" and len(args.images) < 2 and not args.show_prompt:
        parser.error(f"compare needs at least two images, got {len(args.images)}")
    if args.command == "ask" and not args.prompt.strip():
        parser.error("the --prompt is empty")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None) or not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return 2
    _check_usage(args)
    return run_with_errors(args.func, args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
