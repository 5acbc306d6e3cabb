"""Soak test of `phi3v serve`: minutes of mixed load on 127.0.0.1, then a verdict (not a pytest test).

    python scripts/soak_server.py --minutes 20            # tiny random checkpoint, made in a temp folder
    python scripts/soak_server.py --minutes 3 --model DIR --concurrency 6 -- --max-queue 8

Starts the server as a child process (`python -m phi3v serve --model DIR --host 127.0.0.1`, extra
serve flags after `--`) and keeps `--concurrency` clients busy with a mix of requests: text and
image requests, streamed and not, clients that hang up mid-stream, and bad inputs (bad base64, an
image of too many pixels, too many pixels in one request, invalid parameters). Traffic goes to
127.0.0.1 only. Every minute it prints the requests of that minute, their statuses, p50/p95
latency and the server's RSS; at the end a verdict:

  - RSS flat: over the last half of the run, the per-minute medians of the RSS (sampled every
    5 s; a median, because requests in flight at the moment of a sample add tens of MB of noise)
    differ by at most 5%: (max - min) / min <= 0.05;
  - no 5xx answers and no transport errors (a request the server dropped);
  - the engine alive: /health says ok and the server process is still running.

Exit status 0 when all hold, 1 otherwise. The server's log is kept in the run folder (--keep).
"""

from __future__ import annotations

import argparse
import base64
import collections
import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import numpy as np
from PIL import Image

HOST = "127.0.0.1"  # the only address this script talks to
RSS_SAMPLE_S = 5.0
FLAT_WITHIN = 0.05


# ---- request bodies ----------------------------------------------------------------------------


def _png(image: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **save)
    return buf.getvalue()


def _uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


class Bodies:
    """Request bodies of each kind; images made once (a pool of 24 small ones: some repeat, which
    exercises the image caches, some are new to them)."""

    def __init__(self, model_id: str, rng: random.Random):
        self.model_id, self.rng = model_id, rng
        nrng = np.random.default_rng(rng.randrange(2**32))
        self.small = [_png(Image.fromarray(nrng.integers(0, 256, (nrng.integers(16, 200), nrng.integers(16, 200), 3),
                                                          dtype=np.uint8))) for _ in range(24)]
        self.bomb_png = _png(Image.new("1", (13000, 13000)), optimize=True)  # 169 Mpx in ~20 KB
        self.big_png = _png(Image.new("P", (6000, 6000)), optimize=True)  # 36 Mpx: one is fine, eight are not
        photo = Image.fromarray(nrng.integers(0, 256, (45, 60, 3), dtype=np.uint8)).resize((4000, 3000))
        buf = io.BytesIO()
        photo.save(buf, format="JPEG", quality=80)
        self.jpeg_data = buf.getvalue()  # 12 Mpx: decoded at reduced scale

    def _chat(self, content, *, stream=False, max_tokens=None, **extra) -> dict:
        body = {"model": self.model_id, "messages": [{"role": "user", "content": content}],
                "max_tokens": max_tokens or self.rng.randint(1, 24), "stream": stream,
                "temperature": self.rng.choice([0, 0.7, 1.0]), **extra}
        return body

    def _image_content(self, images, text="What is in this picture?"):
        return [*({"type": "image_url", "image_url": {"url": _uri(d, m)}} for d, m in images),
                {"type": "text", "text": text}]

    def text(self, stream=False):
        words = " ".join(self.rng.choice(["cat", "sky", "blue", "why", "tell", "more", "story"])
                         for _ in range(self.rng.randint(1, 60)))
        return self._chat(f"Question: {words}?", stream=stream)

    def image(self, stream=False):
        n = self.rng.choice([1, 1, 1, 2, 3])
        return self._chat(self._image_content([(self.rng.choice(self.small), "image/png") for _ in range(n)]),
                          stream=stream)

    def jpeg(self):
        return self._chat(self._image_content([(self.jpeg_data, "image/jpeg")]))

    def bad_base64(self):
        content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@not-base64@@"}},
                   {"type": "text", "text": "x"}]
        return self._chat(content)

    def bomb(self):
        return self._chat(self._image_content([(self.bomb_png, "image/png")]))

    def many_big(self):
        return self._chat(self._image_content([(self.big_png, "image/png")] * 8))

    def bad_params(self):
        return self.rng.choice([
            self._chat("hi", temperature=-1), self._chat("hi", top_p=7), self._chat("hi", n=3),
            {"model": self.model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"},
            {"model": self.model_id, "messages": []},
            {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
        ])


# Kind -> weight. Bad inputs expect 4xx; the rest 200 (or 429 when the queue is full).
MIX = {"text": 6, "text_stream": 4, "image": 4, "image_stream": 2, "hangup": 3, "jpeg": 1,
       "bad_base64": 1, "bomb": 1, "many_big": 0.5, "bad_params": 1.5}


# ---- one request -------------------------------------------------------------------------------


def run_one(client: httpx.Client, url: str, kind: str, bodies: Bodies, rng: random.Random) -> tuple:
    """-> (status or 'error:<type>', seconds)."""
    if kind in ("text", "text_stream"):
        body = bodies.text(stream=kind.endswith("stream"))
    elif kind in ("image", "image_stream"):
        body = bodies.image(stream=kind.endswith("stream"))
    elif kind == "hangup":
        body = rng.choice([bodies.text, bodies.image])(stream=True)
        body["max_tokens"] = 64
    else:
        body = getattr(bodies, kind)()
    start = time.perf_counter()
    try:
        if body.get("stream"):
            with client.stream("POST", url, json=body) as response:
                status = response.status_code
                events = 0
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        events += 1
                        if kind == "hangup" and events >= rng.randint(1, 3):
                            break  # leave the with-block: the connection is closed mid-stream
                        if line.startswith("data: {") and '"error"' in line[:40]:
                            status = "stream_error"
        else:
            status = client.post(url, json=body).status_code
    except httpx.HTTPError as err:
        status = f"error:{type(err).__name__}"
    return status, time.perf_counter() - start


# ---- the server ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def start_server(model_dir: str, port: int, log_path: str, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "phi3v", "serve", "--model", model_dir, "--host", HOST, "--port", str(port),
           "--log-level", "warning", *extra]
    print("server:", " ".join(cmd), flush=True)
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(f"http://{HOST}:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start within 300 s")


# ---- the run -----------------------------------------------------------------------------------


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.window: list[tuple] = []  # (kind, status, seconds) since the last report
        self.total = collections.Counter()  # status -> count
        self.requests = 0
        self.bad: list[tuple] = []  # (kind, status) of 5xx and transport errors

    def add(self, kind, status, seconds):
        with self.lock:
            self.window.append((kind, status, seconds))
            self.total[status] += 1
            self.requests += 1
            if (isinstance(status, int) and status >= 500) or not isinstance(status, int):
                self.bad.append((kind, status))

    def take_window(self) -> list:
        with self.lock:
            window, self.window = self.window, []
        return window


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0, help="how long to load the server (default 20)")
    parser.add_argument("--concurrency", type=int, default=6, help="clients at once (default 6)")
    parser.add_argument("--model", default=None, help="checkpoint folder (default: a tiny random one, made now)")
    parser.add_argument("--report-s", type=float, default=60.0, help="seconds between reports (default 60)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the run folder (server log, tiny checkpoint)")
    parser.add_argument("serve_args", nargs="*", help="extra `phi3v serve` flags, after --")
    args = parser.parse_args(argv)

    workdir = tempfile.mkdtemp(prefix="phi3v-soak-")
    model_dir = args.model
    if model_dir is None:
        from phi3v.testing import make_tiny_checkpoint

        model_dir = str(make_tiny_checkpoint(os.path.join(workdir, "tiny")))
    port = free_port()
    proc = start_server(model_dir, port, os.path.join(workdir, "server.log"), args.serve_args)
    base = f"http://{HOST}:{port}"
    model_id = httpx.get(base + "/health", timeout=5).json()["model"]
    url = base + "/v1/chat/completions"

    stats = Stats()
    rss_samples: list[tuple[float, float]] = []  # (seconds since start, MB)
    start = time.monotonic()
    end = start + args.minutes * 60
    stop = threading.Event()

    def client_loop(index: int):
        rng = random.Random(args.seed * 1000 + index)
        bodies = Bodies(model_id, rng)
        kinds, weights = zip(*MIX.items())
        with httpx.Client(timeout=120) as client:
            while not stop.is_set() and time.monotonic() < end:
                kind = rng.choices(kinds, weights)[0]
                try:
                    status, seconds = run_one(client, url, kind, bodies, rng)
                except Exception as err:  # a bug here must show in the verdict, not end a client
                    status, seconds = f"client_bug:{type(err).__name__}: {err}", 0.0
                stats.add(kind, status, seconds)

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(args.concurrency)]
    for t in threads:
        t.start()
    print(f"soak: {args.minutes:g} min, {args.concurrency} clients, server pid {proc.pid}, RSS at start "
          f"{rss_mb(proc.pid):.0f} MB", flush=True)
    next_report = start + args.report_s
    try:
        while time.monotonic() < end and proc.poll() is None:
            time.sleep(min(RSS_SAMPLE_S, max(0.1, end - time.monotonic())))
            now = time.monotonic()
            rss = rss_mb(proc.pid)
            if rss is not None:
                rss_samples.append((now - start, rss))
            if now >= next_report or now >= end:
                next_report += args.report_s
                window = stats.take_window()
                recent = [mb for t, mb in rss_samples if t > now - start - args.report_s]
                ok = [s for _, st, s in window if st == 200]
                statuses = collections.Counter(st for _, st, _ in window)
                print(f"[{(now - start) / 60:5.1f} min] {len(window):5d} requests  statuses "
                      f"{dict(sorted(statuses.items(), key=str))}  200s p50 {percentile(ok, 50):.3f} s "
                      f"p95 {percentile(ok, 95):.3f} s  RSS median {percentile(recent, 50):.0f} MB "
                      f"(max {max(recent, default=float('nan')):.0f})", flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    finally:
        stop.set()
        for t in threads:
            t.join(130)

    alive = proc.poll() is None
    health = None
    if alive:
        try:
            health = httpx.get(base + "/health", timeout=10).json()
        except httpx.HTTPError:
            health = None
    verdict = report(stats, rss_samples, alive, health)
    if alive:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    log_path = os.path.join(workdir, "server.log")
    with open(log_path, errors="replace") as f:
        log_tail = f.read()[-2000:]
    if "Traceback" in log_tail or "site-packages" in log_tail:
        print("server log (tail):\n" + log_tail)
    if args.keep:
        print(f"run folder kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if verdict else 1


def minute_medians(rss_samples) -> list[float]:
    """The median RSS of each whole minute in the last half of the run, counted back from its end
    (a partial minute of a few samples would be one request's noise, not a trend), oldest first."""
    if not rss_samples:
        return []
    last = rss_samples[-1][0]
    minutes: dict[int, list[float]] = collections.defaultdict(list)
    for t, mb in rss_samples:
        if t >= last / 2:
            minutes[int((last - t) // 60)].append(mb)
    full = 60 / RSS_SAMPLE_S / 2  # at least half a minute's samples
    return [float(np.median(v)) for _, v in sorted(minutes.items(), reverse=True) if len(v) >= full]


def report(stats: Stats, rss_samples, alive: bool, health) -> bool:
    half = minute_medians(rss_samples)
    spread = (max(half) - min(half)) / min(half) if half else float("nan")
    five = sum(n for st, n in stats.total.items() if isinstance(st, int) and st >= 500)
    other = sum(n for st, n in stats.total.items() if not isinstance(st, int))
    engine_ok = alive and bool(health) and health.get("status") == "ok"
    checks = {
        f"RSS flat over the last half within {FLAT_WITHIN:.0%} (per-minute medians "
        f"{', '.join(f'{mb:.0f}' for mb in half)} MB; spread {spread:.1%})": bool(half) and spread <= FLAT_WITHIN,
        f"no 5xx ({five})": five == 0,
        f"no transport errors or error events ({other})": other == 0,
        "engine alive (/health ok, process running)": engine_ok,
    }
    print(f"\n{stats.requests} requests; statuses {json.dumps({str(k): v for k, v in stats.total.items()})}")
    if rss_samples:
        print(f"RSS: start {rss_samples[0][1]:.0f} MB, end {rss_samples[-1][1]:.0f} MB, "
              f"peak {max(mb for _, mb in rss_samples):.0f} MB")
    if stats.bad:
        print("failures (first 10):", collections.Counter(stats.bad).most_common(10))
    for text, passed in checks.items():
        print(f"  {'PASS' if passed else 'FAIL'}  {text}")
    verdict = all(checks.values())
    print("verdict:", "PASS" if verdict else "FAIL")
    return verdict


if __name__ == "__main__":
    sys.exit(main())
