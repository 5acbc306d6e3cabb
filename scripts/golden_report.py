"""Print the largest differences between phi3v and the golden reference vectors, per case.

    python scripts/golden_report.py [GOLDEN_DIR]      (default: tests/golden or $PHI3V_GOLDEN_DIR)

Float32 on CPU. Figures: processor cases (global crop / per-crop stats), model cases (image
embeddings, last-8 logits relative to max |logit|, prompt argmax agreement, greedy tokens).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

import phi3v
from phi3v.engine.image import open_image, preprocess


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("PHI3V_GOLDEN_DIR", "tests/golden"))
    index = json.loads((root / "cases.json").read_text())
    worst_pixel = 0.0
    for case in index["processor_cases"]:
        meta = json.loads((root / case["path"] / "meta.json").read_text())
        ref = np.load(root / case["path"] / "arrays.npz")
        batch = preprocess([open_image(str(root / meta["image"]))], meta["num_crops"])
        glob = batch.pixel_values[0, 0].numpy()
        want = ref["global_crop"] if "global_crop" in ref.files else ref["global_crop_stride4"]
        got = glob if "global_crop" in ref.files else glob[:, ::4, ::4]
        worst_pixel = max(worst_pixel, float(np.abs(got - want).max()))
    print(f"processor: {len(index['processor_cases'])} cases, max |global crop diff| = {worst_pixel:.3g}")

    models: dict[str, phi3v.Phi3V] = {}
    print(f"{'case':24} {'embeds':>10} {'logits/max':>11} {'argmax':>8} {'greedy':>7}")
    for case in index["model_cases"]:
        meta = json.loads((root / case["path"] / "meta.json").read_text())
        ref = np.load(root / case["path"] / "arrays.npz")
        name = meta["model"]
        if name not in models:
            models[name] = phi3v.load(str(root / index["models"][name]["location"]), device="cpu",
                                      dtype="float32", progress=False, prefix_cache=False)
        model = models[name]
        images = [str(root / p) for p in meta["images"]]
        p = model.prepare(raw_prompt=meta["prompt"], images=images, num_crops=meta["num_crops"])
        pv, sizes = (p.images.pixel_values, p.images.image_sizes) if images else (None, None)
        emb = 0.0
        if images:
            for i, e in enumerate(model.image_embeddings(pv, sizes)):
                emb = max(emb, float((e - torch.from_numpy(ref[f"image_embeds_{i}"])).abs().max()))
        logits = model.logits(p.input_ids, pv, sizes)
        last8 = ref["last8_logits"]
        rel = float((logits[-8:] - torch.from_numpy(last8)).abs().max()) / float(np.abs(last8).max())
        agree = float((logits.argmax(-1).numpy() == ref["prompt_argmax"]).mean())
        gen = model.generate(p, phi3v.GenerationOptions(max_new_tokens=len(meta["gen_ids"])))
        same = gen.token_ids[: len(meta["gen_ids"])] == meta["gen_ids"]
        print(f"{case['case_id']:24} {emb:10.2e} {rel:11.2e} {agree:8.4f} {'same' if same else 'DIFF':>7}")


if __name__ == "__main__":
    main()
