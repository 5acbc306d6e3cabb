"""Batch jobs on a Ray cluster: Ray Data does the distribution, phi3v only the inference.

    phi3v batch scans/ --task ocr --out scans.jsonl --ray 10.0.0.5:6379

The driver (this process) discovers the records and filters out those already in the output
file (resume works exactly as in a local run), then builds a Ray dataset of the pending jobs
(`ray.data.from_items`, one JSON string per row so records of any shape fit one column).
`map_batches` runs `ModelActor`, a callable class: Ray starts a fixed pool of actors, each loads
one copy of the model once and runs the local runner (`local_runner.iter_job_results`) on the batches it
is given.  The driver streams the result rows back (`iter_rows`) and appends each to the same
JSONL store as it arrives, so a killed driver loses only the records in flight.

Requirements on the cluster: every node has phi3v (and torch) installed, can load the model
(the same folder path or hub cache), and sees the input images under the same paths (shared
storage); image paths are resolved to absolute paths on the driver.  Results arrive in the order
actors finish them, not in input order; the output is keyed by id.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Iterator

from .local_runner import iter_job_results
from .records import Job
from ..errors import Phi3VError
from ..options import GenerationOptions


class ModelActor:
    """One Ray actor = one loaded model; called with batches of {"job": [json str, ...]}."""

    def __init__(self, *, model: str, device: str, dtype, options: GenerationOptions,
                 batch_size: int, workers: int, image_policy, system: str | None,
                 torch_threads: int):
        import torch

        import phi3v

        # Ray gives each actor `num_cpus` cores; torch's default (all cores) would oversubscribe.
        torch.set_num_threads(max(1, torch_threads))
        self.model = phi3v.load(model, device=device, dtype=dtype, progress=False)
        self.options = options
        self.batch_size = batch_size
        self.workers = workers
        self.image_policy = image_policy
        self.system = system

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        jobs = [Job.from_dict(json.loads(text)) for text in batch["job"]]
        results = iter_job_results(self.model, jobs, self.options, batch_size=self.batch_size,
                                   workers=self.workers, image_policy=self.image_policy,
                                   system=self.system)
        lines = [json.dumps(r, ensure_ascii=False) for r in results]
        return {"result": np.array(lines, dtype=object)}


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401  (ray without the [data] extra lacks it)
    except ImportError as e:
        raise Phi3VError(
            f"--ray needs Ray Data: pip install 'ray[data]' (or pip install 'phi3v[ray]'); {e}"
        ) from None
    return ray


def _placement(ray, device: str, num_actors: int | None, cpus_per_actor: float,
               n_blocks: int) -> tuple[str, dict, int]:
    """(device inside the actor, Ray resources per actor, actor count) for this cluster."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    wants_gpu = device.startswith("cuda") or (device == "auto" and gpus > 0)
    if wants_gpu:
        if gpus == 0:
            raise Phi3VError(f"--device {device} asks for GPUs but the Ray cluster has none")
        # Ray sets CUDA_VISIBLE_DEVICES per actor, so its one GPU is always "cuda" (cuda:0).
        actor_device, per_actor, available = "cuda", {"num_gpus": 1}, gpus
    else:
        cpus = resources.get("CPU", 1)
        actor_device = "cpu"
        per_actor = {"num_cpus": cpus_per_actor}
        available = max(1, int(cpus // cpus_per_actor))
    count = num_actors if num_actors is not None else available
    if count < 1:
        raise Phi3VError(f"the number of Ray actors must be >= 1, got {count}")
    return actor_device, per_actor, max(1, min(count, n_blocks))


def ray_runner(model, *, address: str | None, device: str = "auto", dtype=None,
               options: GenerationOptions, batch_size: int = 1, workers: int = 1,
               num_actors: int | None = None, cpus_per_actor: float = 1.0,
               image_policy=None, system: str | None = None):
    """A runner for batch.BatchJob: pending jobs -> result dicts, computed by Ray actors.

    address: a Ray cluster ("10.0.0.5:6379", "ray://...", "auto"), or None: the cluster Ray
    finds (RAY_ADDRESS, a cluster started on this machine) or a new local one.  If Ray is already
    initialized in this process that connection is used as it is.
    """
    if model is None:
        import phi3v

        model = phi3v.DEFAULT_MODEL
    if not isinstance(model, (str, os.PathLike)):
        if not hasattr(model, "name"):
            raise Phi3VError("with ray, give the model as an id or folder: each actor loads its own")
        # A loaded Phi3V: actors load their own copy from the same name / folder.
        dtype = dtype if dtype is not None else str(getattr(model, "dtype", "")).replace("torch.", "") or None
        model = model.name
    model = os.fspath(model)
    if os.path.isdir(model):
        model = os.path.abspath(model)

    def run(pending: list[Job]) -> Iterator[dict]:
        if not pending:
            return
        ray = _import_ray()
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(address=address, logging_level=logging.WARNING,
                     configure_logging=True, log_to_driver=True)
        try:
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False  # our own bar (batch.BatchJob) counts records
            ctx.print_on_execution_start = False
            # Ray Data's INFO/WARNING lines (execution start/finish, "progress bars disabled")
            # would interleave with our bar; its errors still surface as exceptions.
            logging.getLogger("ray.data").setLevel(logging.ERROR)
            n_blocks = max(1, math.ceil(len(pending) / batch_size))
            actor_device, per_actor, count = _placement(ray, device, num_actors,
                                                        cpus_per_actor, n_blocks)
            threads = max(1, int(per_actor.get("num_cpus", 1)))
            items = [{"job": json.dumps(j.to_dict())} for j in pending]
            try:  # about one block per actor call, so results stream back as they finish
                ds = ray.data.from_items(items, override_num_blocks=n_blocks)
            except TypeError:  # Ray < 2.10 names it `parallelism`
                ds = ray.data.from_items(items, parallelism=n_blocks)
            ds = ds.map_batches(
                ModelActor,
                fn_constructor_kwargs={
                    "model": model, "device": actor_device, "dtype": dtype, "options": options,
                    "batch_size": batch_size, "workers": workers, "image_policy": image_policy, "system": system,
                    "torch_threads": threads,
                },
                batch_size=batch_size,
                compute=ray.data.ActorPoolStrategy(size=count),
                **per_actor,
            )
            for row in ds.iter_rows():
                yield json.loads(row["result"])
        finally:
            if started_here:
                ray.shutdown()

    return run
