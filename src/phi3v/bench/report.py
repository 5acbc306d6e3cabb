"""Turn the workers' samples into medians (min-max), ratios vs transformers, goal checks, a table.

Ratios are "how many times better phi3v is": transformers / phi3v for seconds (`*_s`),
phi3v / transformers for rates (`*_tok_s`).  The baseline is the transformers bf16 variant.
Each OpenVINO variant is also compared with its phi3v peer (openvino-int4 with phi3v-int4, ...):
`ratios_vs_openvino["phi3v-int4 vs openvino-int4"]`, > 1 when phi3v is better; and what OpenVINO
ran (precisions, KV cache) is reported per variant under "runtime".
"""

from __future__ import annotations

import statistics

from .variants import OPENVINO_PEERS

BASELINE = "transformers-bf16"


def summary(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def ratio(metric: str, ours: float, base: float) -> float | None:
    if not ours or not base:
        return None
    return ours / base if metric.endswith("_tok_s") else base / ours


def build_report(results: dict[str, dict], env: dict) -> dict:
    """results: variant -> worker JSON.  Returns the full report (also what is written as JSON)."""
    report = {"env": env, "variants": {}, "ratios": {}, "goals": []}
    for variant, res in results.items():
        report["variants"][variant] = {
            "load_s": res["load_s"], "rss_after_load_gib": res["rss_after_load_gib"],
            "rss_weights_touched_gib": res.get("rss_weights_touched_gib", res["rss_after_load_gib"]),
            "peak_rss_gib": res["peak_rss_gib"], "peak_rss_e2e_gib": res.get("peak_rss_e2e_gib"),
            "metrics": {m: summary(v) for m, v in res["metrics"].items()},
        }
        if res.get("runtime"):
            report["variants"][variant]["runtime"] = res["runtime"]
    base = report["variants"].get(BASELINE)
    if base:
        for variant, data in report["variants"].items():
            if variant == BASELINE:
                continue
            report["ratios"][variant] = {
                m: ratio(m, s["median"], base["metrics"][m]["median"])
                for m, s in data["metrics"].items() if m in base["metrics"]}
    report["ratios_vs_openvino"] = _vs_openvino(report["variants"])
    report["goals"] = _goals(report, env)
    return report


def _vs_openvino(variants: dict) -> dict:
    """'phi3v-X vs openvino-X' -> metric -> how many times better phi3v is, for the pairs present."""
    out = {}
    for ov_name, ours in OPENVINO_PEERS.items():
        if ov_name in variants and ours in variants:
            theirs, mine = variants[ov_name]["metrics"], variants[ours]["metrics"]
            out[f"{ours} vs {ov_name}"] = {m: ratio(m, mine[m]["median"], theirs[m]["median"])
                                           for m in mine if m in theirs}
    return out


def runtime_line(variant: str, info: dict) -> str:
    """One line: what OpenVINO executed (compiled-model properties and node runtime precisions)."""
    dec = info.get("decoder", {})
    fused = info.get("kv_cache_nodes") or {}
    if fused:  # the plugin's attention holds the cache, in this precision
        kv = "KV cache in " + ", ".join(f"{p} ({n} attention nodes)" for p, n in sorted(fused.items()))
    else:  # not fused: the state is kept at the MemoryInput nodes' precision
        states = {k.split(":")[1] for k in info.get("decoder_nodes", {}) if k.startswith("MemoryInput:")}
        kv = f"KV cache not fused, state kept in {', '.join(sorted(states)) or '?'}"
    products = sorted({k for k in info.get("decoder_nodes", {}) if k.startswith("FullyConnected:")})
    return (f"{variant}: OpenVINO {info.get('openvino', '?').split('-')[0]}, decoder weights "
            f"{info.get('decoder_weights')}, vision weights {info.get('vision_weights')}; inference precision "
            f"{dec.get('INFERENCE_PRECISION_HINT', '?')}, KV_CACHE_PRECISION {dec.get('KV_CACHE_PRECISION', '?')}, "
            f"{kv}, dynamic quantization group "
            f"{dec.get('DYNAMIC_QUANTIZATION_GROUP_SIZE', '?')}; matrix products {', '.join(products) or '?'}")


def _goals(report: dict, env: dict) -> list[dict]:
    v, r = report["variants"], report["ratios"]
    goals = []

    def add(name: str, value, target: str, ok) -> None:
        goals.append({"goal": name, "value": value, "target": target, "met": ok})

    base = v.get(BASELINE, {}).get("metrics", {})
    short = "decode_short_tok_s"
    for variant, want in (("phi3v-bf16", 1.4), ("phi3v-int8", 2.5), ("phi3v-int4", 4.0)):
        x = r.get(variant, {}).get(short)
        if x is not None:
            add(f"{variant} decode vs transformers bf16", round(x, 2), f">= {want}x", x >= want)
    bw = env.get("read_bandwidth_gbs")
    if bw and "phi3v-int4" in v and short in v["phi3v-int4"]["metrics"]:
        bound = bw * 1e9 / env["decode_bytes_per_token"]["int4"]
        got = v["phi3v-int4"]["metrics"][short]["median"]
        add("phi3v-int4 decode vs its bandwidth bound", f"{got:.2f} of {bound:.2f} tok/s ({got / bound:.0%})",
            ">= 70%", got / bound >= 0.7)
        add("phi3v-int4 decode vs its bandwidth bound (issue 15)", f"{got / bound:.0%}", ">= 80%", got / bound >= 0.8)
    x = r.get("phi3v-bf16", {}).get("ttft_1img_nc16_s")
    if x is not None:
        add("phi3v-bf16 TTFT 1 image num_crops 16 vs transformers", round(x, 2), ">= 1.5x", x >= 1.5)
    vs = report.get("ratios_vs_openvino", {})
    for metric, x in sorted(vs.get("phi3v-bf16 vs openvino-bf16", {}).items()):
        if metric.startswith("vision_"):
            add(f"phi3v-bf16 {metric} vs openvino-bf16", round(x, 2), ">= 1.0x", x >= 1.0)
    x = r.get("phi3v-w8a8", {}).get("ttft_1img_nc16_s")
    if x is not None:
        add("phi3v-w8a8 TTFT 1 image num_crops 16 vs transformers bf16", round(x, 2), ">= 1.5x", x >= 1.5)
    if "phi3v-w8a8" in v and "openvino-int8" in v:
        mine, theirs = v["phi3v-w8a8"]["metrics"], v["openvino-int8"]["metrics"]
        m = "ttft_1img_nc16_s"
        if m in mine and m in theirs:
            x = ratio(m, mine[m]["median"], theirs[m]["median"])
            add("phi3v-w8a8 TTFT 1 image num_crops 16 vs openvino-int8", round(x, 2), ">= 1.3x", x >= 1.3)
    wb = env.get("bf16_weight_gib")
    if wb and "phi3v-bf16" in v:
        load_rss = v["phi3v-bf16"]["rss_weights_touched_gib"]
        add("phi3v-bf16 RSS loaded, every weight touched / bf16 weight bytes", round(load_rss / wb, 3), "<= 1.1",
            load_rss / wb <= 1.1)
        peak = v["phi3v-bf16"]["peak_rss_gib"]
        add("phi3v-bf16 peak RSS of the whole run / weight bytes", round(peak / wb, 3), "(info)", None)
    if "phi3v-int4" in v:
        peak = v["phi3v-int4"]["peak_rss_e2e_gib"]
        if peak is not None:
            add("phi3v-int4 peak RSS end to end (load + one image, num_crops 16)", f"{peak:.2f} GiB", "< 4 GiB",
                peak < 4.0)
        add("phi3v-int4 peak RSS of the whole benchmark run", f"{v['phi3v-int4']['peak_rss_gib']:.2f} GiB",
            "(info)", None)
    return goals


def _fmt(s: dict | None) -> str:
    if s is None:
        return "-"
    med = s["median"]
    digits = 3 if med < 10 else 1
    if s["n"] == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def markdown_table(report: dict) -> str:
    variants = list(report["variants"])
    metrics: list[str] = []
    for data in report["variants"].values():
        metrics += [m for m in data["metrics"] if m not in metrics]
    head = "| metric | " + " | ".join(variants) + " |"
    lines = [head, "|" + "---|" * (len(variants) + 1)]
    lines.append("| load s | " + " | ".join(f"{report['variants'][x]['load_s']:.1f}" for x in variants) + " |")
    lines.append("| RSS after load GiB | " + " | ".join(
        f"{report['variants'][x]['rss_after_load_gib']:.2f}" for x in variants) + " |")
    lines.append("| RSS weights touched GiB | " + " | ".join(
        f"{report['variants'][x]['rss_weights_touched_gib']:.2f}" for x in variants) + " |")
    lines.append("| peak RSS, load + 1 image nc16, GiB | " + " | ".join(
        "-" if report['variants'][x].get('peak_rss_e2e_gib') is None else
        f"{report['variants'][x]['peak_rss_e2e_gib']:.2f}" for x in variants) + " |")
    lines.append("| peak RSS GiB | " + " | ".join(f"{report['variants'][x]['peak_rss_gib']:.2f}" for x in variants) + " |")
    for m in metrics:
        cells = []
        for x in variants:
            s = report["variants"][x]["metrics"].get(m)
            cell = _fmt(s)
            rt = report["ratios"].get(x, {}).get(m)
            if rt is not None:
                cell += f" **{rt:.2f}x**"
            cells.append(cell)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    out = "\n".join(lines)
    pairs = report.get("ratios_vs_openvino", {})
    if pairs:
        names = list(pairs)
        out += "\n\n| metric (phi3v / OpenVINO, > 1 = phi3v better) | " + " | ".join(names) + " |\n"
        out += "|" + "---|" * (len(names) + 1)
        for m in metrics:
            cells = [f"{pairs[n][m]:.2f}x" if pairs[n].get(m) is not None else "-" for n in names]
            if any(c != "-" for c in cells):
                out += f"\n| {m} | " + " | ".join(cells) + " |"
    runtimes = [runtime_line(x, report["variants"][x]["runtime"]) for x in variants
                if report["variants"][x].get("runtime")]
    if runtimes:
        out += "\n\nWhat OpenVINO ran:\n" + "\n".join(f"- {line}" for line in runtimes)
    skipped = report.get("env", {}).get("skipped") or {}
    if skipped:
        out += "\n\n" + "\n".join(f"- {x} skipped: {why}" for x, why in skipped.items())
    if report["goals"]:
        out += "\n\n| goal | value | target | met |\n|---|---|---|---|\n"
        out += "\n".join(f"| {g['goal']} | {g['value']} | {g['target']} | "
                         f"{'-' if g['met'] is None else ('yes' if g['met'] else 'no')} |" for g in report["goals"])
    return out
