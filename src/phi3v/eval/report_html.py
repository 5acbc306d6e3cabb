"""The report as one self-contained HTML page: no script, no network, images embedded.

    the table of report_text (accuracy per metric, agreement, tokens, TTFT, tokens/s, s/record)
    a chart of score against seconds per record, one point per variant (inline SVG)
    the disagreeing records: thumbnails (downscaled to THUMB_PX, JPEG data: URIs) and each
    variant's answer side by side with its score; then every record, folded (<details>)

Images are re-opened from the record's sources (local files and data: URIs; never the network);
one that cannot be opened shows its path instead.
"""

from __future__ import annotations

import base64
import html
import io

from .report_text import settings_lines, table_rows

THUMB_PX = 240
MAX_DISAGREEMENTS = 100
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1240px;
  color:#1d1d1f;padding:0 16px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px} .meta{color:#555;margin:0 0 12px}
table{border-collapse:collapse;margin:8px 0} th,td{padding:4px 8px;border-bottom:1px solid #e3e3e3;text-align:right}
th{background:#f5f5f7;font-weight:600;white-space:nowrap} .wide td{white-space:nowrap}
.all{table-layout:fixed;width:100%} .all td{text-align:left;vertical-align:top;overflow-wrap:anywhere;white-space:pre-wrap}
.qa td{overflow-wrap:anywhere}
td:first-child,th:first-child{text-align:left}
.record{border:1px solid #ddd;border-radius:8px;padding:12px;margin:12px 0;display:flex;gap:16px}
.thumbs img{display:block;max-width:240px;max-height:240px;border:1px solid #ccc;margin-bottom:6px}
.qa{flex:1} .qa table{width:100%;table-layout:fixed} .qa td,.qa th{text-align:left;vertical-align:top;white-space:normal}
.qa th:first-child{width:110px} .qa th:last-child{width:60px} .qa td:last-child,.qa th:last-child{text-align:right}
.ok{background:#e8f6ec} .bad{background:#fdecec} .err{color:#a00} .muted{color:#777}
svg text{font:12px system-ui,sans-serif} .wide{overflow-x:auto}
"""


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def thumbnail_uri(source: str, size: int = THUMB_PX) -> str | None:
    """A local path or data: URI -> a small JPEG data: URI (None when it cannot be opened)."""
    if "://" in source[:16]:
        return None  # never fetch while writing a report
    try:
        from ..engine.image import open_image

        image = open_image(source).convert("RGB")
        image.thumbnail((size, size))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=80)
    except Exception:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _table(report: dict) -> str:
    head, rows = table_rows(report)
    out = ['<div class="wide"><table><tr>' + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>")
    out.append("</table></div>")
    return "\n".join(out)


def _nice_max(value: float) -> float:
    """An axis end at or above `value`: 1, 2 or 5 times a power of ten."""
    if value <= 0:
        return 1.0
    import math

    power = 10 ** math.floor(math.log10(value))
    for m in (1, 2, 5, 10):
        if value <= m * power:
            return m * power
    return 10 * power


def chart_svg(report: dict, width: int = 780, height: int = 320) -> str:
    """Score (y, 0..1) against seconds per record (x), one point per variant, named in a legend on
    the right (labels beside the points would overlap where variants are close)."""
    points = [(v["name"], v["seconds_per_record"], v["score"]) for v in report["variants"]
              if v["seconds_per_record"] is not None and v["score"] is not None]
    left, right, top, bottom = 56, 230, 16, 44
    pw, ph = width - left - right, height - top - bottom
    x_max = _nice_max(max((p[1] for p in points), default=1.0) * 1.1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="score against seconds per record">',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#ccc"/>']
    for i in range(6):  # y grid: 0, 0.2 ... 1
        y = top + ph - ph * i / 5
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{i / 5:.1f}</text>')
    for i in range(6):  # x ticks
        x = left + pw * i / 5
        parts.append(f'<text x="{x:.1f}" y="{top + ph + 16}" text-anchor="middle">{x_max * i / 5:.3g}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle">seconds per record</text>')
    parts.append(f'<text transform="translate(14 {top + ph / 2}) rotate(-90)" text-anchor="middle">score</text>')
    for k, (name, secs, sc) in enumerate(points):
        x, y = left + pw * secs / x_max, top + ph - ph * sc
        colour = PALETTE[k % len(PALETTE)]
        parts.append(f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="6" fill="{colour}" fill-opacity="0.85"><title>'
                     f'{_e(name)}: score {sc:.3f}, {secs:.3f} s/record</title></circle>')
        ly = top + 12 + 20 * k  # the legend entry
        parts.append(f'<circle cx="{left + pw + 20}" cy="{ly - 4}" r="5" fill="{colour}"/>')
        parts.append(f'<text x="{left + pw + 32}" y="{ly}">{_e(name)}: score {sc:.3f}, {secs:.3f} s/record</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _record_block(row: dict, variants: list[str], thumbs: dict) -> str:
    images = []
    for shown, source in zip(row["images"], row["sources"]):
        uri = thumbs.get(source)
        images.append(f'<img src="{uri}" alt="{_e(shown)}">' if uri else f'<div class="muted">{_e(shown)}</div>')
    lines = [f'<div class="record" id="r-{_e(row["id"])}"><div class="thumbs">{"".join(images)}</div><div class="qa">',
             f'<div><b>{_e(row["id"])}</b> <span class="muted">({_e(row["metric"])})</span></div>',
             f'<div>{_e(row["question"])}</div>']
    if row["choices"]:
        letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        lines.append('<div class="muted">' + " &nbsp; ".join(f"{letters[i]}. {_e(c)}" for i, c in
                                                          enumerate(row["choices"])) + "</div>")
    lines.append(f'<div>accepted: {" | ".join(_e(a) for a in row["answers"])}</div>')
    lines.append("<table><tr><th>variant</th><th>answer</th><th>score</th></tr>")
    for name in variants:
        p = row["predictions"][name]
        if p["error"] is not None:
            lines.append(f'<tr><td>{_e(name)}</td><td class="err">{_e(p["error"])}</td><td>-</td></tr>')
            continue
        cls = "ok" if p["score"] >= 0.5 else "bad"
        lines.append(f'<tr class="{cls}"><td>{_e(name)}</td><td>{_e(p["text"])}</td>'
                     f'<td>{p["score"]:.2f}</td></tr>')
    lines.append("</table></div></div>")
    return "\n".join(lines)


def render_html(report: dict) -> str:
    variants = [v["name"] for v in report["variants"]]
    rows = {row["id"]: row for row in report["rows"]}
    shown = report["disagreements"][:MAX_DISAGREEMENTS]
    thumbs: dict[str, str | None] = {}
    for rid in shown:
        for source in rows[rid]["sources"]:
            if source not in thumbs:
                thumbs[source] = thumbnail_uri(source)
    opts = ", ".join(f"{k}={v}" for k, v in sorted((report.get("options") or {}).items()) if v not in (None, (), []))
    body = [f"<h1>phi3v eval</h1><p class=\"meta\">{_e(report['records'])} records from {_e(report['data'])} · "
            f"model {_e(report['model'])} · reference variant {_e(report['reference'])}"
            + (f"<br>{_e(opts)}" if opts else "") + "</p>",
            "<h2>Variants</h2>", _table(report)]
    settings = settings_lines(report)
    if settings:
        body.append('<ul class="muted">' + "".join(f"<li>{_e(line)}</li>" for line in settings) + "</ul>")
    if report.get("lower_is_better"):
        body.append(f'<p class="muted">{_e(", ".join(report["metric_labels"][m] for m in report["lower_is_better"]))}'
                    ": error rates, lower is better. score: mean per-record score in [0, 1]. agree: same answer as "
                    "the reference variant.</p>")
    body += ["<h2>Score against time per record</h2>", chart_svg(report)]
    n = len(report["disagreements"])
    body.append(f"<h2>Records where the variants disagree ({n} of {report['records']})</h2>")
    if len(variants) < 2:
        body.append('<p class="muted">one variant: nothing to compare.</p>')
    elif not n:
        body.append('<p class="muted">every variant gave the same answer on every record.</p>')
    body += [_record_block(rows[rid], variants, thumbs) for rid in shown]
    if n > len(shown):
        body.append(f'<p class="muted">{n - len(shown)} more in the JSON report.</p>')
    body.append("<h2>All records</h2><details><summary>answers of every variant</summary><table class=\"all\"><tr><th>id</th>"
                "<th>accepted</th>" + "".join(f"<th>{_e(v)}</th>" for v in variants) + "</tr>")
    for row in report["rows"]:
        cells = []
        for v in variants:
            p = row["predictions"][v]
            cells.append(f'<td class="err">{_e(p["error"])}</td>' if p["error"] else
                         f'<td class="{"ok" if p["score"] >= 0.5 else "bad"}">{_e(p["text"])}</td>')
        body.append(f'<tr><td>{_e(row["id"])}</td><td>{_e(" | ".join(row["answers"]))}</td>{"".join(cells)}</tr>')
    body.append("</table></details>")
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>phi3v eval: {_e(report['data'])}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")
