"""`phi3v eval --ray`: one variant's records on a Ray cluster, like `phi3v batch --ray`.

The distribution is batch's (batch/ray_runner.py: Ray Data map_batches over a fixed pool of model
actors, results streamed back to the driver's store); the one difference is the actor, which
loads the variant's weights (dtype and quantization) instead of the plain model. Variants run one
after another, each with its own actor pool; image caches are per actor, not shared between variants.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Iterator

from ..batch.local_runner import iter_job_results
from ..batch.ray_runner import _import_ray, _placement
from ..batch.records import Job
from ..options import GenerationOptions
from .variants import Variant


class VariantActor:
    """One Ray actor = the model loaded with one variant's weights; batches of {"job": [json str]}."""

    def __init__(self, *, model: str, device: str, dtype: str, quantize: str | None, options: GenerationOptions,
                 batch_size: int, workers: int, image_policy, system: str | None, torch_threads: int):
        import torch

        import phi3v

        torch.set_num_threads(max(1, torch_threads))  # the actor's share of the node's cores
        from .video_input import VideoPrompts

        self.model = VideoPrompts(phi3v.load(model, device=device, dtype=dtype, quantize=quantize, progress=False))
        self.options, self.batch_size, self.workers = options, batch_size, workers
        self.image_policy, self.system = image_policy, system

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        jobs = [Job.from_dict(json.loads(text)) for text in batch["job"]]
        results = iter_job_results(self.model, jobs, self.options, batch_size=self.batch_size,
                                   workers=self.workers, image_policy=self.image_policy, system=self.system)
        return {"result": np.array([json.dumps(r, ensure_ascii=False) for r in results], dtype=object)}


def eval_ray_runner(model: str, variant: Variant, *, address: str | None, device: str,
                    options: GenerationOptions, batch_size: int, workers: int, num_actors: int | None,
                    cpus_per_actor: float, image_policy, system: str | None):
    """pending jobs -> result dicts (in the order actors finish them), computed by Ray actors."""
    model = os.path.abspath(model) if os.path.isdir(model) else model

    def run(pending: list[Job]) -> Iterator[dict]:
        if not pending:
            return
        ray = _import_ray()
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(address=address, logging_level=logging.WARNING, configure_logging=True, log_to_driver=True)
        try:
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False  # the eval's own bar counts answers
            logging.getLogger("ray.data").setLevel(logging.ERROR)
            blocks = max(1, math.ceil(len(pending) / batch_size))
            actor_device, per_actor, count = _placement(ray, device, num_actors, cpus_per_actor, blocks)
            ds = ray.data.from_items([{"job": json.dumps(j.to_dict())} for j in pending],
                                     override_num_blocks=blocks)
            ds = ds.map_batches(
                VariantActor,
                fn_constructor_kwargs={"model": model, "device": actor_device, "dtype": variant.dtype,
                                       "quantize": variant.quantize, "options": options,
                                       "batch_size": batch_size, "workers": workers,
                                       "image_policy": image_policy, "system": system,
                                       "torch_threads": max(1, int(per_actor.get("num_cpus", 1)))},
                batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=count), **per_actor)
            for row in ds.iter_rows():
                yield json.loads(row["result"])
        finally:
            if started_here:
                ray.shutdown()

    return run
