"""The options commands share, as argparse parent parsers, and the argument types behind them.

    model_parent()       --model --device --dtype --quantize --low-memory --num-crops
    output_parent()      --quiet --verbose
    generation_parent()  --max-tokens --temperature --top-p --top-k --repetition-penalty --seed
                         --stop (all from phi3v.options.OPTIONS) and --system
    answer_parent()      --json --no-stream (the commands that print one answer)

A command passes the ones it needs as `parents=[...]`; options_from_args(args) turns the parsed
generation options back into GenerationOptions. Bad values are usage errors (exit code 2) with
a message naming the option, before anything is loaded.

Light on purpose: argparse and phi3v's small modules only, so `phi3v --help` stays quick.
"""

from __future__ import annotations

import argparse
import os
import re

from .. import DEFAULT_MODEL
from ..options import OPTION_BY_NAME, OPTIONS, Bounds, GenerationOptions, OptionSpec, option_defaults

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
    group.add_argument(spec.flag, type=number(spec.kind, spec.bounds), default=default, metavar=spec.metavar,
                       help=with_default(spec.help, shown))


# ---------------------------------------------------------------------------------------------
# shared option groups


def model_parent() -> argparse.ArgumentParser:
    """--model, --device, --dtype, --quantize, --low-memory, --num-crops: every model command's options."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model")
    g.add_argument("-m", "--model", default=os.environ.get(MODEL_ENV) or DEFAULT_MODEL,
                   help=f"hub id or local folder (default: %(default)s; environment: {MODEL_ENV})")
    g.add_argument("--device", type=device, default="auto", help="auto | cpu | cuda | cuda:N | mps (default: auto)")
    g.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="weights and compute dtype (default: auto = bfloat16, float32 on MPS)")
    g.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="quantize the decoder's linear layers while loading (weight-only; less memory, "
                        "faster decode on CPU; a checkpoint from `phi3v quantize` needs no flag)")
    g.add_argument("--low-memory", action=argparse.BooleanOptionalAction, default=None,
                   help="hand the vision tower's weight pages back to the OS after each image "
                        "(~0.6 GB less resident; default: on with --quantize or a quantized checkpoint)")
    add_option_flag(g, OPTION_BY_NAME["num_crops"])
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


def option_values(args) -> dict:
    """{GenerationOptions field: value} from the parsed generation + model options."""
    values = {spec.name: getattr(args, spec.flag.lstrip("-").replace("-", "_")) for spec in OPTIONS}
    values["stop"] = tuple(values["stop"] or ())
    return values


def options_from_args(args) -> GenerationOptions:
    return GenerationOptions(**option_values(args))
