"""`phi3v batch INPUT --out results.jsonl`: one command for a folder, a glob or a JSONL of records.

    phi3v batch receipts/ --task ocr --out receipts.jsonl
    phi3v batch 'charts/**/*.png' --task table --format csv --out charts.jsonl --batch-size 8
    phi3v batch requests.jsonl --out answers.jsonl --retry-errors
    phi3v batch photos/ --task describe --out captions.jsonl --ray 10.0.0.5:6379

Rerunning the same command resumes (records already in --out are skipped).  SIGTERM and Ctrl-C
stop the job cleanly: finished records are all in --out, the summary says how far it got.
Exit status: 0 all records succeeded, 1 some records failed (in this run, or in an earlier one
whose failures this run skipped: see --retry-errors), or the job could not start, 130 interrupted.
A job that cannot start (Ray missing, --out locked by another job) prints its error alone.  The generation flags are those of the answer commands (phi3v.options, with
their ranges); `python -m phi3v.cli.batch ARGS` is `phi3v batch ARGS`.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from ..batch.runner import run_batch
from .arguments import (HelpFormatter, add_schema_argument, generation_parent, model_parent, option_values,
                        output_parent, video_kwargs, video_parent)
from .images import cli_policy  # files and http(s) URLs, like the other commands
from .loading import load_model_from_args
from .output import print_error
from .running import run_alone

EXIT_OK, EXIT_ERRORS, EXIT_INTERRUPTED = 0, 1, 130

DESCRIPTION = """Run a task or a prompt over many images; results go to a JSONL file, one line
per record (id, images, task, prompt, text, parsed, finish_reason, usage, timings, error), appended as
each record finishes.  Running the same command again skips the records already in --out."""

EPILOG = """input:
  FOLDER          every image and video file below it (recursively); id = path relative to FOLDER
  'GLOB'          image and video files matching the pattern (quote it; ** recurses); id = the path
  FILE.jsonl      one record per line: {"id": ..., "images": [...], "prompt": ..., "task": ...,
                  "schema": {JSON Schema}} (all optional but images; a record's prompt/task/schema
                  override the options;
                  relative image paths are relative to the JSONL file); a video record:
                  {"video": "clip.mp4", "frames": 8} (also fps, start, end, time_labels: they
                  override the --frames/--fps/... flags; docs/batch.md)

examples:
  phi3v batch receipts/ --task ocr --out receipts.jsonl
  phi3v batch 'charts/*.png' --task table --format csv --out charts.jsonl
  phi3v batch photos/ --prompt "Is there a dog? Answer yes or no." --out dogs.jsonl
  phi3v batch receipts/ --prompt "Read the receipt." --schema receipt.schema.json --out r.jsonl
  phi3v batch photos/ --task describe --out captions.jsonl --ray          # Ray cluster

--max-tokens, --seed and the other generation options apply to each record alone: with a
seed, a record's result does not depend on the order or the batch it ran in.
"""


def register(sub, name: str) -> None:
    """`phi3v batch`: the model, output (--quiet: no progress bar) and generation options + its own."""
    p = sub.add_parser(name, parents=[model_parent(), output_parent(), generation_parent(), video_parent()],
                       help="run a task or prompt over many images, results to JSONL",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run_command)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="a folder, a quoted glob, or a .jsonl file of records")
    p.add_argument("--out", "-o", required=True, metavar="FILE.jsonl",
                   help="results file (appended; existing records are skipped = resume)")
    p.add_argument("--task", choices=("describe", "ocr", "table", "compare", "ask"),
                   help="preset prompt (phi3v.tasks); with --prompt and no --task: ask")
    p.add_argument("--prompt", help="the prompt for every record (a record's own prompt wins); "
                   "for --task ask the question, for other tasks it replaces the preset")
    p.add_argument("--format", dest="fmt", metavar="FMT",
                   help="output format of the task preset (ocr: text|markdown, table: markdown|csv|json)")
    add_schema_argument(p)
    p.add_argument("--retry-errors", action="store_true",
                   help="also rerun records whose latest result in --out is an error")
    p.add_argument("--batch-size", type=int, default=4, metavar="N",
                   help="records per generation call (batched generation when the engine "
                   "supports it; with --ray also the records per actor call) (default 4)")
    p.add_argument("--workers", type=int, default=2, metavar="N",
                   help="preprocessing threads working ahead of the model (default 2)")
    ray = p.add_argument_group("scale-out (Ray)")
    ray.add_argument("--ray", nargs="?", const=True, default=None, metavar="ADDRESS",
                     help="run on a Ray cluster with Ray Data: ADDRESS like 10.0.0.5:6379 or "
                     "ray://host:10001; without one, the cluster Ray finds (RAY_ADDRESS, or a "
                     "`ray start` on this machine) or a new local one")
    ray.add_argument("--ray-actors", type=int, metavar="N",
                     help="model actors (default: one per GPU, or per --ray-cpus-per-actor CPUs)")
    ray.add_argument("--ray-cpus-per-actor", type=float, default=1.0, metavar="N",
                     help="CPUs reserved by each CPU actor, also its torch threads (default 1)")


def _video_selection(args):
    """The video records' frames from --frames/--fps/--start/--end/--time-labels (None: the default)."""
    given = {k: v for k, v in video_kwargs(args).items() if v not in (None, False)}
    if not given:
        return None
    from ..engine.frame_select import FrameSelection

    return FrameSelection(**given)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so the job stops like on Ctrl-C."""


def _raise_terminated(signum, frame):
    raise _Terminated()


def run_command(args) -> int:
    if args.task is None and args.prompt is None and not str(args.input).lower().endswith(".jsonl"):
        print_error("give --task or --prompt (or a JSONL input whose records carry prompts)")
        return EXIT_ERRORS
    if args.batch_size < 1 or args.workers < 1:
        print_error("--batch-size and --workers must be >= 1")
        return EXIT_ERRORS
    if Path(args.input).resolve() == Path(args.out).resolve():
        print_error("--out must not be the input file")
        return EXIT_ERRORS
    task = args.task or ("ask" if args.prompt is not None else None)
    use_ray = args.ray is not None
    # Ray actors load their own copies; the driver needs none.  Locally the model is loaded
    # after the input has been read, so a wrong INPUT fails at once.
    model = args.model if use_ray else (lambda: load_model_from_args(args))
    dtype = None if args.dtype in (None, "auto") else args.dtype
    job = run_batch(args.input, model, task=task, prompt=args.prompt, fmt=args.fmt, schema=args.schema,
                    out=args.out, retry_errors=args.retry_errors, batch_size=args.batch_size,
                    workers=args.workers, image_policy=cli_policy(), progress=not args.quiet,
                    system=args.system, device=args.device, dtype=dtype, ray=args.ray,
                    ray_actors=args.ray_actors, ray_cpus_per_actor=args.ray_cpus_per_actor,
                    video_selection=_video_selection(args), **option_values(args))
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        job.run()
    except KeyboardInterrupt:
        pass  # stats.interrupted is set; everything finished is already in --out
    finally:
        signal.signal(signal.SIGTERM, previous)
        if not (job.stats.failed and job.stats.done == 0):  # else the error line says it all
            print(job.stats.summary(args.out, retry_hint="rerun with --retry-errors",
                                    resume_hint="run the same command again to resume"),
                  file=sys.stderr, flush=True)
    if job.stats.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if job.stats.all_succeeded else EXIT_ERRORS


def main(argv=None) -> int:
    """`python -m phi3v.cli.batch ARGS` = `phi3v batch ARGS`."""
    return run_alone(register, "batch", argv)


if __name__ == "__main__":
    sys.exit(main())
