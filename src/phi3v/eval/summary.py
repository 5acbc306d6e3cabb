"""Answers in the store -> the report's numbers: per variant accuracy, agreement, tokens and speed,
and each record's answers side by side (the JSON report is this dict; report_text / report_html
render it).

Per variant, over the records it answered without an error:
    accuracy       {metric: mean of the metric's own value}   (cer / wer: mean error rate, lower better)
    score          mean score in [0, 1] over all its records (an error or a missing answer scores 0)
    agreement      fraction of records where its answer equals the reference variant's (the first),
                   compared as metrics.agreement_key says (choice: the extracted letter; vqa: the
                   normalised answer; else case and whitespace ignored); over records both answered
    mean_tokens    generated tokens per answer
    ttft_s         time to the first token (request start -> first token, as the engine measures it)
    tokens_per_s   decode speed (mean over answers of more than one token)
    seconds_per_record  preprocess + vision + prefill + decode
    vision_s       CLIP time per record (near 0 where image features were reused: features_reused)
A record *disagrees* when the answered variants do not all share one agreement key.
"""

from __future__ import annotations

from statistics import fmean

from .metrics import LABELS, LOWER_IS_BETTER, agreement_key, score
from .records import EvalRecord
from .variants import Variant


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return fmean(values) if values else None


def summarise(records: list[EvalRecord], variants: list[Variant], answers: dict[tuple[str, str], dict], *,
              data: str = "", model: str = "", options: dict | None = None) -> dict:
    reference = variants[0].name
    rows = []
    for r in records:
        predictions = {}
        for v in variants:
            line = answers.get((v.name, r.id))
            if line is None:
                predictions[v.name] = {"text": None, "error": "not run", "score": 0.0, "value": None}
                continue
            if line.get("error") is not None:
                predictions[v.name] = {"text": None, "error": line["error"], "score": 0.0, "value": None}
                continue
            s = score(r.metric, r.answers, line.get("text") or "", r.choices)
            usage, timings = line.get("usage") or {}, line.get("timings") or {}
            predictions[v.name] = {
                "text": line.get("text"), "error": None, "score": s.score, "value": s.value,
                "key": agreement_key(r.metric, line.get("text") or "", r.choices),
                "tokens": usage.get("completion_tokens"), "ttft_s": timings.get("first_token_s"),
                "tokens_per_s": timings.get("decode_tokens_per_s") if (usage.get("completion_tokens") or 0) > 1
                else None,
                "seconds": sum(timings.get(k) or 0.0 for k in ("preprocess_s", "vision_s", "prefill_s", "decode_s")),
                "vision_s": timings.get("vision_s"), "image_features": line.get("image_features"),
                "finish_reason": line.get("finish_reason")}
        keys = {p["key"] for p in predictions.values() if p.get("key") is not None}
        rows.append({"id": r.id, "question": r.question, "answers": list(r.answers), "metric": r.metric,
                     "choices": list(r.choices), "images": list(r.images), "sources": list(r.sources),
                     "predictions": predictions, "agree": len(keys) <= 1})
    summaries = [_variant_summary(v, rows, reference) for v in variants]
    return {
        "data": data, "model": model, "options": options or {}, "records": len(records),
        "reference": reference,
        "metrics": sorted({r.metric for r in records}),
        "metric_labels": {m: LABELS[m] for m in {r.metric for r in records}},
        "lower_is_better": sorted(LOWER_IS_BETTER & {r.metric for r in records}),
        "variants": summaries,
        "disagreements": [row["id"] for row in rows if not row["agree"]],
        "rows": rows,
    }


def _variant_summary(variant: Variant, rows: list[dict], reference: str) -> dict:
    mine = [(row, row["predictions"][variant.name]) for row in rows]
    ok = [(row, p) for row, p in mine if p["error"] is None]
    accuracy = {}
    for metric in sorted({row["metric"] for row in rows}):
        accuracy[metric] = _mean(p["value"] for row, p in ok if row["metric"] == metric)
    both = [(p, row["predictions"][reference]) for row, p in ok if row["predictions"][reference]["error"] is None]
    agreement = _mean(float(p["key"] == ref["key"]) for p, ref in both) if variant.name != reference else (
        1.0 if ok else None)
    return {
        "name": variant.name, "settings": variant.settings(),
        "answered": len(ok), "errors": sum(p["error"] not in (None, "not run") for _, p in mine),
        "missing": sum(p["error"] == "not run" for _, p in mine),
        "accuracy": accuracy,
        "score": _mean(p["score"] for _, p in mine) if mine else None,
        "agreement": agreement,
        "mean_tokens": _mean(p["tokens"] for _, p in ok),
        "ttft_s": _mean(p["ttft_s"] for _, p in ok),
        "tokens_per_s": _mean(p["tokens_per_s"] for _, p in ok),
        "seconds_per_record": _mean(p["seconds"] for _, p in ok),
        "vision_s": _mean(p["vision_s"] for _, p in ok),
        "features_reused": _mean(float(p["image_features"] == "reused") for _, p in ok
                                 if p["image_features"] is not None),
    }
