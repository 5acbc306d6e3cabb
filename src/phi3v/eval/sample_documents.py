"""Sample receipts and forms with known text, drawn with Pillow's built-in font (no font files:
ImageFont.load_default(size) is the scalable font bundled with Pillow >= 10.1, so the same seed
renders the same pixels wherever the Pillow version is the same).

Each function returns (records, truth); truth["lines"] lists every text line drawn, with its
position and font size, so a test can re-render each line on a blank canvas and find exactly those
pixels in the image (the text is really there, where the truth says).
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw, ImageFont

SHOPS = ("Corner Market", "Blue Harbour Cafe", "Oak Street Books", "Sunrise Bakery", "Metro Hardware")
ITEMS = ("Coffee", "Bagel", "Milk 1L", "Apples", "Notebook", "Pencils", "Bread", "Cheese", "Tea", "Soap",
         "Batteries", "Orange juice")
FIRST = ("Anna", "Omar", "Li", "Maria", "John", "Priya", "Lucas", "Sofia")
LAST = ("Novak", "Haddad", "Chen", "Garcia", "Smith", "Patel", "Martin", "Rossi")
CITIES = ("Lisbon", "Austin", "Lyon", "Osaka", "Leeds", "Porto", "Graz")


def font(size: int):
    return ImageFont.load_default(size=size)


def draw_lines(image: Image.Image, lines: list[dict]) -> None:
    """Draw each {"text", "x", "y", "size"} in black; shared with the tests' re-render check."""
    draw = ImageDraw.Draw(image)
    for line in lines:
        draw.text((line["x"], line["y"]), line["text"], fill=(0, 0, 0), font=font(line["size"]))


def receipt(rng: random.Random, path, rel: str, n: int) -> tuple[list[dict], dict]:
    shop = rng.choice(SHOPS)
    date = f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    items = [(name, rng.randint(80, 1500) / 100) for name in rng.sample(ITEMS, rng.randint(3, 5))]
    total = round(sum(p for _, p in items), 2)
    texts = [shop, f"Date: {date}"] + [f"{name}  {price:.2f}" for name, price in items] + [f"TOTAL  {total:.2f}"]
    lines, y = [], 24
    for i, text in enumerate(texts):
        size = 26 if i == 0 else 20
        if i == len(texts) - 1:
            y += 10  # a gap above the total
        lines.append({"text": text, "x": 28, "y": y, "size": size})
        y += size + 14
    image = Image.new("RGB", (420, y + 24), (252, 252, 248))
    ImageDraw.Draw(image).line([(20, lines[-1]["y"] - 8), (400, lines[-1]["y"] - 8)], fill=(120, 120, 120))
    draw_lines(image, lines)
    image.save(path, format="PNG")
    records = [
        {"id": f"receipt-{n}-total", "images": [rel], "question": "What is the total amount on the receipt?",
         "answers": [f"{total:.2f}"], "metric": "relaxed"},
        {"id": f"receipt-{n}-shop", "images": [rel], "question": "What is the name of the shop?",
         "answers": [shop], "metric": "anls"},
        {"id": f"receipt-{n}-text", "images": [rel],
         "question": "Transcribe all the text on the receipt, one line per line.",
         "answers": ["\n".join(texts)], "metric": "cer"},
    ]
    return records, {"kind": "receipt", "image": rel, "lines": lines, "total": f"{total:.2f}", "shop": shop}


def form(rng: random.Random, path, rel: str, n: int) -> tuple[list[dict], dict]:
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    member = f"M-{rng.randint(10000, 99999)}"
    city = rng.choice(CITIES)
    born = f"{rng.randint(1, 28):02d}/{rng.randint(1, 12):02d}/{rng.randint(1950, 2005)}"
    fields = [("Full name", name), ("Membership no.", member), ("City", city), ("Date of birth", born)]
    lines = [{"text": "MEMBERSHIP APPLICATION", "x": 30, "y": 22, "size": 26}]
    image = Image.new("RGB", (560, 90 + 56 * len(fields)), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for i, (label, value) in enumerate(fields):
        y = 80 + 56 * i
        draw.rectangle([(200, y - 8), (530, y + 32)], outline=(90, 90, 90))  # the field's box
        lines.append({"text": f"{label}:", "x": 30, "y": y, "size": 20})
        lines.append({"text": value, "x": 212, "y": y, "size": 20})
    draw_lines(image, lines)
    image.save(path, format="PNG")
    records = [
        {"id": f"form-{n}-member", "images": [rel], "question": "What is the membership number on the form?",
         "answers": [member], "metric": "anls"},
        {"id": f"form-{n}-text", "images": [rel],
         "question": "Transcribe the values filled in the form, one per line.",
         "answers": ["\n".join(v for _, v in fields)], "metric": "wer"},
    ]
    return records, {"kind": "form", "image": rel, "lines": lines, "fields": dict(fields)}
