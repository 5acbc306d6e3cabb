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
  runner.py      the local runner (preprocessing threads ahead of the model) and run_batch
  ray_runner.py  the same jobs on a Ray cluster (Ray Data map_batches over model actors)
  ../cli/batch.py  `phi3v batch`

The local runner keeps the model busy: a small thread pool runs `model.prepare` (image decoding,
HD transform, tokenization) a few records ahead while the calling thread runs generation, one
record at a time or `batch_size` at a time through `model.generate_batch` when the engine has it.
Results come out in input order.  A record that fails (bad image, prompt too long, ...) becomes a
result with `error` set; the job goes on.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from .records import Job, Record, discover, resolve_jobs
from .store import ResultStore, done_ids, read_results
from ..errors import Phi3VError
from ..options import GenerationOptions

RESULT_KEYS = ("id", "images", "task", "prompt", "text", "finish_reason", "usage", "timings", "error")


# ------------------------------------------------------------------------------------------
# Result records
# ------------------------------------------------------------------------------------------


def error_text(exc: BaseException) -> str:
    """How an exception is written in a result's `error` field: 'ImageError: cannot open ...'."""
    return f"{type(exc).__name__}: {exc}"


def make_result(job: Job, *, completion=None, error: str | None = None,
                preprocess_s: float = 0.0) -> dict:
    """The output line of one record; `error` None on success, text/usage/timings None on error."""
    result = {"id": job.id, "images": list(job.images), "task": job.task, "prompt": job.prompt,
              "text": None, "finish_reason": None, "usage": None, "timings": None, "error": error}
    if completion is not None:
        result["text"] = completion.text
        result["finish_reason"] = completion.finish_reason
        result["usage"] = completion.usage.to_dict()
        timings = completion.timings.to_dict()
        if not timings.get("preprocess_s"):
            # An engine that does not carry prepare()'s time into the completion: add ours.
            timings["preprocess_s"] = preprocess_s
        result["timings"] = timings
    return result


# ------------------------------------------------------------------------------------------
# The local runner
# ------------------------------------------------------------------------------------------


@dataclass
class _Prepared:
    job: Job
    prepared: object | None  # api.PreparedPrompt
    error: str | None
    seconds: float


def _prepare(model, job: Job, num_crops: int | None, image_policy, system: str | None) -> _Prepared:
    """Runs in a pool thread: decode images, build input ids.  Never raises."""
    if job.error is not None:
        return _Prepared(job, None, job.error, 0.0)
    start = time.perf_counter()
    kwargs = {"prompt": job.prompt, "images": list(job.sources), "num_crops": num_crops}
    if system is not None:
        kwargs["system"] = system
    if image_policy is not None:
        kwargs["image_policy"] = image_policy
    try:
        prepared = model.prepare(**kwargs)
    except Exception as e:  # a bad record must not stop the job
        return _Prepared(job, None, error_text(e), time.perf_counter() - start)
    return _Prepared(job, prepared, None, time.perf_counter() - start)


def _generate_group(model, group: list[_Prepared], options: GenerationOptions,
                    batched: bool) -> list[dict]:
    """Results of one group, in order; generate_batch when available, else one by one."""
    results: dict[int, dict] = {}
    for i, p in enumerate(group):
        if p.error is not None:
            results[i] = make_result(p.job, error=p.error, preprocess_s=p.seconds)
    ok = [i for i, p in enumerate(group) if p.error is None]
    if batched and len(ok) > 1:
        try:
            completions = model.generate_batch([group[i].prepared for i in ok], options)
            for i, c in zip(ok, completions, strict=True):
                results[i] = make_result(group[i].job, completion=c, preprocess_s=group[i].seconds)
        except Exception:
            pass  # retried one by one below, so one bad record cannot fail its whole batch
    for i in ok:
        if i in results:
            continue
        p = group[i]
        try:
            completion = model.generate(p.prepared, options)
        except Exception as e:
            results[i] = make_result(p.job, error=error_text(e), preprocess_s=p.seconds)
        else:
            results[i] = make_result(p.job, completion=completion, preprocess_s=p.seconds)
    return [results[i] for i in range(len(group))]


def iter_job_results(model, jobs: Iterable[Job], options: GenerationOptions, *,
                     batch_size: int = 1, workers: int = 2, image_policy=None,
                     system: str | None = None) -> Iterator[dict]:
    """Result dicts for `jobs`, in order, preprocessing `workers` threads ahead of generation.

    At most max(2*workers, 2*batch_size) records are prepared but not yet generated, which bounds
    memory (a 16-crop image's pixel_values are ~23 MB in float32).
    """
    if batch_size < 1:
        raise Phi3VError(f"batch_size must be >= 1, got {batch_size}")
    workers = max(1, workers)
    batched = batch_size > 1 and hasattr(model, "generate_batch")
    lookahead = max(2 * workers, 2 * batch_size)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="phi3v-prepare")
    queue: deque = deque()
    source = iter(jobs)

    def top_up() -> None:
        while len(queue) < lookahead:
            job = next(source, None)
            if job is None:
                return
            queue.append(pool.submit(_prepare, model, job, options.num_crops, image_policy,
                                     system))

    try:
        top_up()
        while queue:
            futures = [queue.popleft() for _ in range(min(batch_size, len(queue)))]
            top_up()  # the pool works on the next records while this group generates
            group = [f.result() for f in futures]
            yield from _generate_group(model, group, options, batched)
    finally:
        # Interrupted (Ctrl-C, generator closed): drop queued work, don't wait for it.
        pool.shutdown(wait=False, cancel_futures=True)


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
    interrupted: bool = False

    @property
    def records_per_s(self) -> float:
        return self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self, out: str | os.PathLike | None = None) -> str:
        head = "batch interrupted" if self.interrupted else "batch finished"
        text = (f"{head}: {self.done} done, {self.errors} errors, {self.skipped} skipped "
                f"(of {self.total}), {self.records_per_s:.2f} records/s, "
                f"{self.elapsed_s:.1f} s elapsed")
        if out is not None:
            text += f" -> {os.fspath(out)}"
        if self.interrupted:
            text += "; run the same command again to resume"
        elif self.errors:
            text += "; rerun with --retry-errors to retry the failed records"
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
        self.stats = BatchStats(total=len(jobs))
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
            skip = done_ids(read_results(self.out), retry_errors=self.retry_errors) if store else set()
            pending = [j for j in self.jobs if j.id not in skip]
            self.stats.skipped = len(self.jobs) - len(pending)
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
        except BaseException:  # KeyboardInterrupt, SIGTERM turned into one, generator closed
            self.stats.interrupted = True
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
              fmt: str | None = None) -> list[Job]:
    """Jobs from an input spec (folder / glob / .jsonl / image path) or an iterable of records.

    Records may be `batch_records.Record`s or dicts shaped like JSONL lines
    (`{"id", "images", "prompt", "task"}`; image paths relative to the current folder).
    """
    if isinstance(input, (str, os.PathLike)):
        records = discover(input).records
    else:
        records = [_record_from(item, n) for n, item in enumerate(input, start=1)]
        from .records import check_unique_ids

        check_unique_ids(records)
    return resolve_jobs(records, task=task, prompt=prompt, fmt=fmt)


def _record_from(item, n: int) -> Record:
    if isinstance(item, Record):
        return item
    if isinstance(item, dict):
        from pathlib import Path

        from .records import _jsonl_record

        return _jsonl_record(item, f"record {n}", n, Path.cwd())
    raise Phi3VError(f"batch record {n}: expected a dict or Record, got {type(item).__name__}")


def run_batch(input, model=None, *, task: str | None = None, prompt: str | None = None,
              fmt: str | None = None, system: str | None = None, out=None,
              retry_errors: bool = False, batch_size: int = 4,
              workers: int = 2, image_policy=None, progress: bool = False, device: str = "auto",
              dtype=None, ray=None, ray_actors: int | None = None,
              ray_cpus_per_actor: float = 1.0, **options) -> BatchJob:
    """A batch job over `input`; iterate it (or call `.run()`) to run it.

    input:  a folder (recursive, image files only), a glob, a .jsonl file of records
            `{"id", "images", "prompt", "task"}`, or an iterable of such dicts.
    model:  a loaded `phi3v.Phi3V`, a model id / folder to load (with `device`, `dtype`;
            None = phi3v.DEFAULT_MODEL), or a function returning a loaded model (called once
            the input has been read, so a bad input fails before the weights load).
    task / prompt / fmt: the prompt of records that give none: `prompt` if set, else the preset
            of `task` (phi3v.tasks: describe, ocr, table, compare, ask), `fmt` its output format
            (precedence in batch_records.resolve_jobs).  system: a system message for all.
    out:    JSONL output file: results appended as they finish, records already there skipped
            (with `retry_errors`, those that failed are run again; the latest line wins).
    batch_size / workers: records per generation call (batched when the engine has
            generate_batch) and preprocessing threads.
    ray / ray_actors / ray_cpus_per_actor: run on a Ray cluster instead (`ray=True` or an
            address such as "127.0.0.1:6379"; see batch_ray); each actor loads its own copy of
            the model (by name: pass the model id / folder rather than a loaded model).
    **options: GenerationOptions fields (max_new_tokens, temperature, seed, num_crops, ...).
    """
    gen_options = GenerationOptions.from_kwargs(**options)
    jobs = load_jobs(input, task=task, prompt=prompt, fmt=fmt)

    if ray is not None and ray is not False:
        from .ray_runner import ray_runner

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
