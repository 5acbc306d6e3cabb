"""Sample shape-counting images: circles, squares and triangles in flat colours on white, none
touching, so each shape is one connected blob of its colour; truth lists each shape's kind,
colour and bounding box (a test counts the blobs and tells the kinds apart by how much of their
box they fill: square 1, circle pi/4, triangle 1/2).
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle")
FILLS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (30, 160, 60)}
SIZE = (480, 360)


def _place(rng: random.Random, boxes: list, side: int) -> tuple[int, int, int, int] | None:
    for _ in range(200):
        x, y = rng.randint(8, SIZE[0] - side - 8), rng.randint(8, SIZE[1] - side - 8)
        box = (x, y, x + side, y + side)
        if all(box[2] + 10 < b[0] or b[2] + 10 < box[0] or box[3] + 10 < b[1] or b[3] + 10 < box[1] for b in boxes):
            return box
    return None


def shapes(rng: random.Random, path, rel: str, n: int) -> tuple[list[dict], dict]:
    while True:  # counts with one clear most common kind
        counts = {k: rng.randint(1, 5) for k in KINDS}
        if list(counts.values()).count(max(counts.values())) == 1:
            break
    image = Image.new("RGB", SIZE, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    placed, boxes = [], []
    for kind, count in counts.items():
        for _ in range(count):
            colour = rng.choice(sorted(FILLS))
            box = None
            while box is None:
                box = _place(rng, boxes, rng.randint(36, 56))
            boxes.append(box)
            x0, y0, x1, y1 = box
            if kind == "circle":
                draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=FILLS[colour])
            elif kind == "square":
                draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=FILLS[colour])
            else:
                draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1) // 2, y0)], fill=FILLS[colour])
            placed.append({"kind": kind, "colour": colour, "box": list(box)})
    image.save(path, format="PNG")
    ask = rng.choice(KINDS)
    most = max(counts, key=counts.get)
    records = [
        {"id": f"shapes-{n}-count", "images": [rel], "question": f"How many {ask}s are in the picture?",
         "answers": [str(counts[ask])], "metric": "vqa"},
        {"id": f"shapes-{n}-most", "images": [rel], "question": "Which shape appears most often?",
         "choices": list(KINDS), "answers": [most], "metric": "choice"},
    ]
    return records, {"kind": "shapes", "image": rel, "counts": counts, "shapes": placed}
