"""The options commands share, as argparse parent parsers, and the argument types behind them.

    model_parent()       --model --device --dtype --quantize --low-memory --num-crops
    output_parent()      --quiet --verbose
    generation_parent()  --max-tokens --temperature --top-p --top-k --repetition-penalty --seed
                         --stop (all from phi3v.options.OPTIONS) and --system
    answer_parent()      --json --no-stream (the commands that print one answer)
    structured_parent()  --schema FILE.json | --regex RE | --choices a,b,c (structured output)
    video_parent()       --frames N | --fps F, --start, --end, --time-labels (which frames of a video)

A command passes the ones it needs as `parents=[...]`; options_from_args(args) turns the parsed
generation options back into GenerationOptions. Bad values are usage errors (exit code 2) with
a message naming the option, before anything is loaded.

Light on purpose: argparse and phi3v's small modules only, so `phi3v --help` stays quick.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from .. import DEFAULT_MODEL
from ..options import OPTION_BY_NAME, OPTIONS, Bounds, GenerationOptions, OptionSpec, option_defaults
from .configuration import configurable

MODEL_ENV = "PHI3V_MODEL"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks; defaults are written in the help strings."""


# ---------------------------------------------------------------------------------------------
# argument types


def number(kind: type, bounds: Bounds):
    """An argparse type: text -> int or float, checked against `bounds`."""
    whole = kind is int

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'a whole number' if whole else 'a number'}, got {text!r}") from None
        if not bounds.contains(value):
            raise argparse.ArgumentTypeError(f"must be {bounds.describe(whole)}, got {value}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


def device(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or mps, got {text!r}")
    return text


def with_default(help: str, default_text: str) -> str:
    """`help` + " (default: ...)"; a literal % is escaped for argparse."""
    return f"{help} (default: {default_text})".replace("%", "%%")


def add_option_flag(group, spec: OptionSpec) -> None:
    """The CLI flag of one generation option: its type, range, default and help from phi3v.options."""
    if spec.repeatable:  # given once per value; none by default
        group.add_argument(spec.flag, action="append", default=[], metavar=spec.metavar,
                           help=f"{spec.help} (repeatable)".replace("%", "%%"))
        return
    default = option_defaults()[spec.name]
    shown = spec.default_text or str(default)
    configurable(group.add_argument(spec.flag, type=number(spec.kind, spec.bounds), default=default,
                                    metavar=spec.metavar, help=with_default(spec.help, shown)))


# ---------------------------------------------------------------------------------------------
# shared option groups


def model_parent() -> argparse.ArgumentParser:
    """--model, --device, --dtype, --quantize, --low-memory, --num-crops, --ctx, --image-cache-mb:
    every model command's options; each also settable as PHI3V_<NAME> or in the config file
    (configuration.py)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model")
    configurable(g.add_argument("-m", "--model", default=os.environ.get(MODEL_ENV) or DEFAULT_MODEL,
                                help=f"hub id or local folder (default: %(default)s; environment: {MODEL_ENV})"))
    configurable(g.add_argument("--device", type=device, default="auto",
                                help="auto | cpu | cuda | cuda:N | mps (default: auto)"))
    configurable(g.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                                help="weights and compute dtype (default: auto = bfloat16, float32 on MPS)"))
    configurable(g.add_argument(
        "--quantize", choices=("int8", "int4", "w8a8"), default=None,
        help="quantize the decoder's linear layers while loading (int8/int4 weight-only; less memory, "
             "faster decode on CPU; w8a8: int8 weights and int8 activations for prefill and the vision "
             "tower, faster first token; a checkpoint from `phi3v quantize` needs no flag)"))
    configurable(g.add_argument(
        "--low-memory", action=argparse.BooleanOptionalAction, default=None,
        help="hand the vision tower's weight pages back to the OS after each image "
             "(~0.6 GB less resident; default: on with --quantize or a quantized checkpoint)"))
    add_option_flag(g, OPTION_BY_NAME["num_crops"])
    configurable(g.add_argument("--ctx", type=number(int, Bounds(1)), default=None, metavar="N",
                                help="context limit in tokens: prompt + answer (default: the model's, 131072)"))
    configurable(g.add_argument("--image-cache-mb", type=number(float, Bounds(0)), default=512, metavar="N",
                                help="byte budget of the image caches (preprocessed pixels and features) in "
                                     "MiB; 0 = off (default: 512)"))
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
    """The sampling options (every OptionSpec but --num-crops, which is a model option) and --system."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("generation")
    for spec in OPTIONS:
        if spec.name != "num_crops":
            add_option_flag(g, spec)
    g.add_argument("--system", default=None, metavar="TEXT", help="a system message")
    return p


def answer_parent() -> argparse.ArgumentParser:
    """How the one answer of describe/ocr/table/compare/ask is printed."""
    p = argparse.ArgumentParser(add_help=False)
    o = p.add_argument_group("answer")
    o.add_argument("--json", action="store_true",
                   help="print one JSON object: text, finish_reason, usage, timings, model")
    o.add_argument("--no-stream", action="store_true", help="print the answer once it is complete")
    return p


def schema_file(text: str) -> dict:
    """An argparse type: a JSON Schema file (or - for stdin) -> the schema as a dict. A missing
    file or one that is not a JSON object is a usage error; what the grammar engine refuses in a
    valid object is found when the command runs (before generation, exit 1)."""
    try:
        if text == "-":
            data = sys.stdin.read()
        else:
            with open(os.path.expanduser(text), encoding="utf-8") as f:
                data = f.read()
    except OSError as err:
        raise argparse.ArgumentTypeError(f"cannot read {text}: {err.strerror or err}") from None
    try:
        schema = json.loads(data)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text} is not valid JSON: {err}") from None
    if not isinstance(schema, dict):
        raise argparse.ArgumentTypeError(f"{text} must hold a JSON Schema object, got {type(schema).__name__}")
    return schema


def choice_list(text: str) -> list[str]:
    """An argparse type: "yes,no,maybe" -> ["yes", "no", "maybe"] (blanks around commas dropped)."""
    choices = [c.strip() for c in text.split(",")]
    if not all(choices) or len(choices) < 2:
        raise argparse.ArgumentTypeError(f"expected two or more comma-separated choices, got {text!r}")
    return choices


def add_schema_argument(group, required: bool = False) -> None:
    """--schema FILE.json: the one declaration (structured_parent and `phi3v extract` use it)."""
    group.add_argument("--schema", type=schema_file, default=None, metavar="FILE.json", required=required,
                       help="the answer is JSON that follows this JSON Schema (- reads it from stdin)")


def structured_parent() -> argparse.ArgumentParser:
    """--schema, --regex, --choices: at most one; the answer follows it token by token."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("structured output (one of)").add_mutually_exclusive_group()
    add_schema_argument(g)
    g.add_argument("--regex", default=None, metavar="RE", help="the answer matches this regular expression")
    g.add_argument("--choices", type=choice_list, default=None, metavar="A,B,...",
                   help="the answer is exactly one of these comma-separated strings")
    return p


def video_parent() -> argparse.ArgumentParser:
    """Which frames of a video the model sees (the rules: phi3v.engine.frame_select, docs/video.md)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("video frames (docs/video.md)")
    count = g.add_mutually_exclusive_group()
    count.add_argument("--frames", type=number(int, Bounds(1)), default=None, metavar="N",
                       help="N frames spread evenly over the clip (default: up to 16, no more than fill half "
                            "the context)")
    count.add_argument("--fps", type=number(float, Bounds(0, lo_open=True)), default=None, metavar="F",
                       help="F frames per second of video instead")
    g.add_argument("--start", type=number(float, Bounds(0)), default=None, metavar="SECONDS",
                   help="only from this time on (default: the start)")
    g.add_argument("--end", type=number(float, Bounds(0, lo_open=True)), default=None, metavar="SECONDS",
                   help="only before this time (default: the end)")
    g.add_argument("--time-labels", action="store_true",
                   help='a line "frame k at MM:SS" per frame before the question (off: the model\'s '
                        "training format)")
    return p


def video_kwargs(args) -> dict:
    """The frame selection of the parsed args as model.ask/stream keywords."""
    return {"frames": args.frames, "fps": args.fps, "start": args.start, "end": args.end,
            "time_labels": args.time_labels}


def constraint_kwargs(args) -> dict:
    """The output constraint of the parsed args as model.ask/stream keywords ({} for none)."""
    given = {"json_schema": getattr(args, "schema", None), "regex": getattr(args, "regex", None),
             "choices": getattr(args, "choices", None)}
    return {k: v for k, v in given.items() if v is not None}


def option_values(args) -> dict:
    """{GenerationOptions field: value} from the parsed generation + model options."""
    values = {spec.name: getattr(args, spec.flag.lstrip("-").replace("-", "_")) for spec in OPTIONS}
    values["stop"] = tuple(values["stop"] or ())
    return values


def options_from_args(args) -> GenerationOptions:
    return GenerationOptions(**option_values(args))
