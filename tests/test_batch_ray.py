"""The same batch job on a Ray cluster gives the same results as the local run.

The test starts its own one-node Ray cluster on 127.0.0.1 with two CPUs (`ray start --head
--block` in a new session, stopped with SIGINT at the end, and anything left in that session
killed), then runs `phi3v batch ... --ray 127.0.0.1:PORT --ray-actors 2`: Ray Data feeds the
records to two actors, each holding one tiny model.  For greedy decoding every record's text must
equal the local run's; resume must work as locally (records already in the output are skipped).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("ray.data", reason="Ray Data is not installed: pip install 'ray[data]' "
                    "(.ci/run installs it, so this test runs in CI)")

from test_batch import write_images  # noqa: E402

MAX_TOKENS = 8
RAY_CLI = "import sys; from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()"


def env() -> dict:
    # A private throwaway cluster on 127.0.0.1: no token (it would come from ~/.ray, if any).
    return {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "disabled"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_address():
    port = free_port()
    # Short folder: Ray puts unix sockets below it (path length limit ~107 bytes).
    temp_dir = tempfile.mkdtemp(prefix="phi3v-ray-", dir="/tmp")
    log_path = Path(temp_dir) / "ray-start.log"
    with open(log_path, "w") as log:
        head = subprocess.Popen(
            [sys.executable, "-c", RAY_CLI, "start", "--head", "--node-ip-address", "127.0.0.1",
             "--port", str(port), "--num-cpus", "2", "--num-gpus", "0",
             "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp_dir,
             "--block"],
            stdout=log, stderr=subprocess.STDOUT, env=env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while "block forever" not in log_path.read_text():
            assert head.poll() is None, f"ray start failed:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"ray start timed out:\n{log_path.read_text()}"
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        head.send_signal(signal.SIGINT)  # `ray start --block` stops its processes on SIGINT
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever is left in the session we started (never anyone else's processes)
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def batch_command(model_dir: Path, folder: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "phi3v", "batch", str(folder), "--out", str(out),
            "--task", "ocr", "--model", str(model_dir), "--device", "cpu", "--dtype", "float32",
            "--num-crops", "1", "--max-tokens", str(MAX_TOKENS), "--batch-size", "2", "-q", *extra]


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_ray_run_equals_local_run_and_resumes(tiny_model_dir, ray_address, tmp_path):
    folder = tmp_path / "imgs"
    write_images(folder, [f"img{k}.png" for k in range(6)] + ["sub/x.png"], seed=11)
    (folder / "sub" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")

    local_out = tmp_path / "local.jsonl"
    local = subprocess.run(batch_command(tiny_model_dir, folder, local_out), env=env(),
                           capture_output=True, text=True, timeout=300)
    assert local.returncode == 1, local.stderr  # 1: finished with a failed record
    local_results = {r["id"]: r for r in read_lines(local_out)}
    assert len(local_results) == 8

    # Seed the Ray job's output with two finished records: it must skip them (resume).
    ray_out = tmp_path / "ray.jsonl"
    ray_out.write_text("".join(json.dumps(r) + "\n" for r in read_lines(local_out)[:2]))
    ray_cmd = batch_command(tiny_model_dir, folder, ray_out, "--ray", ray_address,
                            "--ray-actors", "2")
    remote = subprocess.run(ray_cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert remote.returncode == 1, remote.stderr
    assert "6 done, 1 errors, 2 skipped (of 8)" in remote.stderr, remote.stderr

    ray_lines = read_lines(ray_out)
    assert sorted(r["id"] for r in ray_lines) == sorted(local_results)  # each id exactly once
    for r in ray_lines:
        expected = local_results[r["id"]]
        assert r["text"] == expected["text"], r["id"]
        assert r["error"] == expected["error"]
        assert r["usage"] == expected["usage"]
        assert (r["task"], r["prompt"], r["images"]) == (expected["task"], expected["prompt"],
                                                         expected["images"])
    assert local_results["sub/corrupt.png"]["error"].startswith("ImageError:")

    # Everything is done now: a rerun has nothing to send to the cluster.
    again = subprocess.run(ray_cmd, env=env(), capture_output=True, text=True, timeout=120)
    assert "0 done, 0 errors, 8 skipped (of 8)" in again.stderr, again.stderr
    assert len(read_lines(ray_out)) == 8
