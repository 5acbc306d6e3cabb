"""Run an eval: every record under every variant, answers appended to a resumable JSONL store.

    from phi3v.eval.runner import EvalRun
    run = EvalRun(records, variants, model="microsoft/Phi-3-vision-128k-instruct",
                  results="report.results.jsonl", max_new_tokens=64)
    run.run()                      # loads each variant in turn, skips what the store already has
    answers = run.answers()        # {(variant name, record id): result line}

The store is phi3v batch's (batch/store.py: crash-safe appends, a lock, latest line wins). A line is
batch's result (batch/local_runner.make_result) plus "variant", "record" and "image_features"
("reused" when every image's features came from an earlier variant's cache), keyed by
`VARIANT|RECORD|DIGEST`: the digest covers the model, the variant's settings, the generation
options, the prompt and the images, so a changed setting or record is asked again and a rerun of the
same command only asks what is missing (with retry_errors, also what failed).

Variants run one after another with one model in memory. Each takes over the pixel cache of the
ones before it (always valid) and the feature cache of those with its compute dtype (variants.py
says why); image_cache_mb sizes them (default 2 GiB; a 16-crop image is ~23 MB of
pixels and ~15 MB of features).  With `ray`, each variant's records go to Ray actors
(ray_scale.py) and nothing is shared.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

from ..batch.local_runner import iter_job_results
from ..batch.records import Job
from ..batch.store import ResultStore, done_ids, read_results
from ..options import GenerationOptions
from .prompts import build_prompt
from .records import EvalRecord
from .variants import Variant
from .video_input import VideoPrompts

DEFAULT_IMAGE_CACHE_MB = 2048


@dataclass
class EvalStats:
    total: int = 0  # record x variant pairs
    skipped: int = 0  # already in the store
    done: int = 0  # answered in this run, errors included
    errors: int = 0
    elapsed_s: float = 0.0
    interrupted: bool = False

    def summary(self, results_path) -> str:
        head = "eval interrupted" if self.interrupted else "eval finished"
        text = (f"{head}: {self.done} answers, {self.errors} errors, {self.skipped} already in "
                f"{os.fspath(results_path)} (of {self.total}), {self.elapsed_s:.1f} s")
        if self.interrupted:
            text += "; run the same command again to resume"
        return text


def default_results_path(report_path) -> str:
    """report.json -> report.results.jsonl (the store beside the report)."""
    root, _ = os.path.splitext(os.fspath(report_path))
    return root + ".results.jsonl"


def record_key(variant: Variant, record: EvalRecord, prompt: str, model_name: str, options: dict,
               system: str | None) -> str:
    facts = json.dumps([model_name, variant.settings(), options, prompt, list(record.sources), system],
                       sort_keys=True, default=str)
    digest = hashlib.sha1(facts.encode("utf-8")).hexdigest()[:10]
    return f"{variant.name}|{record.id}|{digest}"


class EvalRun:
    """Records x variants -> answers in the store at `results`. `load(variant)` returns a loaded model
    (default: phi3v.load(model, device, variant's dtype and quantize, image_cache_mb))."""

    def __init__(self, records: list[EvalRecord], variants: list[Variant], *, model, results,
                 load: Callable[[Variant], object] | None = None, device: str = "auto",
                 system: str | None = None, batch_size: int = 1, workers: int = 2, image_policy=None,
                 image_cache_mb: float = DEFAULT_IMAGE_CACHE_MB, retry_errors: bool = False,
                 progress: bool = False, ray=None, ray_actors: int | None = None,
                 ray_cpus_per_actor: float = 1.0, **options):
        self.records, self.variants = records, variants
        self.model_name = os.fspath(model)
        self.results_path = results
        self.device, self.system = device, system
        self.batch_size, self.workers, self.image_policy = batch_size, workers, image_policy
        self.image_cache_mb, self.retry_errors, self.progress = image_cache_mb, retry_errors, progress
        self.ray, self.ray_actors, self.ray_cpus_per_actor = ray, ray_actors, ray_cpus_per_actor
        self.options = GenerationOptions.from_kwargs(**options)
        self._load = load or self._default_load
        self.stats = EvalStats(total=len(records) * len(variants))
        self.keys = {}  # (variant name, record id) -> store id
        self.record_of = {}  # store id -> record id
        self.jobs = {}  # variant name -> [Job]
        for v in variants:
            opts = self.variant_options(v)
            self.jobs[v.name] = []
            for r in records:
                prompt = build_prompt(r, v.prompt)
                key = record_key(v, r, prompt, self.model_name, _options_dict(opts), system)
                self.keys[(v.name, r.id)] = key
                self.record_of[key] = r.id
                self.jobs[v.name].append(Job(id=key, images=r.images, sources=r.sources, task="eval",
                                             prompt=prompt))

    def variant_options(self, variant: Variant) -> GenerationOptions:
        if variant.num_crops is None:
            return self.options
        return replace(self.options, num_crops=variant.num_crops)

    def _default_load(self, variant: Variant):
        import phi3v

        return phi3v.load(self.model_name, device=self.device, dtype=variant.dtype, quantize=variant.quantize,
                          progress=False, image_cache_mb=self.image_cache_mb)

    # -- running --------------------------------------------------------------------------------

    def run(self) -> EvalStats:
        store = ResultStore(self.results_path)
        store.open()  # the lock first: two runs on one store would interleave
        bar = None
        start = time.perf_counter()
        try:
            skip = done_ids(read_results(self.results_path), retry_errors=self.retry_errors)
            pending = {v.name: [j for j in self.jobs[v.name] if j.id not in skip] for v in self.variants}
            todo = sum(len(p) for p in pending.values())
            self.stats.skipped = self.stats.total - todo
            bar = _progress_bar(todo, self.progress)
            carried = CarriedCaches()  # the finished variants' image caches, handed on (share_caches)
            for variant in self.variants:
                jobs = pending[variant.name]
                if not jobs:
                    continue
                if bar is not None:
                    bar.set_postfix(variant=variant.name, errors=self.stats.errors)
                if self.ray is not None and self.ray is not False:
                    results = self._ray_results(variant, jobs)
                else:
                    model = self._load(variant)
                    share_caches(carried, variant, model)
                    results = self._local_results(variant, model, jobs)
                for result in results:
                    result["variant"] = variant.name
                    result["record"] = self.record_of.get(result["id"])
                    store.append(result)
                    self.stats.done += 1
                    self.stats.errors += result.get("error") is not None
                    self.stats.elapsed_s = time.perf_counter() - start
                    if bar is not None:
                        bar.set_postfix(variant=variant.name, errors=self.stats.errors, refresh=False)
                        bar.update(1)
                if self.ray is None or self.ray is False:
                    carried.take(variant, model)
                    del model, results  # one model in memory at a time
                    gc.collect()
        except BaseException:
            self.stats.interrupted = True
            raise
        finally:
            self.stats.elapsed_s = time.perf_counter() - start
            if bar is not None:
                bar.close()
            store.close()
        return self.stats

    def _local_results(self, variant: Variant, model, jobs: list[Job]) -> Iterator[dict]:
        """Results in job order, each marked with whether its image features came from the cache.
        The features are looked up in generate(), on this thread, so the cache's hit and miss counts
        between two results belong to the record in between (exact with batch_size 1)."""
        cache = getattr(getattr(model, "images", None), "feature_cache", None)
        hits = misses = 0
        if cache is not None:
            hits, misses = cache.hits, cache.misses
        for result in iter_job_results(VideoPrompts(model), jobs, self.variant_options(variant),
                                       batch_size=self.batch_size,
                                       workers=self.workers, image_policy=self.image_policy, system=self.system):
            if cache is not None:
                new_hits, new_misses = cache.hits - hits, cache.misses - misses
                hits, misses = cache.hits, cache.misses
                reused = new_hits > 0 and new_misses == 0 and result.get("error") is None
                result["image_features"] = "reused" if reused else "computed"
            yield result

    def _ray_results(self, variant: Variant, jobs: list[Job]) -> Iterator[dict]:
        from .ray_scale import eval_ray_runner

        runner = eval_ray_runner(self.model_name, variant, address=None if self.ray is True else self.ray,
                                 device=self.device, options=self.variant_options(variant),
                                 batch_size=self.batch_size, workers=self.workers, num_actors=self.ray_actors,
                                 cpus_per_actor=self.ray_cpus_per_actor, image_policy=self.image_policy,
                                 system=self.system)
        for result in runner(jobs):
            result["image_features"] = "computed"
            yield result

    # -- reading back ---------------------------------------------------------------------------

    def answers(self) -> dict[tuple[str, str], dict]:
        """(variant name, record id) -> its latest line in the store, for this run's records."""
        lines = read_results(self.results_path)
        out = {}
        for (variant, record_id), key in self.keys.items():
            if key in lines:
                out[(variant, record_id)] = lines[key]
        return out


@dataclass
class CarriedCaches:
    """The finished variants' image caches, kept while their models are dropped: one pixel cache,
    one feature cache per (feature group, device), so bf16,fp32,int8 still gives int8 bf16's features."""

    pixel_cache: object = None
    feature_caches: dict = field(default_factory=dict)  # (feature group, device) -> cache

    def take(self, variant: Variant, model) -> None:
        images = getattr(model, "images", None)
        if images is not None:
            self.pixel_cache = images.pixel_cache
            self.feature_caches[(variant.feature_group, str(model.device))] = images.feature_cache


def share_caches(carried: CarriedCaches, variant: Variant, model) -> None:
    """Hand the finished variants' image caches to the next model where the settings allow it."""
    new = getattr(model, "images", None)
    if new is None:
        return
    if carried.pixel_cache is not None:
        new.pixel_cache = carried.pixel_cache  # pixels: dtype-independent, keyed by num_crops
    features = carried.feature_caches.get((variant.feature_group, str(model.device)))
    if features is not None:
        new.feature_cache = features


def _options_dict(options: GenerationOptions) -> dict:
    from dataclasses import asdict

    return asdict(options)


def _progress_bar(total: int, enabled: bool):
    """tqdm on stderr (answers/s, ETA, variant, errors), only for a person watching a terminal."""
    if not enabled or total == 0 or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="ans", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
