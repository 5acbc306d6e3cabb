"""The golden model cases: the reference implementation's outputs on tiny random checkpoints.

One test item per case (the case id is in its name). Cases come from tests/golden, or from the
folder named by PHI3V_GOLDEN_DIR, so a new set in the same format runs unchanged. Tolerances are
those of the golden README:
  image_embeds   max abs diff < 1e-4
  logits         max abs diff < 1e-4 * max(|logits|)
  prompt_argmax  identical where the reference top-1/top-2 margin > 1e-3
  greedy tokens  identical
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import phi3v
from phi3v.engine.generate import GenerationState, generate_ids
from golden_cases import golden_dir, load_cases, load_index

CASES = load_cases("model_cases")
_models: dict[str, phi3v.Phi3V] = {}


def model_for(name: str) -> "phi3v.Phi3V":
    if name not in _models:
        location = load_index()["models"][name]["location"]
        _models[name] = phi3v.load(str(golden_dir() / location), device="cpu", dtype="float32", progress=False)
    return _models[name]


def logit_tol(reference: np.ndarray) -> float:
    return 1e-4 * float(np.abs(reference).max())


@pytest.mark.parametrize("case", CASES, ids=[c["case_id"] for c in CASES])
def test_golden_model_case(case):
    root = golden_dir() / case["path"]
    meta = json.loads((root / "meta.json").read_text(encoding="utf-8"))
    ref = np.load(root / "arrays.npz")
    model = model_for(meta["model"])
    images = [str(golden_dir() / p) for p in meta["images"]]

    # -- preprocessing and token ids --------------------------------------------------------------
    prepared = model.prepare(raw_prompt=meta["prompt"], images=images, num_crops=meta["num_crops"])
    assert prepared.input_ids == ref["input_ids"][0].tolist(), "input_ids differ from the reference processor"
    if "messages" in meta and meta["messages"]:
        from phi3v.engine.chat_template import render_messages

        assert render_messages(meta["messages"]).prompt_text == meta["prompt"]
    pixel_values = image_sizes = None
    if images:
        pixel_values, image_sizes = prepared.images.pixel_values, prepared.images.image_sizes
        assert image_sizes.tolist() == ref["image_sizes"].tolist()
        assert prepared.images.num_img_tokens == meta["num_img_tokens"]
        stats = meta["pixel_values_stats"]
        pv = pixel_values.double()
        assert list(pixel_values.shape) == meta["pixel_values_shape"]
        assert abs(pv.sum().item() - stats["sum"]) <= 1e-5 * abs(stats["sum"]) + 1e-3
        assert abs(pv.pow(2).sum().item() - stats["sum_sq"]) <= 1e-5 * stats["sum_sq"]
        assert abs(pv.abs().max().item() - stats["max_abs"]) < 1e-5

        # -- image embeddings -------------------------------------------------------------------
        embeds = model.image_embeddings(pixel_values, image_sizes)
        for i, got in enumerate(embeds):
            want = torch.from_numpy(ref[f"image_embeds_{i}"])
            assert got.shape == want.shape
            diff = (got - want).abs().max().item()
            assert diff < 1e-4, f"image {i} embeddings differ by {diff}"

    # -- prompt logits (uncached full forward) --------------------------------------------------
    logits = model.logits(prepared.input_ids, pixel_values, image_sizes)  # (L, V)
    last8 = ref["last8_logits"]
    diff = (logits[-8:] - torch.from_numpy(last8)).abs().max().item()
    assert diff < logit_tol(last8), f"last-8 logits differ by {diff} (tolerance {logit_tol(last8)})"
    confident = ref["prompt_top2_margin"] > 1e-3
    argmax = logits.argmax(-1).numpy()
    mismatched = np.nonzero((argmax != ref["prompt_argmax"]) & confident)[0]
    assert mismatched.size == 0, f"prompt argmax differs at positions {mismatched[:10].tolist()}"
    del logits

    # -- greedy generation with the KV cache, as the reference's generate() ---------------------
    step_logits: dict[int, torch.Tensor] = {}
    state = GenerationState(torch.tensor(prepared.input_ids), [], model.module.new_cache())
    if images:
        state.image_embeds = model._encode_images(pixel_values, image_sizes)
    gen = meta["generate"]
    options = phi3v.GenerationOptions(max_new_tokens=gen["max_new_tokens"])
    tokens = list(generate_ids(model.module, state, options, frozenset({gen["eos_token_id"]}),
                               model.config.rope_switch, logits_hook=lambda k, lg: step_logits.__setitem__(k, lg)))
    assert tokens == meta["gen_ids"]
    assert model.tokenizer.decode(tokens) == meta["gen_text"]
    top5_ids, top5_logits = ref["gen_step_top5_ids"], ref["gen_step_top5_logits"]
    for k in range(len(tokens)):
        got = step_logits[k][torch.from_numpy(top5_ids[k])].numpy()
        d = np.abs(got - top5_logits[k]).max()
        assert d < logit_tol(top5_logits[k]), f"step {k} top-5 logits differ by {d}"
    for name in ref.files:  # full logits kept at the 4096 crossing
        if name.startswith("gen_step") and name.endswith("_logits") and name[8:-7].isdigit():
            k = int(name[8:-7])
            d = (step_logits[k] - torch.from_numpy(ref[name])).abs().max().item()
            assert d < logit_tol(ref[name]), f"cached step {k} logits differ by {d}"
        if name.startswith("uncached_step") and name.endswith("_logits") and name[13:-7].isdigit():
            k = int(name[13:-7])
            ids = prepared.input_ids + meta["gen_ids"][:k]
            got = model.logits(ids, pixel_values, image_sizes, last=1)[0]
            d = (got - torch.from_numpy(ref[name])).abs().max().item()
            assert d < logit_tol(ref[name]), f"uncached step {k} logits differ by {d}"
