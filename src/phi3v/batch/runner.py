"""Resumable batch jobs: run one prompt (or a task) over many images, results to JSONL.

    import phi3v
    from phi3v.batch.runner import run_batch

    model = phi3v.load("microsoft/Phi-3-vision-128k-instruct")
    job = run_batch("receipts/", model, task="ocr", out="receipts.jsonl", max_new_tokens=256)
    for result in job:                 # one dict per record, as each finishes
        print(result["id"], result["error"] or result["text"][:60])
    print(job.stats)                   # done / errors / skipped / records per second

Pieces (one job each):
  records.py     input discovery (folder, glob, JSONL) -> Records -> Jobs (final prompts)
  store.py       the output JSONL: crash-safe appends, resume (done ids), a lock
  local_runner.py  jobs -> result dicts on one loaded model (preprocessing threads ahead of it)
  ray_runner.py  the same jobs on a Ray cluster (Ray Data map_batches over model actors)
  runner.py      jobs with an output file (resume, progress, stats) and run_batch
  ../cli/batch.py  `phi3v batch`

A record that fails (bad image, prompt too long, ...) becomes a result with `error` set; the
job goes on.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from .local_runner import RESULT_KEYS, iter_job_results  # noqa: F401  (RESULT_KEYS: re-exported)
from .ray_runner import ray_runner
from .records import Job, Record, discover, resolve_jobs
from .store import ResultStore, done_ids, read_results
from ..errors import Phi3VError
from ..options import GenerationOptions

# ------------------------------------------------------------------------------------------
# Jobs with an output file: resume, progress, stats
# ------------------------------------------------------------------------------------------


@dataclass
class BatchStats:
    total: int = 0  # records in the input
    skipped: int = 0  # already in the output (resume)
    done: int = 0  # finished in this run, errors included
    errors: int = 0  # of `done`, those with an error
    elapsed_s: float = 0.0
    interrupted: bool = False  # stopped by Ctrl-C / SIGTERM / the caller leaving the iteration
    failed: bool = False  # stopped by an error (not a record's: the job's, e.g. Ray missing)
    earlier_errors: int = 0  # of `skipped`, records whose latest result in the output is an error
    retried: bool = False  # the run was asked to retry failed records (retry_errors)

    @property
    def records_per_s(self) -> float:
        return self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def all_succeeded(self) -> bool:
        """Every record of the input has a successful latest result (this run's or an earlier one's)."""
        return not (self.interrupted or self.failed or self.errors or self.earlier_errors)

    def summary(self, out: str | os.PathLike | None = None, *,
                retry_hint: str = "run the job again with retry_errors=True",
                resume_hint: str = "run the job again with the same output to resume") -> str:
        """One line for a person. The hints name how to retry or resume: the Python keywords by
        default; `phi3v batch` passes its flags' wording."""
        head = ("batch stopped by an error" if self.failed else
                "batch interrupted" if self.interrupted else "batch finished")
        text = (f"{head}: {self.done} done, {self.errors} errors, {self.skipped} skipped "
                f"(of {self.total}), {self.records_per_s:.2f} records/s, "
                f"{self.elapsed_s:.1f} s elapsed")
        if out is not None:
            text += f" -> {os.fspath(out)}"
        if self.earlier_errors:
            text += (f"; {self.earlier_errors} skipped record(s) failed in an earlier run and were not "
                     "retried")
        if self.interrupted or self.failed:
            text += f"; {resume_hint}"
        elif self.errors and self.retried:
            text += "; the failed records failed again: see their \"error\" field"
        elif self.errors or self.earlier_errors:
            text += f"; {retry_hint} to retry the failed records"
        return text


Runner = Callable[[list[Job]], Iterator[dict]]


class BatchJob:
    """An iterable batch job: iterating runs it, yielding each result dict as it finishes.

    With `out`, records already in that file are skipped (see batch_store for the rules) and each
    result is appended before it is yielded, so stopping the iteration loses nothing finished.
    `stats` is filled in as the job runs.  A job runs once; iterate it again for nothing.
    """

    def __init__(self, jobs: list[Job], runner: Runner, *, out=None, retry_errors: bool = False,
                 progress: bool = False):
        self.jobs = jobs
        self.out = out
        self.retry_errors = retry_errors
        self.progress = progress
        self.stats = BatchStats(total=len(jobs), retried=retry_errors)
        self._runner = runner
        self._started = False

    def __iter__(self) -> Iterator[dict]:
        if self._started:
            return iter(())
        self._started = True
        return self._run()

    def run(self) -> BatchStats:
        """Run to the end without collecting results (they are in `out`); returns the stats."""
        for _ in self:
            pass
        return self.stats

    def _run(self) -> Iterator[dict]:
        store = ResultStore(self.out) if self.out is not None else None
        if store is not None:
            store.open()  # take the lock before deciding what is done
        bar = None
        start = time.perf_counter()
        try:
            earlier = read_results(self.out) if store else {}
            skip = done_ids(earlier, retry_errors=self.retry_errors) if store else set()
            pending = [j for j in self.jobs if j.id not in skip]
            self.stats.skipped = len(self.jobs) - len(pending)
            self.stats.earlier_errors = sum(1 for j in self.jobs if j.id in skip
                                            and earlier[j.id].get("error") is not None)
            bar = _progress_bar(len(pending), self.progress)
            start = time.perf_counter()
            for result in self._runner(pending):
                if store is not None:
                    store.append(result)
                self.stats.done += 1
                if result.get("error") is not None:
                    self.stats.errors += 1
                    if bar is not None:
                        bar.set_postfix(errors=self.stats.errors, refresh=False)
                self.stats.elapsed_s = time.perf_counter() - start
                if bar is not None:
                    bar.update(1)
                yield result
        except (KeyboardInterrupt, GeneratorExit):  # Ctrl-C, SIGTERM turned into one, generator closed
            self.stats.interrupted = True
            raise
        except BaseException:  # the job itself failed (Ray missing, the output locked, a bug)
            self.stats.failed = True
            raise
        finally:
            self.stats.elapsed_s = time.perf_counter() - start
            if bar is not None:
                bar.close()
            if store is not None:
                store.close()


def _progress_bar(total: int, enabled: bool):
    """tqdm on stderr (records/s, ETA, errors=N), only when asked for and stderr is a terminal."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="rec", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
    bar.set_postfix(errors=0, refresh=False)
    return bar


# ------------------------------------------------------------------------------------------
# The public function
# ------------------------------------------------------------------------------------------


def load_jobs(input, *, task: str | None = None, prompt: str | None = None,
              fmt: str | None = None, schema: dict | None = None, video_selection=None) -> list[Job]:
    """Jobs from an input spec (folder / glob / .jsonl / image path) or an iterable of records.

    Records may be `batch_records.Record`s or dicts shaped like JSONL lines
    (`{"id", "images", "prompt", "task", "schema"}`; image paths relative to the current folder).
    """
    if isinstance(input, (str, os.PathLike)):
        records = discover(input).records
    else:
        records = [_record_from(item, n) for n, item in enumerate(input, start=1)]
        from .records import check_unique_ids

        check_unique_ids(records)
    return resolve_jobs(records, task=task, prompt=prompt, fmt=fmt, schema=schema, video_selection=video_selection)


def _record_from(item, n: int) -> Record:
    if isinstance(item, Record):
        return item
    if isinstance(item, dict):
        from pathlib import Path

        from .records import _jsonl_record

        return _jsonl_record(item, f"record {n}", n, Path.cwd())
    raise Phi3VError(f"batch record {n}: expected a dict or Record, got {type(item).__name__}")


def run_batch(input, model=None, *, task: str | None = None, prompt: str | None = None,
              fmt: str | None = None, schema: dict | None = None, system: str | None = None, out=None,
              retry_errors: bool = False, batch_size: int = 4,
              workers: int = 2, image_policy=None, progress: bool = False, device: str = "auto",
              dtype=None, ray=None, ray_actors: int | None = None,
              ray_cpus_per_actor: float = 1.0, video_selection=None, **options) -> BatchJob:
    """A batch job over `input`; iterate it (or call `.run()`) to run it.

    input:  a folder (recursive: image and video files), a glob, a .jsonl file of records
            `{"id", "images", "video", "prompt", "task"}`, or an iterable of such dicts.
    model:  a loaded `phi3v.Phi3V`, a model id / folder to load (with `device`, `dtype`;
            None = phi3v.DEFAULT_MODEL), or a function returning a loaded model (called once
            the input has been read, so a bad input fails before the weights load).
    task / prompt / fmt: the prompt of records that give none: `prompt` if set, else the preset
            of `task` (phi3v.tasks: describe, ocr, table, compare, ask), `fmt` its output format
            (precedence in batch_records.resolve_jobs).  system: a system message for all.
    schema: a JSON Schema the answers follow (a record's own "schema" wins); results then
            carry "parsed", the answer as data.
    out:    JSONL output file: results appended as they finish, records already there skipped
            (with `retry_errors`, those that failed are run again; the latest line wins).
    batch_size / workers: records per generation call (batched when the engine has
            generate_batch) and preprocessing threads.
    ray / ray_actors / ray_cpus_per_actor: run on a Ray cluster instead (`ray=True` or an
            address such as "127.0.0.1:6379"; see batch_ray); each actor loads its own copy of
            the model (by name: pass the model id / folder rather than a loaded model).
    video_selection: the frames of video records that do not choose their own
            (engine.frame_select.FrameSelection; default: frame_select's default count).
    **options: GenerationOptions fields (max_new_tokens, temperature, seed, num_crops, ...).
    """
    gen_options = GenerationOptions.from_kwargs(**options)
    jobs = load_jobs(input, task=task, prompt=prompt, fmt=fmt, schema=schema, video_selection=video_selection)

    if ray is not None and ray is not False:
        runner = ray_runner(model, address=None if ray is True else ray, device=device,
                            dtype=dtype, options=gen_options, batch_size=batch_size,
                            workers=workers, num_actors=ray_actors, cpus_per_actor=ray_cpus_per_actor,
                            image_policy=image_policy, system=system)
    else:
        loaded = _ensure_model(model, device=device, dtype=dtype, progress=progress)

        def runner(pending: list[Job]) -> Iterator[dict]:
            return iter_job_results(loaded, pending, gen_options, batch_size=batch_size,
                                    workers=workers, image_policy=image_policy, system=system)

    return BatchJob(jobs, runner, out=out, retry_errors=retry_errors, progress=progress)


def _ensure_model(model, *, device, dtype, progress):
    if callable(model) and not hasattr(model, "generate"):
        return model()
    if model is None or isinstance(model, (str, os.PathLike)):
        import phi3v

        name = os.fspath(model) if model is not None else phi3v.DEFAULT_MODEL
        return phi3v.load(name, device=device, dtype=dtype, progress=progress)
    return model
