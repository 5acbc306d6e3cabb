"""`phi3v eval --make-sample DIR [--seed S]`: a small labelled set phi3v draws itself.

    DIR/images/*.png     bar, line and pie charts (matplotlib), receipts and a form (Pillow text),
                         shape-counting pictures
    DIR/records.jsonl    the eval records (native format: records.py), 17 of them, every metric family
    DIR/truth.json       what was drawn: values, colours, text lines and positions, shapes (for tests
                         and for anyone checking the ground truth)

Deterministic: one seed gives the same files (random.Random(seed) drives every choice; the PNGs
carry no timestamps). Needs matplotlib (pip install 'phi3v[eval]').
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from .sample_charts import bar_chart, line_chart, pie_chart
from .sample_documents import form, receipt
from .sample_shapes import shapes

# (name, generator, how many images)
PLAN = (("bar", bar_chart, 1), ("line", line_chart, 1), ("pie", pie_chart, 1), ("receipt", receipt, 2),
        ("form", form, 1), ("shapes", shapes, 2))


def make_sample(folder, seed: int = 0) -> Path:
    """Write the sample set into `folder` (created; existing sample files overwritten) -> records.jsonl."""
    root = Path(folder)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records, truth = [], []
    for name, generate, count in PLAN:
        for n in range(1, count + 1):
            rel = f"images/{name}-{n}.png"
            recs, facts = generate(rng, root / rel, rel, n)
            records += recs
            truth.append(facts)
    out = root / "records.jsonl"
    with open(out, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(root / "truth.json", "w", encoding="utf-8") as f:
        json.dump({"seed": seed, "images": truth}, f, indent=1)
    return out
