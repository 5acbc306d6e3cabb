"""`phi3v eval --make-sample`: deterministic, and its ground truth read back from its own pixels."""

from __future__ import annotations

import hashlib
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

try:
    import matplotlib  # noqa: F401  (the eval extra: the sample set's charts)
except ImportError:  # in CI (CI=true) a missing extra fails instead of skipping
    if os.environ.get("CI", "").lower() in ("1", "true"):
        raise
    pytest.skip("the sample set needs matplotlib: pip install 'phi3v[eval]'", allow_module_level=True)

from phi3v.eval.readers import read_data  # noqa: E402
from phi3v.eval.sample import make_sample  # noqa: E402
from phi3v.eval.sample_documents import draw_lines  # noqa: E402
from phi3v.eval.sample_shapes import FILLS  # noqa: E402


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sample")
    make_sample(folder, seed=3)
    truth = json.loads((folder / "truth.json").read_text())
    return folder, {t["image"]: t for t in truth["images"]}


def _pixels(folder, rel) -> np.ndarray:
    return np.asarray(Image.open(folder / rel).convert("RGB")).astype(int)


def _mask(pixels: np.ndarray, hex_colour: str) -> np.ndarray:
    rgb = [int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)]
    return (np.abs(pixels - rgb).sum(axis=2) <= 6)


def _digests(folder) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_files_other_seed_other_files(sample, tmp_path):
    folder, _ = sample
    make_sample(tmp_path / "again", seed=3)
    make_sample(tmp_path / "other", seed=4)
    assert _digests(tmp_path / "again") == _digests(folder)
    assert (tmp_path / "other" / "records.jsonl").read_text() != (folder / "records.jsonl").read_text()


def test_records_are_valid_and_cover_every_metric(sample):
    folder, truth = sample
    records = read_data(folder / "records.jsonl")
    assert {r.metric for r in records} == {"relaxed", "anls", "vqa", "choice", "cer", "wer"}
    for r in records:
        assert r.images[0] in truth and (folder / r.images[0]).exists()


def test_bar_heights_are_proportional_to_the_values(sample):
    folder, truth = sample
    bar = next(t for t in truth.values() if t["kind"] == "bar")
    pixels = _pixels(folder, bar["image"])
    heights = []
    for colour in bar["colours"]:
        mask = _mask(pixels, colour)
        columns = mask.sum(axis=0)
        heights.append(columns.max())  # the tallest column of that colour = the bar's height in pixels
    scale = heights[0] / bar["values"][0]
    for h, v in zip(heights, bar["values"]):
        assert h / scale == pytest.approx(v, abs=1.0)  # the value read back, to a pixel's worth
    records = [json.loads(x) for x in (folder / "records.jsonl").read_text().splitlines()]
    top = next(r for r in records if r["id"] == "bar-1-max")
    assert top["answers"] == [bar["labels"][int(np.argmax(heights))]]  # the tallest bar is the answer


def test_pie_areas_are_proportional_to_the_shares(sample):
    folder, truth = sample
    pie = next(t for t in truth.values() if t["kind"] == "pie")
    pixels = _pixels(folder, pie["image"])
    areas = np.array([_mask(pixels, c).sum() for c in pie["colours"]], dtype=float)
    shares = 100 * areas / areas.sum()
    assert shares == pytest.approx(pie["values"], abs=1.0)


def test_line_markers_lie_on_the_value_axis(sample):
    folder, truth = sample
    line = next(t for t in truth.values() if t["kind"] == "line")
    mask = _mask(_pixels(folder, line["image"]), line["marker"])
    cols = np.where(mask.any(axis=0))[0]
    groups = np.split(cols, np.where(np.diff(cols) > 1)[0] + 1)  # one run of columns per marker
    assert len(groups) == len(line["values"])
    centres = [np.argwhere(mask[:, g]).mean(axis=0)[0] for g in groups]  # marker centre rows, left to right
    slope, offset = np.polyfit(line["values"], centres, 1)
    assert slope < 0  # higher values sit higher in the picture
    residual = np.abs(np.polyval([slope, offset], line["values"]) - centres).max()
    assert residual < 1.0  # every marker within a pixel of a straight value axis


def test_document_text_is_in_the_image_where_the_truth_says(sample):
    folder, truth = sample
    docs = [t for t in truth.values() if t["kind"] in ("receipt", "form")]
    assert len(docs) == 3
    for doc in docs:
        image = Image.open(folder / doc["image"]).convert("RGB")
        for line in doc["lines"]:
            canvas = Image.new("RGB", image.size, (255, 255, 255))
            draw_lines(canvas, [line])
            ink = np.asarray(canvas).sum(axis=2) < 200  # where this line alone puts dark pixels
            assert ink.sum() > 30  # the line draws something
            drawn = np.asarray(image).sum(axis=2)[ink]
            assert (drawn < 200).mean() > 0.99, line["text"]  # the image is dark exactly there
            other = dict(line, text=line["text"][::-1] + "X")  # a different text at the same place
            wrong = Image.new("RGB", image.size, (255, 255, 255))
            draw_lines(wrong, [other])
            wrong_ink = np.asarray(wrong).sum(axis=2) < 200
            assert (np.asarray(image).sum(axis=2)[wrong_ink & ~ink] < 200).mean() < 0.5
        texts = "\n".join(line["text"] for line in doc["lines"])
        if doc["kind"] == "receipt":
            assert doc["total"] in texts and doc["shop"] in texts
            prices = [float(t.split()[-1]) for t in texts.splitlines()[2:-1]]
            assert sum(prices) == pytest.approx(float(doc["total"]))
        else:
            for value in doc["fields"].values():
                assert value in texts


def _blobs(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask (list of (row, col) index arrays)."""
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        stack, members = [start], []
        seen[start] = True
        while stack:
            r, c = stack.pop()
            members.append((r, c))
            for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= rr < mask.shape[0] and 0 <= cc < mask.shape[1] and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    stack.append((rr, cc))
        out.append(np.array(members))
    return out


def test_shape_counts_read_back_from_the_pixels(sample):
    folder, truth = sample
    for doc in (t for t in truth.values() if t["kind"] == "shapes"):
        pixels = _pixels(folder, doc["image"])
        counted = {"circle": 0, "square": 0, "triangle": 0}
        for rgb in FILLS.values():
            mask = (np.abs(pixels - rgb).sum(axis=2) == 0)
            for blob in _blobs(mask):
                h = np.ptp(blob[:, 0]) + 1
                w = np.ptp(blob[:, 1]) + 1
                fill = len(blob) / (h * w)  # square 1, circle pi/4, triangle 1/2
                kind = min(((1.0, "square"), (math.pi / 4, "circle"), (0.5, "triangle")),
                           key=lambda k: abs(k[0] - fill))[1]
                counted[kind] += 1
        assert counted == doc["counts"]
