"""The local runner: jobs -> result dicts on one loaded model, preprocessing ahead of generation.

    for result in iter_job_results(model, jobs, GenerationOptions(max_new_tokens=64), batch_size=4):
        print(result["id"], result["error"] or result["text"])

A small thread pool runs `model.prepare` (image decoding, HD transform, tokenization) a few
records ahead while the calling thread generates, one record at a time or `batch_size` at a time
through `model.generate_batch` when the engine has it.  A job with a `schema` is constrained to it
(rows with different schemas, or none, share a batch) and its result carries `parsed`, the
answer as data (None when the answer ended before its structure did).  Results come out in input order; a record
that fails becomes a result with `error` set.  runner.py (jobs with an output file) and
ray_runner.py (the same jobs on Ray actors) both run their records through here.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator

from .records import Job
from .video_records import result_fields
from ..errors import Phi3VError
from ..options import GenerationOptions

RESULT_KEYS = ("id", "images", "task", "prompt", "text", "parsed", "finish_reason", "usage", "timings", "error")


# ------------------------------------------------------------------------------------------
# Result records
# ------------------------------------------------------------------------------------------


def error_text(exc: BaseException) -> str:
    """How an exception is written in a result's `error` field: 'ImageError: cannot open ...'."""
    return f"{type(exc).__name__}: {exc}"


def make_result(job: Job, *, completion=None, error: str | None = None,
                preprocess_s: float = 0.0, prepared=None) -> dict:
    """The output line of one record; `error` None on success, text/usage/timings None on error.
    A video record's also has "video" and "frames", the frames used (video_records.result_fields)."""
    result = {"id": job.id, "images": list(job.images), "task": job.task, "prompt": job.prompt,
              "text": None, "parsed": None, "finish_reason": None, "usage": None, "timings": None,
              "error": error, **result_fields(job, prepared)}
    if completion is not None:
        result["text"] = completion.text
        result["parsed"] = getattr(completion, "parsed", None)
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
    if job.video_source is not None:  # its frames after the images (engine/video_input.py)
        kwargs.update(video=job.video_source, video_selection=job.video_selection)
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
    formats = {i: _output_format(group[i].job) for i in ok}
    constrained = any(f is not None for f in formats.values())
    if batched and len(ok) > 1:
        try:
            prepared = [group[i].prepared for i in ok]
            if constrained:  # one bad schema fails the call: then each record runs alone below
                completions = model.generate_batch(prepared, options, output_formats=[formats[i] for i in ok])
            else:
                completions = model.generate_batch(prepared, options)
            for i, c in zip(ok, completions, strict=True):
                results[i] = make_result(group[i].job, completion=c, preprocess_s=group[i].seconds,
                                         prepared=group[i].prepared)
        except Exception:
            pass  # retried one by one below, so one bad record cannot fail its whole batch
    for i in ok:
        if i in results:
            continue
        p = group[i]
        try:
            if formats[i] is not None:
                completion = model.generate(p.prepared, options, output_format=formats[i])
            else:
                completion = model.generate(p.prepared, options)
        except Exception as e:
            results[i] = make_result(p.job, error=error_text(e), preprocess_s=p.seconds, prepared=p.prepared)
        else:
            results[i] = make_result(p.job, completion=completion, preprocess_s=p.seconds, prepared=p.prepared)
    return [results[i] for i in range(len(group))]


def _output_format(job: Job):
    """The job's schema as an engine OutputFormat (None without one). Not raising: a schema the
    engine refuses fails that record when it runs."""
    if job.schema is None:
        return None
    from ..engine.constraints import OutputFormat

    return OutputFormat.json_schema(job.schema)


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
