"""`phi3v eval`: accuracy on labelled images, settings compared (docs/eval.md).

One job per module:
    records.py        EvalRecord, the native JSONL format (images, video, question, answers, metric)
    readers.py        DATA -> records: native, ChartQA, DocVQA / InfographicVQA, TextVQA, ScienceQA,
                      MMBench, AI2D (read_data, detect_format)
    metrics/          one module per metric family; score(metric, answers, prediction, choices)
    prompts.py        the prompt of a record (its own, a variant's template, or the metric's default)
    variants.py       weights x num_crops x prompt -> Variants; which caches they may share
    runner.py         EvalRun: variants one after another over batch's resumable JSONL store
    video_input.py    video records -> the engine's video input;  ray_scale.py: --ray
    summary.py        store -> per-variant numbers, agreement, disagreeing records (the JSON report)
    report_text.py, report_html.py   the terminal table; the self-contained HTML page
    sample.py         --make-sample: sample_charts.py (matplotlib), sample_documents.py (Pillow text),
                      sample_shapes.py

Imports nothing at package level: the CLI's --help stays light.
"""
