"""Peak memory and time of `phi3v.load` on a FULL-SIZE random checkpoint (CPU, bfloat16).

    python scripts/load_memory.py --dir /work/bench-data/phi3v-full-random

1. Makes (once) a random bf16 checkpoint with the real shapes and the official 2-shard layout via
   `phi3v.testing.make_tiny_checkpoint(sizes="full", shards=2)` (~8.3 GB on disk; reused when the
   folder already holds a complete one).
2. In a fresh Python subprocess (so nothing from step 1 inflates the numbers) loads it with
   `phi3v.load(dir, device="cpu", dtype="bfloat16")` and reports:
     - peak RSS: resource.getrusage(RUSAGE_SELF).ru_maxrss and /proc/self/status VmHWM,
     - the same right after load and again after every weight has been read once (safetensors
       memory-maps the shards, so pages of tensors kept as mmap views are only faulted in when
       read; "after touch" is the figure that matters for a model that is then used),
     - RssAnon / RssFile (private copies vs pages of the mapped files),
     - ratios to the weight bytes (the index's metadata.total_size), and the load time.
The goal is peak RSS <= 1.2 x the weight bytes. Prints one JSON object (also with --json-out).

Measured 2025-11 (torch 2.13 CPU, safetensors 0.8, phi3v style, page cache warm): total_size 8.293 GB,
load 3.3 s, RSS after load 0.35 GB, peak after touching every weight 8.60 GB = 1.037 x the weights
(RssAnon 0.24 GB, RssFile 8.37 GB): a bf16 -> bf16 CPU load keeps the mmap views, no copy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

INDEX = "model.safetensors.index.json"
DEFAULT_DIR = "/work/bench-data/phi3v-full-random"


def checkpoint_complete(folder: Path) -> bool:
    """True when the index exists and every shard it names is present."""
    index = folder / INDEX
    if not index.is_file():
        return False
    shards = set(json.loads(index.read_text())["weight_map"].values())
    return all((folder / s).is_file() for s in shards)


def make_checkpoint(folder: Path, style: str, seed: int) -> None:
    """Write the full-size checkpoint (runs in its own subprocess, see main)."""
    from phi3v.testing import make_tiny_checkpoint
    import torch

    partial = folder.with_name(folder.name + ".partial")  # renamed at the end: no half-written reuse
    shutil.rmtree(partial, ignore_errors=True)
    make_tiny_checkpoint(partial, style=style, seed=seed, sizes="full", shards=2, dtype=torch.bfloat16)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)


def _run_self(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)


# --------------------------------------------------------------------------------------------
# child: the measurement itself, in a fresh interpreter
# --------------------------------------------------------------------------------------------

def _status_kib() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile from /proc/self/status, in KiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0])
    return out


def _snapshot() -> dict[str, float]:
    """Memory figures in GB (1e9 bytes). ru_maxrss is KiB on Linux."""
    s = _status_kib()
    gb = lambda kib: round(kib * 1024 / 1e9, 3)  # noqa: E731
    return {"ru_maxrss_gb": gb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss),
            "vm_hwm_gb": gb(s["VmHWM"]), "vm_rss_gb": gb(s["VmRSS"]),
            "rss_anon_gb": gb(s["RssAnon"]), "rss_file_gb": gb(s["RssFile"])}


def child(folder: Path) -> dict:
    import torch

    import phi3v

    torch.set_num_threads(1)
    weight_bytes = json.loads((folder / INDEX).read_text())["metadata"]["total_size"]
    baseline = _snapshot()  # interpreter + torch + phi3v imports
    t0 = time.perf_counter()
    model = phi3v.load(str(folder), device="cpu", dtype="bfloat16", progress=False)
    load_s = time.perf_counter() - t0
    after_load = _snapshot()

    # Read every weight once (fault in mmap-backed pages), as a first forward pass would.
    t1 = time.perf_counter()
    loaded_bytes = 0
    with torch.inference_mode():
        for p in model.module.parameters():
            loaded_bytes += p.numel() * p.element_size()
            p.view(-1)[:: max(1, 4096 // p.element_size())].float().sum()  # one read per 4 KiB page
    touch_s = time.perf_counter() - t1
    after_touch = _snapshot()

    peak = max(after_touch["ru_maxrss_gb"], after_touch["vm_hwm_gb"]) * 1e9
    return {
        "weight_bytes_total_size": weight_bytes,
        "module_param_bytes": loaded_bytes,  # smaller: the unused CLIP layer + post_layernorm are skipped
        "load_s": round(load_s, 2),
        "touch_s": round(touch_s, 2),
        "baseline": baseline,
        "after_load": after_load,
        "after_touch": after_touch,
        "peak_rss_over_weights": round(peak / weight_bytes, 3),
        "peak_rss_minus_baseline_over_weights": round(
            (peak - baseline["vm_hwm_gb"] * 1e9) / weight_bytes, 3),
        "goal": "peak RSS <= 1.2 x weight bytes",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=DEFAULT_DIR, help="checkpoint folder (made once, then reused)")
    ap.add_argument("--style", default="phi3v", choices=("phi3v", "phi35v"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out", help="also write the result JSON here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--make", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    folder = Path(args.dir).expanduser().resolve()

    if args.child:
        print(json.dumps(child(folder)))
        return 0
    if args.make:
        make_checkpoint(folder, args.style, args.seed)
        return 0

    # Both steps run in subprocesses so this parent stays small: Linux carries the pre-exec
    # (forked) image's high-water mark into the child's ru_maxrss, so a parent that had just
    # written a ~4 GB shard would inflate the child's ru_maxrss (VmHWM is per-exec, unaffected).
    make_s = 0.0
    if not checkpoint_complete(folder):
        t0 = time.perf_counter()
        proc = _run_self("--make", "--dir", str(folder), "--style", args.style, "--seed", str(args.seed))
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            return proc.returncode
        make_s = time.perf_counter() - t0
    proc = _run_self("--child", "--dir", str(folder))
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        return proc.returncode
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["checkpoint_dir"] = str(folder)
    result["checkpoint_made_s"] = round(make_s, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
