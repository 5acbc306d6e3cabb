"""Concurrency benchmark of `phi3v serve`: continuous batching against one request at a time (issue 12).

    python scripts/bench_server.py --tiny                                   # a quick check, seconds
    python scripts/bench_server.py --make-full ~/.cache/phi3v/bench/phi3v-full-random --out bf16.json
    python scripts/bench_server.py --model DIR --quantize int4 --clients 1,4,8 --repeats 2

Figures, not a test: run it by hand on a quiet machine. For each server variant, one after the
other (never two servers at once, they would share the cores):

  continuous   phi3v serve --max-batch 8       every request joins the running batch
  baseline     phi3v serve --max-batch 1       one request at a time (the previous server's streams)

it starts `python -m phi3v serve` on 127.0.0.1 (a free port, --dtype bfloat16, optional --quantize,
extra serve flags after `--`), sends one warm-up request, then for each client count (--clients)
releases that many streaming clients together (official `openai` client, one thread each), each
asking about its own random 800x600 image (num_crops 4: a 2x2 grid plus the global view, 757 image
tokens) for --tokens tokens at temperature 0. Per client: TTFT (request sent -> first content
chunk), inter-token latencies (gaps between content chunks), total time, completion_tokens from the
usage chunk; per run: aggregate tokens/s = the clients' completion tokens / (first start -> last
finish). Prints a markdown table, the continuous/baseline ratios and the issue's two goals:

  1. 8 clients: continuous >= 3x the aggregate tokens/s of baseline;
  2. continuous: p95 inter-token latency at 8 clients < 3x that at 1 client.

Quietness: before each run it prints the 1-minute load average and the cores that processes other
than this script and its server kept busy over the last second (/proc/stat minus our own CPU time).
The load average also counts this benchmark's own previous run for a minute or two (it decays with
a 1-minute time constant), so the warning uses it only before the first run and afterwards the
direct measure; both warn above 0.5.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from openai import OpenAI
from PIL import Image

HOST = "127.0.0.1"  # the only address this script serves on and talks to
VARIANTS = {"continuous": 8, "baseline": 1}  # variant -> --max-batch
QUIET_LOAD = 0.5
PROMPT = "Describe this image in detail."


# ---- machine and quietness ---------------------------------------------------------------------


def machine() -> dict:
    import torch  # only to report the threads a server started here gets by default

    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpu": model, "cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def _busy_jiffies() -> int:
    """CPU time all processes spent, in clock ticks (first line of /proc/stat: all cores)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return sum(values) - values[3] - values[4]  # minus idle and iowait


def _own_jiffies(pids) -> int:
    """utime + stime of these processes (all their threads), in clock ticks."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "(comm)", which may hold spaces
            total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def quietness(server_pid: int, window_s: float = 1.0) -> dict:
    """1-minute load average, and the cores others kept busy over `window_s` (not us, not our server)."""
    pids = [os.getpid(), server_pid]
    busy0, own0, t0 = _busy_jiffies(), _own_jiffies(pids), time.perf_counter()
    time.sleep(window_s)
    busy1, own1, t1 = _busy_jiffies(), _own_jiffies(pids), time.perf_counter()
    others = max(0, (busy1 - busy0) - (own1 - own0)) / os.sysconf("SC_CLK_TCK") / (t1 - t0)
    return {"load1": os.getloadavg()[0], "others_busy_cores": round(others, 2)}


# ---- the server --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """`python -m phi3v serve` as a child process; its log goes to a file (printed if it fails)."""

    def __init__(self, model_dir: Path, max_batch: int, args, log_path: Path):
        self.port = free_port()
        cmd = [sys.executable, "-m", "phi3v", "serve", "--model", str(model_dir), "--host", HOST,
               "--port", str(self.port), "--device", args.device, "--dtype", "bfloat16",
               "--max-batch", str(max_batch), "--log-level", "warning"]
        if args.quantize:
            cmd += ["--quantize", args.quantize]
        self.cmd = cmd + list(args.serve_args)
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT)
        self.base = f"http://{HOST}:{self.port}"

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass  # not listening yet (loading the model)
            time.sleep(0.5)
        raise RuntimeError(f"the server was not ready within {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        # SIGTERM: the server drains (nothing is in flight by now) and exits; kill if it hangs.
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# ---- clients -----------------------------------------------------------------------------------


def image_uri(seed: int) -> str:
    """A random 800x600 photo-sized JPEG (4:3 -> a 2x2 crop grid at num_crops 4). Every client of
    every run gets a new one, so the server's image caches never answer for the vision tower."""
    pixels = np.random.default_rng(seed).integers(0, 256, (600, 800, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def one_client(client: OpenAI, model_id: str, uri: str, args, barrier: threading.Barrier | None) -> dict:
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                             {"type": "text", "text": PROMPT}]}]
    if barrier is not None:
        barrier.wait()  # all clients of a run start together
    start = time.perf_counter()
    stamps, usage, finish, error, server = [], None, None, None, {}
    try:
        stream = client.chat.completions.create(
            model=model_id, messages=messages, stream=True, max_tokens=args.tokens, temperature=0,
            stream_options={"include_usage": True}, extra_body={"num_crops": args.num_crops})
        for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                usage = chunk.usage
                server = (chunk.model_extra or {}).get("phi3v") or {}  # the server's own timings
            for choice in chunk.choices:
                if choice.delta.content:  # the role-only first chunk and the final empty one don't count
                    stamps.append(now)
                finish = choice.finish_reason or finish
    except Exception as err:  # reported per client; the run goes on
        error = f"{type(err).__name__}: {err}"
    end = time.perf_counter()
    return {"start": start, "end": end, "total_s": end - start,
            "ttft_s": stamps[0] - start if stamps else None,
            "itl_s": [b - a for a, b in zip(stamps, stamps[1:])],
            "content_chunks": len(stamps),
            # random weights rarely stop early, but check: tokens/s counts what was really produced
            "completion_tokens": usage.completion_tokens if usage else None,
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "finish_reason": finish, "error": error,
            "server_timings": server.get("timings", {}), "queue_s": server.get("queue_s")}


def run_clients(server: Server, model_id: str, n: int, seed: int, args) -> dict:
    uris = [image_uri(seed * 1000 + i) for i in range(n)]  # made before the clock starts
    # One OpenAI client (its own connection pool) per thread; no retries: a 429 is a finding.
    clients = [OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0,
                      timeout=args.request_timeout_s) for _ in range(n)]
    barrier = threading.Barrier(n)
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda i: one_client(clients[i], model_id, uris[i], args, barrier), range(n)))
    for c in clients:
        c.close()
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    tokens = sum(r["completion_tokens"] or r["content_chunks"] for r in results)  # chunks only if no usage
    return {"clients": n, "wall_s": wall, "completion_tokens": tokens, "tok_s": tokens / wall,
            "errors": sum(r["error"] is not None for r in results), "per_client": results}


# ---- figures -----------------------------------------------------------------------------------


def pct(values, q):
    return float(np.percentile(values, q)) if len(values) else float("nan")


def summarize(runs: list[dict]) -> dict:
    """One (variant, clients) cell over its repeats: tok/s the median of the repeats; TTFT and
    inter-token latencies pooled over every client of every repeat."""
    clients = [c for r in runs for c in r["per_client"]]
    ttft = [c["ttft_s"] for c in clients if c["ttft_s"] is not None]
    itl = [g for c in clients for g in c["itl_s"]]
    per_client_tokens = [c["completion_tokens"] for c in clients if c["completion_tokens"] is not None]
    # the server's compute to admit a request (its images, vision tower, prefill), from its own timings
    work = [sum(c["server_timings"].get(k, 0.0) for k in ("preprocess_s", "vision_s", "prefill_s"))
            for c in clients if c.get("server_timings")]
    return {"admit_work_p50": pct(work, 50),
            "tok_s": float(np.median([r["tok_s"] for r in runs])), "wall_s": float(np.median([r["wall_s"] for r in runs])),
            "tokens_min": min(per_client_tokens, default=None), "tokens_max": max(per_client_tokens, default=None),
            "prompt_tokens": clients[0]["prompt_tokens"] if clients else None,
            "ttft_p50": pct(ttft, 50), "ttft_p95": pct(ttft, 95),
            "itl_p50": pct(itl, 50), "itl_p95": pct(itl, 95),
            "errors": sum(r["errors"] for r in runs), "repeats": len(runs)}


def ms(seconds: float) -> str:
    if seconds != seconds:  # nan: no such figure (e.g. no gaps when a client got one chunk)
        return "-"
    if seconds < 0.01:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def report(summary: dict, counts: list[int], tokens: int) -> tuple[str, dict]:
    lines = ["| variant | clients | tokens/client | agg tok/s | wall | TTFT p50 | TTFT p95 | ITL p50 | ITL p95 | errors |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (variant, n), s in summary.items():
        tok = f"{s['tokens_min']}" if s["tokens_min"] == s["tokens_max"] else f"{s['tokens_min']}-{s['tokens_max']}"
        lines.append(f"| {variant} | {n} | {tok} | {s['tok_s']:.2f} | {s['wall_s']:.1f} s | {ms(s['ttft_p50'])} | "
                     f"{ms(s['ttft_p95'])} | {ms(s['itl_p50'])} | {ms(s['itl_p95'])} | {s['errors']} |")
    cells = [s for s in summary.values()]
    if any(s["tokens_min"] is not None and s["tokens_min"] < tokens for s in cells):
        lines.append(f"\nnote: some clients got fewer than {tokens} tokens (a stop token): tok/s counts what came.")

    ratios = {}
    if all((v, n) in summary for v in VARIANTS for n in counts):
        lines += ["", "| clients | tok/s continuous/baseline | TTFT p50 | TTFT p95 | ITL p50 | ITL p95 |",
                  "|---|---|---|---|---|---|"]
        for n in counts:
            c, b = summary[("continuous", n)], summary[("baseline", n)]
            ratios[n] = {k: c[k] / b[k] if b[k] else float("nan")
                         for k in ("tok_s", "ttft_p50", "ttft_p95", "itl_p50", "itl_p95")}
            r = ratios[n]
            lines.append(f"| {n} | {r['tok_s']:.2f}x | {r['ttft_p50']:.2f}x | {r['ttft_p95']:.2f}x | "
                         f"{r['itl_p50']:.2f}x | {r['itl_p95']:.2f}x |")

    goals = {}
    if ("continuous", 8) in summary and ("baseline", 8) in summary:
        ratio = summary[("continuous", 8)]["tok_s"] / summary[("baseline", 8)]["tok_s"]
        goals["throughput_8_vs_baseline"] = {"ratio": ratio, "target": ">= 3", "met": ratio >= 3}
    if ("continuous", 8) in summary and ("continuous", 1) in summary:
        ratio = summary[("continuous", 8)]["itl_p95"] / summary[("continuous", 1)]["itl_p95"]
        goals["itl_p95_8_vs_1"] = {"ratio": ratio, "target": "< 3", "met": ratio < 3}
    ceiling = throughput_ceiling(summary, 8)
    bounded = throughput_ceiling(summary, 8, itl_factor=3.0)
    if ceiling is not None:
        goals["throughput_8_vs_baseline"]["ceiling"] = ceiling
        goals["throughput_8_vs_baseline"]["ceiling_with_itl_goal"] = bounded
    lines.append("")
    for name, text in (("throughput_8_vs_baseline", "8 clients: aggregate tok/s continuous / baseline"),
                       ("itl_p95_8_vs_1", "continuous: p95 inter-token latency 8 clients / 1 client")):
        g = goals.get(name)
        lines.append(f"- goal {text} {g['target']}: {g['ratio']:.2f}x -> {'MET' if g['met'] else 'NOT met'}"
                     if g else f"- goal {text}: n/a (needs 1 and 8 clients and both variants)")
    if ceiling is not None:
        one = summary[("baseline", 1)]
        p, d = admission_and_rest(one)
        lines.append(f"- one client alone on the baseline: P = {p:.2f} s to admit it (server timings: preprocess + "
                     f"vision + prefill; first content chunk at {one['ttft_p50']:.2f} s), D = {d:.2f} s the rest")
        lines.append(f"- ceiling of that ratio on this machine: {ceiling:.2f}x = 8(P+D)/(8P+D), from one client "
                     f"alone on the baseline (P = the server's preprocess + vision + prefill time, D = the rest of its wall time): the newcomers' vision and "
                     f"prefill are compute-bound and cannot overlap one another, and the last one admitted "
                     f"still decodes its tokens after its prefill")
        lines.append(f"- and with the latency goal kept (a step while others stream at most 3x one client's): "
                     f"{bounded:.2f}x = 8(P+D)/(P + 7P x 3/2 + D): such a step carries at most 2 one-client steps "
                     f"of newcomer work, so the 7 newcomers admitted while others stream take 3/2 of their work")
    return "\n".join(lines), {"ratios": {str(n): r for n, r in ratios.items()}, "goals": goals}


def admission_and_rest(one: dict) -> tuple[float, float]:
    """One client alone -> (P, D): P the compute that admits it (the server's preprocess + vision +
    prefill time when it reports them, else the time to first content chunk), D the rest of its wall."""
    p = one.get("admit_work_p50", float("nan"))
    p = p if p == p and p > 0 else one["ttft_p50"]
    return p, max(0.0, one["wall_s"] - p)


def throughput_ceiling(summary: dict, n: int, itl_factor: float | None = None) -> float | None:
    """The most n clients can gain over one-at-a-time serving: one-at-a-time takes n(P + D), and
    continuous batching at least nP (every newcomer's compute-bound vision and prefill, one after
    another) + D (the last one's tokens, each a decoder pass) -> n(P + D) / (nP + D).
    itl_factor F: with steps kept within F one-client steps t1 while others stream, a step holds the
    rows' decode (>= t1) and at most (F - 1) t1 of newcomer work, so the n - 1 newcomers admitted
    while others stream take (n - 1) P F / (F - 1) -> n(P + D) / (P + (n - 1) P F / (F - 1) + D)."""
    one = summary.get(("baseline", 1))
    if one is None or one["ttft_p50"] != one["ttft_p50"] or ("baseline", n) not in summary:
        return None
    p, d = admission_and_rest(one)
    admitting = n * p if itl_factor is None else p + (n - 1) * p * itl_factor / (itl_factor - 1)
    return n * (p + d) / (admitting + d)


# ---- the checkpoint ----------------------------------------------------------------------------


def full_checkpoint(folder: Path) -> Path:
    """Reuse a complete random full-size checkpoint in `folder`, or write one (~8.3 GB, minutes)
    in a child process, so its memory is not part of this process's, then rename it into place
    (a half-written folder is never reused)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file() and all((folder / s).is_file() for s in set(json.loads(index.read_text())["weight_map"].values())):
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    print(f"writing a random full-size checkpoint to {folder} (~8.3 GB, once) ...", flush=True)
    code = ("import sys; from phi3v.testing import make_tiny_checkpoint; "
            "make_tiny_checkpoint(sys.argv[1], sizes='full', shards=2)")
    subprocess.run([sys.executable, "-c", code, str(partial)], check=True)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


# ---- main --------------------------------------------------------------------------------------


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    serve_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="extra `phi3v serve` flags go after `--`")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="a checkpoint folder")
    src.add_argument("--make-full", type=Path, metavar="DIR",
                     help="a random full-size checkpoint in DIR (written once, ~8.3 GB; reused after)")
    src.add_argument("--tiny", action="store_true", help="a tiny random checkpoint in a temp folder (a quick check)")
    p.add_argument("--quantize", choices=("int8", "int4"), help="passed to phi3v serve (quantize while loading)")
    p.add_argument("--device", default="cpu", help="phi3v serve --device (default cpu)")
    p.add_argument("--clients", default="1,4,8", help="concurrent client counts (default 1,4,8)")
    p.add_argument("--tokens", type=int, default=64, help="max_tokens of each request (default 64)")
    p.add_argument("--num-crops", type=int, default=4, help="num_crops of each request (default 4)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each (variant, clients) (default 1)")
    p.add_argument("--variants", default="continuous,baseline", help="which servers, in this order")
    p.add_argument("--start-timeout-s", type=float, default=900, help="for the server to load (default 900)")
    p.add_argument("--request-timeout-s", type=float, default=3600, help="per request (default 3600)")
    p.add_argument("--out", type=Path, help="write everything (every client's timings too) as JSON")
    args = p.parse_args(argv)
    args.serve_args = serve_args
    counts = [int(n) for n in args.clients.split(",")]
    variants = [v.strip() for v in args.variants.split(",")]
    if unknown := [v for v in variants if v not in VARIANTS]:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")

    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores ({info['cores_usable']} usable), "
          f"torch {info['torch']} with {info['torch_threads']} threads"
          + (f", OMP_NUM_THREADS={info['OMP_NUM_THREADS']}" if info["OMP_NUM_THREADS"] else ""), flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="phi3v-bench-server-"))
    try:
        if args.tiny:
            from phi3v.testing import make_tiny_checkpoint

            model_dir = make_tiny_checkpoint(tmp / "tiny-phi3v")
        elif args.make_full:
            model_dir = full_checkpoint(args.make_full.expanduser())
        else:
            model_dir = args.model
        runs, first = [], True
        for variant in variants:
            server = Server(model_dir, VARIANTS[variant], args, tmp / f"{variant}.log")
            try:
                t0 = time.perf_counter()
                server.wait_ready(args.start_timeout_s)
                print(f"\n[{variant}] {' '.join(server.cmd[1:])}\n[{variant}] ready in "
                      f"{time.perf_counter() - t0:.1f} s", flush=True)
                with OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0) as c:
                    model_id = c.models.list().data[0].id
                    # Warm-up (first-call costs: kernels, allocator); not measured. Its own image.
                    warm = one_client(c, model_id, image_uri(999_999), argparse.Namespace(
                        tokens=4, num_crops=args.num_crops), None)
                if warm["error"]:
                    raise RuntimeError(f"warm-up request failed: {warm['error']}\n{server.log_tail()}")
                print(f"[{variant}] warm-up {warm['total_s']:.1f} s, prompt {warm['prompt_tokens']} tokens", flush=True)
                for repeat in range(args.repeats):
                    for n in counts:
                        q = quietness(server.proc.pid)
                        # Before the first run the load average is all others'; later it still
                        # holds our previous run, so the direct measure decides.
                        loud = q["load1"] > QUIET_LOAD if first else q["others_busy_cores"] > QUIET_LOAD
                        first = False
                        print(f"[{variant}] {n} client(s), repeat {repeat + 1}: load1 {q['load1']:.2f}, "
                              f"others busy {q['others_busy_cores']:.2f} cores"
                              + ("  WARNING: the machine is not quiet, figures are unreliable" if loud else ""),
                              flush=True)
                        # Same seeds for both variants (same images), new ones per run (no cache hits).
                        run = run_clients(server, model_id, n, seed=repeat * 100 + n, args=args)
                        run.update(variant=variant, repeat=repeat, quiet=q, loud=loud)
                        runs.append(run)
                        errors = [c["error"] for c in run["per_client"] if c["error"]]
                        print(f"[{variant}]   {run['tok_s']:.2f} tok/s, {run['completion_tokens']} tokens in "
                              f"{run['wall_s']:.1f} s" + (f", {len(errors)} error(s): {errors[0]}" if errors else ""),
                              flush=True)
            finally:
                server.stop()

        summary = {(v, n): summarize([r for r in runs if r["variant"] == v and r["clients"] == n])
                   for v in variants for n in counts}
        table, derived = report(summary, counts, args.tokens)
        print(f"\n{args.tokens} tokens per client, num_crops {args.num_crops}, bfloat16"
              + (f" + {args.quantize}" if args.quantize else "") + f", {args.repeats} repeat(s), "
              f"{info['cpu']}, {info['torch_threads']} torch threads"
              + ("  (WARNING: some runs on a busy machine)" if any(r["loud"] for r in runs) else "") + "\n")
        print(table)
        if args.out:
            doc = {"command": " ".join(sys.argv), "machine": info, "model": str(model_dir),
                   "settings": {k: v for k, v in vars(args).items() if k not in ("model", "make_full", "out")},
                   "summary": [{"variant": v, "clients": n, **s} for (v, n), s in summary.items()],
                   **derived, "table": table, "runs": runs}
            args.out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
            print(f"\nwrote {args.out}")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
