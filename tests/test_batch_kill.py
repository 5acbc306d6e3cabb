"""A batch job killed part-way and run again: every record ends up in the output exactly once.

`python -m phi3v batch` runs as a subprocess on 16 images; once its output holds at least three
lines the test signals it (SIGTERM: the command stops cleanly and exits 130; SIGKILL: no
chance to clean up at all), then runs the same command again, which must skip what finished
and do the rest.  Greedy texts are then compared with an uninterrupted run of the same records,
so a resumed job is indistinguishable from one that never stopped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_batch import write_images

N_IMAGES = 16
MAX_TOKENS = 64  # long enough that the job is still running well after the third line


def batch_command(model_dir: Path, folder: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "phi3v", "batch", str(folder), "--out", str(out),
            "--task", "describe", "--model", str(model_dir), "--device", "cpu",
            "--dtype", "float32", "--num-crops", "1", "--max-tokens", str(MAX_TOKENS),
            "--batch-size", "1", "-q"]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    f = tmp_path_factory.mktemp("kill-images")
    write_images(f, [f"img{k:02d}.png" for k in range(N_IMAGES)], seed=7)
    return f


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("kill-ref") / "ref.jsonl"
    done = subprocess.run(batch_command(tiny_model_dir, folder, out), env=env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return {r["id"]: r for r in read_lines(out)}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_job_resumes_with_each_record_exactly_once(tiny_model_dir, folder, uninterrupted,
                                                          tmp_path, sig):
    out = tmp_path / "out.jsonl"
    cmd = batch_command(tiny_model_dir, folder, out)
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 240
        while count_lines(out) < 3:
            assert proc.poll() is None, f"the job ended before it could be killed: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "no output after 240 s"
            time.sleep(0.02)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if sig == signal.SIGTERM:
        assert proc.returncode == 130, stderr
        assert "batch interrupted" in stderr and "run the same command again" in stderr
    else:
        assert proc.returncode == -signal.SIGKILL
    first = read_lines(out)
    assert 3 <= len(first) < N_IMAGES, "the kill should land part-way through the job"

    again = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"{N_IMAGES - len(first)} done, 0 errors, {len(first)} skipped" in again.stderr

    ids = [r["id"] for r in read_lines(out)]
    assert sorted(ids) == sorted(uninterrupted), "every record present, none twice"
    assert len(ids) == len(set(ids)) == N_IMAGES
    for r in read_lines(out):
        assert r["error"] is None
        assert r["text"] == uninterrupted[r["id"]]["text"]
