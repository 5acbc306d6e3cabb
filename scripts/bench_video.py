"""Video prompts: time to first token and peak memory as the frame count grows (issue 14).

    python scripts/bench_video.py --model /work/bench-data/random-full --out video.json
    python scripts/bench_video.py --model DIR --frames 4,8 --variants phi3v-bf16 --out v.json

Each (variant, frame count) runs in a fresh process so that its peak RSS is its own:
  - phi3v-bf16 / phi3v-int4: `model.ask(prompt, video=clip, frames=N, max_new_tokens=1)` — the
    whole video path (decode and sample the frames, HD transform at num_crops 4, the vision tower
    in chunks, prefill, the first token), nothing cached.
  - transformers-bf16: the same N frames (decoded by phi3v) as N images through transformers'
    CLIPVisionModel + Phi3ForCausalLM (phi3v.bench.engines.TransformersEngine, the bench's
    baseline), max_new_tokens 1.
The clip is synthetic (640x360, 16:9, a moving pattern, 8 fps, `--seconds` long) and written once.

Per run: TTFT (one cold request), RSS after load, peak RSS, their difference (what the request
added), prompt tokens and the KV-cache bytes those tokens take. The goal: as frames grow, the
request's added peak grows by less than the KV cache plus one chunk of vision activations.
Figures only; run on a quiet machine (the load average is recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "Summarise what happens in this clip."
VARIANTS = {
    "phi3v-bf16": ("phi3v", None),
    "phi3v-int4": ("phi3v", "int4"),
    "transformers-bf16": ("transformers", None),
}


def make_clip(path: Path, seconds: float, fps: int = 8, size=(640, 360)) -> Path:
    import av
    import numpy as np

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(int(seconds * fps)):
            y, x = np.mgrid[0 : size[1], 0 : size[0]]
            rgb = np.stack([(x + 7 * i) % 256, (y + 3 * i) % 256, (x + y + 11 * i) % 256], -1).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def kv_bytes(model_dir: Path, tokens: int, itemsize: int = 2) -> int:
    cfg = json.loads((model_dir / "config.json").read_text())
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    return tokens * cfg["num_hidden_layers"] * 2 * kv_heads * head_dim * itemsize


def child(args) -> dict:
    import torch

    from phi3v.bench.memory import peak_rss_gib, rss_gib

    engine_name, quantize = VARIANTS[args.variant]
    model_dir, clip = Path(args.model), Path(args.clip)
    t0 = time.perf_counter()
    if engine_name == "phi3v":
        import phi3v

        model = phi3v.load(str(model_dir), device="cpu", dtype="bfloat16", quantize=quantize, progress=False)
        load_s, rss_load = time.perf_counter() - t0, rss_gib()
        start = time.perf_counter()
        reply = model.ask(PROMPT, video=str(clip), frames=args.frames, max_new_tokens=1)
        ttft = time.perf_counter() - start
        prompt_tokens = reply.usage.prompt_tokens
    else:
        from phi3v.bench.engines import TransformersEngine
        from phi3v.engine.frame_select import FrameSelection, select_frames
        from phi3v.engine.video import open_video

        engine = TransformersEngine(model_dir, "bfloat16")
        engine.load()
        load_s, rss_load = time.perf_counter() - t0, rss_gib()
        start = time.perf_counter()  # from the file, as phi3v's ask(video=) is timed
        with open_video(str(clip)) as reader:  # the frames phi3v's video path chooses, as images
            chosen = select_frames(reader.info.times, reader.info.duration, FrameSelection(frames=args.frames))
            frames = list(reader.frames(chosen))
        content = [{"type": "image", "image": im} for im in frames]
        messages = [{"role": "user", "content": content + [{"type": "text", "text": PROMPT}]}]
        with torch.inference_mode():
            embeds = engine._embeds(messages, 4)
            engine._generate(embeds, 1)
            ttft = time.perf_counter() - start
        prompt_tokens = int(embeds.shape[1])
    peak = peak_rss_gib()
    return {"variant": args.variant, "frames": args.frames, "ttft_s": round(ttft, 2), "load_s": round(load_s, 1),
            "rss_after_load_gib": round(rss_load, 3), "peak_rss_gib": round(peak, 3),
            "request_added_gib": round(peak - rss_load, 3), "prompt_tokens": prompt_tokens,
            "kv_cache_gib": round(kv_bytes(model_dir, prompt_tokens) / 2**30, 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--frames", default="4,8,16,32")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seconds", type=float, default=32.0)
    p.add_argument("--out", required=True)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--clip", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.frames = int(args.frames)
        print(json.dumps(child(args)))
        return 0

    out = Path(args.out)
    results = json.loads(out.read_text())["runs"] if out.exists() else []
    with tempfile.TemporaryDirectory() as tmp:
        clip = make_clip(Path(tmp) / "clip.mp4", args.seconds)
        for variant in args.variants.split(","):
            for n in [int(f) for f in args.frames.split(",")]:
                if any(r["variant"] == variant and r["frames"] == n for r in results):
                    continue  # measured by an earlier run of the same --out
                load = os.getloadavg()[0]
                cmd = [sys.executable, __file__, "--child", "--model", args.model, "--variant", variant,
                       "--clip", str(clip), "--frames", str(n), "--out", "-"]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                    row = {"variant": variant, "frames": n, "error": " | ".join(tail), "rc": proc.returncode}
                else:
                    row = json.loads(proc.stdout.strip().splitlines()[-1])
                row["load_average_before"] = round(load, 2)
                results.append(row)
                print(json.dumps(row), flush=True)
                out.write_text(json.dumps({"model": args.model, "runs": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
