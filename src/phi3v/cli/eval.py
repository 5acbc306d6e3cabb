"""`phi3v eval DATA --out report.json`: how accurate is this setup on labelled images, per variant.

    phi3v eval --make-sample sample/                       # a labelled smoke set, drawn by phi3v
    phi3v eval sample/records.jsonl --out report.json --variants bf16,int8,int4
    phi3v eval ChartQA/test/test_human.json --out chartqa.json --num-crops 4,16 --limit 200
    phi3v eval docvqa/val_v1.0.json --out docvqa.json --ray 10.0.0.5:6379

Writes report.json (the numbers and every answer), report.html (self-contained page) and keeps the
answers in report.results.jsonl (the resumable store: the same command again only asks what is
missing). Prints the table. Exit status: 0 done (records that failed are in the report), 1 the eval
could not run, 130 interrupted (the report then covers what was answered). The pieces live in
phi3v.eval; docs/eval.md has the formats and the metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
from pathlib import Path

from .. import DEFAULT_MODEL
from .arguments import MODEL_ENV, HelpFormatter, device, generation_parent, option_values, output_parent
from .output import is_tty, note, print_error
from .running import run_alone

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130
DEFAULT_MAX_TOKENS = 128  # short answers; transcriptions of a receipt fit

DESCRIPTION = """Evaluate the model on labelled images under one or more settings (weights, num_crops,
prompt) and compare them: accuracy per metric, agreement with the first variant, tokens, time to
first token, tokens/s, and the records where the variants answer differently."""

EPILOG = """data (DATA; --format picks the reader when auto detection cannot):
  FILE.jsonl | FOLDER  native records, one per line: {"id", "images" | "video", "question",
                       "answers": [...], "metric", "choices"} (paths relative to the file)
  ChartQA test_*.json, DocVQA / InfographicVQA val json, TextVQA json, ScienceQA problems.json,
  MMBench .tsv, an AI2D folder (questions/ + images/): the published layouts (docs/eval.md)

metrics: relaxed (ChartQA, 5%), anls (DocVQA, 0.5), vqa (10 human answers), choice (option letter),
  cer / wer (transcription), exact

examples:
  phi3v eval --make-sample sample/ --seed 1
  phi3v eval sample/records.jsonl --out report.json --variants bf16,int8,int4
  phi3v eval charts.jsonl --out crops.json --num-crops 4,16 --max-tokens 32
  phi3v eval data.jsonl --out prompts.json --prompt "{question} Reply in one word." \\
      --prompt "{question}\\nAnswer the question using a single word or phrase."
"""


def register(sub, name: str) -> None:
    p = sub.add_parser(name, parents=[output_parent(), generation_parent()],
                       help="accuracy on labelled images; bf16 / int8 / int4, num_crops, prompts compared",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run_command, check=check_usage, parser=p, max_tokens=DEFAULT_MAX_TOKENS)
    for action in p._actions:  # the shared flag's help states the answer commands' default
        if action.dest == "max_tokens" and action.help:
            action.help = re.sub(r"\(default: [^)]*\)", f"(default: {DEFAULT_MAX_TOKENS} for eval)", action.help)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", nargs="?", help="a .jsonl of records, a folder of them, or a published data file")
    p.add_argument("--out", "-o", metavar="REPORT.json", help="the JSON report (also REPORT.html)")
    p.add_argument("--html", metavar="FILE", help="the HTML report (default: --out with .html)")
    p.add_argument("--results", metavar="FILE.jsonl",
                   help="the answers store, resumed on a rerun (default: --out with .results.jsonl)")
    p.add_argument("--format", dest="fmt", default="auto",
                   choices=("auto", "native", "chartqa", "docvqa", "textvqa", "scienceqa", "mmbench", "ai2d"),
                   help="the data's layout (default: auto)")
    p.add_argument("--metric", choices=("relaxed", "anls", "vqa", "choice", "cer", "wer", "exact"),
                   help="score every record with this metric (default: the record's own, else the format's)")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N records")
    m = p.add_argument_group("model and variants")
    m.add_argument("-m", "--model", default=os.environ.get(MODEL_ENV) or DEFAULT_MODEL,
                   help=f"hub id or local folder (default: %(default)s; environment: {MODEL_ENV})")
    m.add_argument("--device", type=device, default="auto", help="auto | cpu | cuda | cuda:N | mps (default: auto)")
    m.add_argument("--variants", metavar="W,W", default="bf16",
                   help="weights to compare: bf16, int8, int4, fp32, fp16; the first is the reference (default: bf16)")
    m.add_argument("--num-crops", metavar="N,N", help="num_crops values to compare, e.g. 4,16 (default: the model's)")
    m.add_argument("--prompt", action="append", metavar="TEMPLATE",
                   help="a prompt template with {question} (and {options}); repeat to compare prompts "
                   "(default: the metric's short-answer prompt)")
    m.add_argument("--image-cache-mb", type=float, default=2048, metavar="MB",
                   help="image pixel + feature cache the variants share (default: 2048)")
    r = p.add_argument_group("running")
    r.add_argument("--batch-size", type=int, default=1, metavar="N",
                   help="records per generation call (default 1: clean per-record timings)")
    r.add_argument("--workers", type=int, default=2, metavar="N", help="preprocessing threads (default 2)")
    r.add_argument("--retry-errors", action="store_true", help="also ask again what failed before")
    r.add_argument("--ray", nargs="?", const=True, default=None, metavar="ADDRESS",
                   help="answer on a Ray cluster (as phi3v batch --ray)")
    r.add_argument("--ray-actors", type=int, metavar="N", help="model actors per variant")
    r.add_argument("--ray-cpus-per-actor", type=float, default=1.0, metavar="N", help="CPUs per actor (default 1)")
    s = p.add_argument_group("sample set")
    s.add_argument("--make-sample", metavar="DIR",
                   help="write a labelled smoke set (charts, receipts, forms, shapes) to DIR and exit; "
                   "--seed S picks it (default 0)")


def check_usage(args) -> None:
    parser = args.parser
    if args.make_sample:
        if args.data is not None:
            parser.error("--make-sample writes a data set: give no DATA with it")
        return
    if args.data is None or not args.out:
        parser.error("give DATA and --out REPORT.json (or --make-sample DIR)")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    if args.batch_size < 1 or args.workers < 1:
        parser.error("--batch-size and --workers must be >= 1")


class _Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so the eval stops like on Ctrl-C."""


def _raise_terminated(signum, frame):
    raise _Terminated()


def make_sample_command(args) -> int:
    try:
        from ..eval.sample import make_sample
    except ModuleNotFoundError as err:
        from .running import missing_extra

        raise missing_extra(err, "eval --make-sample", "eval") from None
    seed = 0 if args.seed is None else args.seed
    path = make_sample(args.make_sample, seed=seed)
    count = sum(1 for line in open(path, encoding="utf-8") if line.strip())
    print(f"wrote {count} records to {path} (seed {seed})")
    print(f"next: phi3v eval {path} --out report.json --variants bf16,int8,int4")
    return EXIT_OK


def run_command(args) -> int:
    if args.make_sample:
        return make_sample_command(args)
    from ..errors import Phi3VError
    from ..eval.readers import read_data
    from ..eval.runner import EvalRun, default_results_path
    from ..eval.variants import parse_variants
    from .images import cli_policy

    out = Path(args.out)
    results = args.results or default_results_path(out)
    html_path = args.html or str(out.with_suffix(".html"))
    if Path(args.data).resolve() in {Path(p).resolve() for p in (out, results, html_path)}:
        raise Phi3VError("--out, --results and --html must not be the data file")
    records = read_data(args.data, args.fmt, args.metric)
    if args.limit is not None:
        records = records[: args.limit]
    variants = parse_variants(args.variants, args.num_crops, args.prompt)
    show = not args.quiet and is_tty(sys.stderr)
    options = option_values(args)
    options.pop("num_crops", None)  # per variant
    model_name, folder = args.model, args.model
    if args.ray is None:
        from ..engine.hub import resolve_model_dir

        folder = str(resolve_model_dir(args.model, progress=show))

    def load(variant):
        import phi3v

        if not args.quiet:
            note(f"loading {variant.name} ({variant.dtype}{', ' + variant.quantize if variant.quantize else ''})")
        return phi3v.load(folder, device=args.device, dtype=variant.dtype, quantize=variant.quantize,
                          progress=False, image_cache_mb=args.image_cache_mb)

    run = EvalRun(records, variants, model=folder, results=results, load=load, device=args.device,
                  system=args.system, batch_size=args.batch_size, workers=args.workers, image_policy=cli_policy(),
                  image_cache_mb=args.image_cache_mb, retry_errors=args.retry_errors, progress=show, ray=args.ray,
                  ray_actors=args.ray_actors, ray_cpus_per_actor=args.ray_cpus_per_actor, **options)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        run.run()
    except KeyboardInterrupt:
        pass  # what was answered is in the store; the report below covers it
    finally:
        signal.signal(signal.SIGTERM, previous)
    write_reports(run, records, variants, args, model_name, out, html_path)
    print(run.stats.summary(results), file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED if run.stats.interrupted else EXIT_OK


def write_reports(run, records, variants, args, model_name, out: Path, html_path: str) -> None:
    from ..eval.report_html import render_html
    from ..eval.report_text import render_table
    from ..eval.summary import summarise

    report = summarise(records, variants, run.answers(), data=str(args.data), model=model_name,
                       options={k: v for k, v in option_values(args).items() if k != "num_crops"})
    report["results"] = os.fspath(run.results_path)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    Path(html_path).write_text(render_html(report), encoding="utf-8")
    print(render_table(report))
    if not args.quiet:
        note(f"report: {out}  page: {html_path}")


def main(argv=None) -> int:
    """`python -m phi3v.cli.eval ARGS` = `phi3v eval ARGS`."""
    return run_alone(register, "eval", argv)


if __name__ == "__main__":
    sys.exit(main())
