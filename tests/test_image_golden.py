"""Every processor case of the golden set through phi3v.engine.image, at the golden README tolerances.

Cases come from tests/golden, or from $PHI3V_GOLDEN_DIR (another set in the same format).
Tolerances (tests/golden/README.md): hd.png exact (uint8); image_sizes, crop grid and token counts
exact; pixel_values_stats / crop_stats sum and sum_sq relative 1e-5 (plus an absolute 1e-3 floor on
sums of ~340k O(1) values, for crops whose sum nearly cancels), max_abs absolute 1e-5; global crop
(stride-4 or full) max abs diff 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from golden_cases import golden_dir, load_cases
from phi3v.engine.image import crop_grid, hd_transform, num_image_tokens, open_image, preprocess

PROCESSOR_CASES = load_cases("processor_cases")
STAT_REL, SUM_ABS_FLOOR, MAX_ABS_TOL, CROP_ABS_TOL = 1e-5, 1e-3, 1e-5, 1e-5


def _read_json(path):
    import json

    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _stats(t: torch.Tensor) -> tuple[float, float, float]:
    """(sum, sum of squares, max |x|) accumulated in float64, as the golden generator did."""
    d = t.double()
    return d.sum().item(), (d * d).sum().item(), d.abs().max().item() if d.numel() else 0.0


def _check_stats(got, expected, what):
    g_sum, g_sq, g_max = got
    assert g_sum == pytest.approx(expected[0], rel=STAT_REL, abs=SUM_ABS_FLOOR), f"{what}: sum"
    assert g_sq == pytest.approx(expected[1], rel=STAT_REL, abs=SUM_ABS_FLOOR), f"{what}: sum_sq"
    assert abs(g_max - expected[2]) < MAX_ABS_TOL, f"{what}: max_abs {g_max} vs {expected[2]}"


@pytest.mark.parametrize("case", PROCESSOR_CASES, ids=[c["case_id"] for c in PROCESSOR_CASES])
def test_processor_case(case):
    root = golden_dir()
    case_dir = root / case["path"]
    meta = _read_json(case_dir / "meta.json")
    arrays = np.load(case_dir / "arrays.npz")
    num_crops = meta["num_crops"]
    image_path = root / meta["image"] if "/" in meta["image"] else root / "images" / meta["image"]

    image = open_image(image_path)
    assert (image.mode, image.width, image.height) == (
        meta["input_image"]["mode"], meta["input_image"]["width"], meta["input_image"]["height"],
    )
    decoded_ref = image_path.with_name(image_path.stem + ".decoded_rgb.png")
    if decoded_ref.exists():  # JPEG: tell a decoder difference apart from a processing one
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(Image.open(decoded_ref).convert("RGB"))), (
            "JPEG decoder output differs from the golden decoded pixels"
        )

    # HD transform: exact uint8 pixels.
    hd = hd_transform(image, num_crops)
    expected_hd = np.asarray(Image.open(case_dir / meta["hd_image"]["file"]).convert("RGB"))
    assert hd.mode == "RGB"
    assert np.asarray(hd).shape == expected_hd.shape
    assert np.array_equal(np.asarray(hd), expected_hd), "hd.png pixels differ"

    # Arithmetic helpers agree with the golden grid and token count, without touching pixels.
    rows, cols = meta["crop_grid_rows_cols"]
    assert crop_grid(image.width, image.height, num_crops) == (rows, cols)
    assert num_image_tokens(image.width, image.height, num_crops) == meta["num_img_tokens"]

    batch = preprocess([image], num_crops)
    pv = batch.pixel_values
    assert pv.dtype == torch.float32
    assert list(pv.shape) == meta["pixel_values_shape"]
    assert batch.image_sizes.dtype == torch.long
    assert batch.image_sizes.tolist() == [meta["image_sizes"]]
    assert batch.num_img_tokens == [meta["num_img_tokens"]]

    _check_stats(_stats(pv), [meta["pixel_values_stats"][k] for k in ("sum", "sum_sq", "max_abs")], "pixel_values")
    _check_stats(_stats(pv[0, 0]), [meta["global_crop_stats"][k] for k in ("sum", "sum_sq", "max_abs")], "global crop")
    crop_stats = arrays["crop_stats"]
    assert crop_stats.shape == (num_crops + 1, 3)
    for i in range(num_crops + 1):
        _check_stats(_stats(pv[0, i]), crop_stats[i], f"crop {i}")
    assert torch.count_nonzero(pv[0, 1 + rows * cols :]) == 0, "padding crops must be exactly zero"

    stride4 = pv[0, 0, :, ::4, ::4].numpy()
    assert np.abs(stride4 - arrays["global_crop_stride4"]).max() < CROP_ABS_TOL
    if "global_crop" in arrays.files:
        assert np.abs(pv[0, 0].numpy() - arrays["global_crop"]).max() < CROP_ABS_TOL
