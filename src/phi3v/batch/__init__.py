"""Batch jobs over files: records in, JSONL results out, resumable (see docs/batch.md).

    from phi3v.batch import run_batch
"""

from .local_runner import iter_job_results
from .runner import run_batch

__all__ = ["iter_job_results", "run_batch"]
