"""The CLIP tower alone on full-size random bf16 weights: median seconds for 1 / 5 / 17 crops, the
plain nn.Linear path against the oneDNN-packed one (engine/clip_packed.py) in the same run.

    python scripts/bench_vision.py                      # both paths, 1/5/17 crops, 3 repeats
    python scripts/bench_vision.py --crops 1,5 --repeats 5 --paths packed
    python scripts/bench_vision.py --compile            # adds torch.compile (inductor) of the plain tower
    python scripts/bench_vision.py --profile 1          # torch.profiler table by op for 1 crop, per path

Weights: phi3v.testing.full_size_config("phi35v") built in memory (23 of 24 CLIP layers, ~0.6 GB bf16),
normal(0, 0.02); no checkpoint. Crops go through in one call, as the benchmark's vision_Ncrops_s does.
The load average is printed before and after: on a shared machine compare paths within one run.
For a CPU without AMX on one that has it: ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from phi3v.engine import clip_packed
from phi3v.engine.config import Phi3VConfig
from phi3v.engine.vision import ClipVisionModel
from phi3v.testing import full_size_config


def build_tower() -> ClipVisionModel:
    cfg = Phi3VConfig.from_dicts(full_size_config("phi35v"))
    with torch.device("meta"):
        tower = ClipVisionModel(cfg.vision)
    tower = tower.to_empty(device="cpu").to(torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tower.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return tower


def set_path(tower: ClipVisionModel, path: str):
    """path: plain | packed | packed-unfused (quick_gelu a pass of its own) | compile -> the callable to time."""
    tower.unpack()
    clip_packed.FUSE_QUICK_GELU = path != "packed-unfused"
    if path in ("packed", "packed-unfused"):
        if not tower.pack():
            raise SystemExit("this torch has no oneDNN packed linear (torch.ops.mkldnn._linear_pointwise)")
        return tower
    if path == "compile":
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # weights as constants: inductor pre-packs them for oneDNN
        return torch.compile(tower)
    return tower


def openvino_vision(ir_dir: str, threads: int):
    """The IR's CLIP tower compiled for the CPU as the bench's openvino variants run it -> a callable
    on (N, 3, 336, 336) pixels (fed as float32, the IR's input type)."""
    import openvino as ov

    compiled = ov.Core().compile_model(os.path.join(ir_dir, "vision.xml"), "CPU",
                                       {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()
    print(f"openvino {ov.__version__}: {ir_dir}, inference precision {compiled.get_property('INFERENCE_PRECISION_HINT')}")
    return lambda pixels: request.infer({0: pixels.float().numpy()})


def time_it(fn, pixels: torch.Tensor, repeats: int, warm_up: bool = True) -> list[float]:
    times = []
    with torch.inference_mode():
        if warm_up:
            fn(pixels)  # oneDNN kernel generation, compile
        for _ in range(repeats):
            start = time.perf_counter()
            fn(pixels)
            times.append(time.perf_counter() - start)
    return times


def profile(fn, pixels: torch.Tensor, label: str) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch.inference_mode():
        fn(pixels)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            fn(pixels)
    print(f"--- {label}: {pixels.shape[0]} crop(s), by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--crops", default="1,5,17", help="comma-separated crop counts (default 1,5,17)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--paths", default="plain,packed", help="plain, packed, packed-unfused, compile (comma-separated)")
    ap.add_argument("--compile", action="store_true", help="add torch.compile (inductor, freezing) of the plain path")
    ap.add_argument("--profile", type=int, default=0, metavar="CROPS", help="print a profile table instead")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--openvino", metavar="IR_DIR", help="also time OpenVINO's vision.xml from this `phi3v bench` IR "
                                                       "folder (path `openvino`, the CPU plugin at bf16)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = [p for p in args.paths.split(",") if p] + (["compile"] if args.compile else [])
    ov_vision = None
    if args.openvino:
        ov_vision = openvino_vision(args.openvino, args.threads or torch.get_num_threads())
        paths.append("openvino")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '-')}, load average {os.getloadavg()}")
    tower = build_tower()
    gen = torch.Generator().manual_seed(1)
    if args.profile:
        pixels = torch.randn(args.profile, 3, 336, 336, generator=gen).to(torch.bfloat16)
        for path in paths:
            profile(set_path(tower, path), pixels, path)
        print(f"load average {os.getloadavg()}")
        return
    rows = []
    for n in (int(c) for c in args.crops.split(",")):
        pixels = torch.randn(n, 3, 336, 336, generator=gen).to(torch.bfloat16)
        times: dict[str, list[float]] = {path: [] for path in paths}
        turns = [p for p in paths if p != "compile"]
        for r in range(args.repeats):  # plain and packed take turns, so a load change hits both alike
            for path in turns:
                fn = ov_vision if path == "openvino" else set_path(tower, path)
                times[path] += time_it(fn, pixels, 1, warm_up=r == 0)
        if "compile" in paths:  # after the others: its graph is traced from the plain path
            times["compile"] = time_it(set_path(tower, "compile"), pixels, args.repeats)
        medians = {path: statistics.median(t) for path, t in times.items()}
        for path, t in times.items():
            print(f"{n:>3} crops  {path:<8} median {medians[path]:.3f} s  (min {min(t):.3f}, max {max(t):.3f})",
                  flush=True)
        rows.append((n, medians))
    print(f"load average {os.getloadavg()}")
    if "plain" in paths:
        for n, medians in rows:
            gains = ", ".join(f"{p} {medians['plain'] / s:.2f}x" for p, s in medians.items() if p != "plain")
            print(f"{n:>3} crops: speed-up over plain: {gains}")


if __name__ == "__main__":
    main()
