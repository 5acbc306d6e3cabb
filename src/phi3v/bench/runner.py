"""Prepare the checkpoints, run each variant in its own process (one at a time), report.

Variants: phi3v-bf16, phi3v-int8, phi3v-int4 (quantized checkpoints written once next to the
data, reused afterwards), phi3v-fp32 (on request: needs ~16 GiB), transformers-bf16 (the baseline),
openvino-bf16/int8/int4 (IR converted once into DATA_DIR/openvino-ir/, keyed by checkpoint and
scheme; skipped with a note when the `openvino` extra is not installed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .report import build_report, markdown_table
from .variants import DEFAULT_VARIANTS, VARIANTS, VISION_VARIANTS
RANDOM_NAME = "phi3v-full-random"


def default_data_dir() -> Path:
    return Path(os.environ.get("PHI3V_BENCH_DIR") or Path.home() / ".cache" / "phi3v" / "bench")


def ensure_checkpoint(model: str | None, data_dir: Path, log) -> Path:
    """The given checkpoint (folder or hub id), or a random full-size one made once in data_dir."""
    if model:
        from ..engine.hub import resolve_model_dir

        return resolve_model_dir(model)
    folder = data_dir / RANDOM_NAME
    if (folder / "config.json").is_file():
        return folder
    from ..testing import make_tiny_checkpoint

    log(f"writing a random full-size checkpoint to {folder} (~8.3 GB, once)")
    partial = data_dir / (RANDOM_NAME + ".partial")
    make_tiny_checkpoint(partial, sizes="full", shards=2)
    partial.rename(folder)
    return folder


def ensure_quantized(source: Path, scheme: str, data_dir: Path, log) -> tuple[Path, float | None]:
    """A quantized copy of `source` in data_dir (written once); returns (folder, seconds it took or None)."""
    from ..quant.checkpoint import quantize_checkpoint

    folder = data_dir / f"{source.name}-{scheme}"
    if (folder / "config.json").is_file():
        return folder, None
    log(f"writing the {scheme} checkpoint {folder} (once)")
    start = time.perf_counter()
    partial = data_dir / f"{source.name}-{scheme}.partial"
    if partial.exists():
        import shutil

        shutil.rmtree(partial)
    quantize_checkpoint(source, partial, scheme)
    partial.rename(folder)
    return folder, time.perf_counter() - start


def _openvino_ir(source: Path, scheme: str, data_dir: Path, log) -> tuple[Path | None, float | None, str]:
    """(IR folder, conversion seconds or None when cached, '' or why the variant is skipped)."""
    from .openvino_convert import ensure_ir, missing_extra

    why = missing_extra()
    if why:
        return None, None, why
    try:
        folder, took = ensure_ir(source, scheme, data_dir, log)
    except RuntimeError as err:
        return None, None, str(err)
    return folder, took, ""


def read_bandwidth_gbs(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """Memory read bandwidth over a buffer far larger than the caches (median of `repeats`): the
    faster of a float32 torch.sum and, where phi3v.kernels.native is built, its one-row bf16 product (which
    streams closer to the hardware's limit than torch.sum on AVX-512 CPUs).  The buffers hold random
    values: pages of identical contents can be merged by the host (KSM), and reading them then
    measures a cache, not memory (one run here reported 53 GB/s that way, against ~30 measured
    with random data)."""
    from ..kernels import native

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(int(gib * 2**30) // 4, generator=gen)
    best = x.numel() * 4 / _median_time(x.sum, repeats) / 1e9
    del x
    if native.available():
        w = torch.randn(int(gib * 2**30) // (2 * 4096), 4096, generator=gen).to(torch.bfloat16)
        v = torch.ones(1, 4096, dtype=torch.bfloat16)
        best = max(best, w.numel() * 2 / _median_time(lambda: native.gemv_bf16(w, v), repeats) / 1e9)
    return best


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def weight_facts(model_dir: Path, group_size: int = 128) -> tuple[dict, dict[str, int]]:
    """(the parameter counts decode speed depends on, the weight bytes one decode step reads per
    variant: bf16 and the int8 / int4 decoder linears), both from phi3v.engine.facts."""
    from ..engine.config import Phi3VConfig
    from ..engine.facts import model_facts

    f = model_facts(Phi3VConfig.from_dir(model_dir))
    counts = {"decoder_linear_params": f.decoder_linear_params, "decoder_linear_rows": f.decoder_linear_rows,
              "lm_head_params": f.lm_head_params, "norm_params": f.norm_params, "group_size": group_size}
    decode_bytes = {"bf16": f.decode_weight_bytes("bfloat16"), "int8": f.decode_weight_bytes("bfloat16", "int8"),
                    "int4": f.decode_weight_bytes("bfloat16", f"int4:{group_size}")}
    return counts, decode_bytes


def checkpoint_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def run_benchmark(model: str | None = None, *, data_dir: Path | None = None, variants=DEFAULT_VARIANTS,
                  quick: bool = False, repeats: int | None = None, heavy_repeats: int | None = None,
                  decode_tokens: int | None = None, threads: int | None = None, vision_all: bool = False,
                  out_json: Path | None = None, log=print) -> dict:
    data_dir = Path(data_dir or default_data_dir())
    data_dir.mkdir(parents=True, exist_ok=True)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        from ..errors import Phi3VError

        raise Phi3VError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    threads = threads or torch.get_num_threads()
    source = ensure_checkpoint(model, data_dir, log)
    folders, quantize_s = {}, {}
    irs, convert_s, skipped = {}, {}, {}
    for v in variants:
        engine, dtype, scheme = VARIANTS[v]
        folders[v] = source
        if engine == "openvino":
            irs[v], took, skipped[v] = _openvino_ir(source, scheme, data_dir, log)
            if took is not None:
                convert_s[scheme] = took
        elif scheme:
            folders[v], took = ensure_quantized(source, scheme, data_dir, log)
            if took is not None:
                quantize_s[scheme] = took
    for v, why in list(skipped.items()):
        if why:
            log(f"{v} skipped: {why}")
        else:
            del skipped[v]
    variants = [v for v in variants if v not in skipped]

    counts, decode_bytes = weight_facts(source)
    env = {
        "checkpoint": str(source), "torch": torch.__version__, "threads": threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "quick": quick,
        "bf16_weight_gib": checkpoint_bytes(source) / 2**30,
        "checkpoint_gib": {v: (sum(f.stat().st_size for f in irs[v].glob("*.bin")) if v in irs
                               else checkpoint_bytes(folders[v])) / 2**30 for v in variants},
        "quantize_checkpoint_s": quantize_s, "openvino_convert_s": convert_s, "skipped": skipped,
        "openvino_ir": {v: str(p) for v, p in irs.items() if p is not None}, "weights": counts,
        "decode_bytes_per_token": decode_bytes,
        "read_bandwidth_gbs": read_bandwidth_gbs(threads),
        "command": " ".join(sys.argv),
    }
    log(f"memory read bandwidth ~{env['read_bandwidth_gbs']:.1f} GB/s with {threads} threads")

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            engine, dtype, _ = VARIANTS[v]
            out = Path(tmp) / f"{v}.json"
            cmd = [sys.executable, "-m", "phi3v.bench.worker", "--engine", engine, "--model", str(folders[v]),
                   "--dtype", dtype, "--variant", v, "--threads", str(threads), "--out", str(out)]
            if engine == "openvino":
                cmd += ["--ir", str(irs[v])]
            if quick:
                cmd.append("--quick")
            for flag, value in (("--repeats", repeats), ("--heavy-repeats", heavy_repeats),
                                ("--decode-tokens", decode_tokens)):
                if value is not None:
                    cmd += [flag, str(value)]
            if not vision_all and v not in VISION_VARIANTS:
                cmd.append("--no-vision")
            log(f"running {v} ...")
            proc = subprocess.run(cmd, stderr=sys.stderr, stdout=sys.stderr)
            if proc.returncode != 0 or not out.is_file():
                log(f"{v} failed (exit {proc.returncode}); continuing")
                continue
            results[v] = json.loads(out.read_text(encoding="utf-8"))
            results[v]["model"] = str(folders[v])

    report = build_report(results, env)
    report["raw"] = results
    report["table"] = markdown_table(report)
    if out_json:
        Path(out_json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report
