"""The report as a terminal table (what `phi3v eval` prints), from summary.summarise()'s dict.

    variant  answered  relaxed acc  ANLS   score  agree  tokens  TTFT s  tok/s  s/rec  features
    bf16        12/12        0.750  0.812  0.771  ref      5.2   0.412   14.1  0.79   computed
    int4        12/12        0.667  0.790  0.701  83%      5.4   0.188   31.0  0.37   reused 100%
    2 of 12 records get different answers: chart-3, receipt-1
"""

from __future__ import annotations


def _num(value, fmt: str = "{:.3f}") -> str:
    return "-" if value is None else fmt.format(value)


def table_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    metrics = report["metrics"]
    head = ["variant", "answered"] + [report["metric_labels"][m] for m in metrics] + [
        "score", "agree", "tokens", "TTFT s", "tok/s", "s/rec", "features"]
    rows = []
    for v in report["variants"]:
        agree = "ref" if v["name"] == report["reference"] else _num(v["agreement"], "{:.0%}")
        reused = v["features_reused"]
        features = "-" if reused is None else ("computed" if reused == 0 else f"reused {reused:.0%}")
        rows.append([v["name"], f"{v['answered']}/{report['records']}"]
                    + [_num(v["accuracy"].get(m)) for m in metrics]
                    + [_num(v["score"]), agree, _num(v["mean_tokens"], "{:.1f}"), _num(v["ttft_s"]),
                       _num(v["tokens_per_s"], "{:.1f}"), _num(v["seconds_per_record"], "{:.2f}"), features])
    return head, rows


def settings_lines(report: dict) -> list[str]:
    """"name: num_crops N, prompt '...'" for variants whose name abbreviates a setting (/cN, /pK)."""
    out = []
    for v in report["variants"]:
        st = v["settings"]
        parts = ([f"num_crops {st['num_crops']}"] if st.get("num_crops") else []) + (
            [f"prompt {st['prompt']!r}"] if st.get("prompt") else [])
        if parts and "/" in v["name"]:
            out.append(f"{v['name']}: {', '.join(parts)}")
    return out


def render_table(report: dict) -> str:
    head, rows = table_rows(report)
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    lines = []
    for row in [head] + rows:
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    for line in settings_lines(report):
        lines.append(line)
    lower = report.get("lower_is_better") or []
    if lower:
        lines.append(f"({', '.join(report['metric_labels'][m] for m in lower)}: error rates, lower is better)")
    ids = report["disagreements"]
    if len(report["variants"]) > 1:
        if ids:
            shown = ", ".join(ids[:8]) + (f", ... ({len(ids) - 8} more)" if len(ids) > 8 else "")
            lines.append(f"{len(ids)} of {report['records']} records get different answers: {shown}")
        else:
            lines.append(f"all variants give the same answers on the {report['records']} records")
    return "\n".join(lines)
