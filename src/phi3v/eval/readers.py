"""DATA -> eval records: the native JSONL (records.py) and the published formats people have on disk.

read_data(path, fmt="auto") picks the reader from the path (docs/eval.md lists the layouts):

    fmt        path                                  layout read                              metric
    native     FILE.jsonl, or a folder of *.jsonl    records.py                               per record
    chartqa    test_human.json / test_augmented.json [{"imgname", "query", "label"}], images  relaxed
                                                     in png/ beside the file (else beside it)
    docvqa     val_v1.0.json, infographicVQA_*.json  {"data": [{"questionId", "question",      anls
                                                     "image" | "image_local_name", "answers"}]}
    textvqa    TextVQA_0.5.1_val.json                {"data": [{"question_id", "question",     vqa
                                                     "image_id", "answers" (10)}]}, images
                                                     train_images/ID.jpg | images/ID.jpg | ID.jpg
    scienceqa  problems.json                         {pid: {"question", "choices", "answer"    choice
                                                     (index), "hint", "image", "split"}};
                                                     images/SPLIT/PID/IMAGE; only records with
                                                     an image, test split when there is one
    mmbench    MMBench_DEV_EN.tsv                    columns index, question, hint, A, B, ...,  choice
                                                     answer, image (base64)
    ai2d       a folder with questions/ and images/  questions/NAME.json: {"imageName",        choice
                                                     "questions": {text: {"answerTexts",
                                                     "correctAnswer", "questionId"}}}

`--format` forces a reader; auto detection looks at the suffix and, for .json, at the content.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from ..errors import Phi3VError
from .records import EvalRecord, check_unique, jsonl_files, make_record, read_native, resolve_source

FORMATS = ("auto", "native", "chartqa", "docvqa", "textvqa", "scienceqa", "mmbench", "ai2d")


def read_data(path, fmt: str = "auto", metric: str | None = None) -> list[EvalRecord]:
    """Records of DATA in input order; `metric` overrides the reader's (native: the default)."""
    p = Path(path)
    if fmt not in FORMATS:
        raise Phi3VError(f"unknown data format {fmt!r}; known: {', '.join(FORMATS)}")
    if not p.exists():
        raise Phi3VError(f"eval data {str(path)!r} does not exist (give a .jsonl file, a folder or a "
                         "published data file: docs/eval.md)")
    if fmt == "auto":
        fmt = detect_format(p)
    reader = READERS[fmt]
    records = reader(p, metric) if fmt == "native" else _with_metric(reader(p), metric)
    if not records:
        raise Phi3VError(f"no records in {path}")
    check_unique(records)
    return records


def _with_metric(records: list[EvalRecord], metric: str | None) -> list[EvalRecord]:
    if metric is None:
        return records
    from dataclasses import replace

    return [replace(r, metric=metric) for r in records]


def detect_format(p: Path) -> str:
    if p.is_dir():
        if (p / "questions").is_dir() and (p / "images").is_dir():
            return "ai2d"
        if jsonl_files(p):
            return "native"
        raise Phi3VError(f"{p}: a folder must hold *.jsonl record files (or be an AI2D folder with "
                         "questions/ and images/)")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return "native"
    if suffix == ".tsv":
        return "mmbench"
    if suffix != ".json":
        raise Phi3VError(f"{p}: cannot tell the format from the suffix {suffix or '(none)'}; "
                         f"give --format ({', '.join(FORMATS[1:])})")
    data = _load_json(p)
    if isinstance(data, list) and data and isinstance(data[0], dict) and "imgname" in data[0]:
        return "chartqa"
    if isinstance(data, dict) and isinstance(data.get("data"), list) and data["data"]:
        first = data["data"][0]
        if isinstance(first, dict) and "questionId" in first:
            return "docvqa"
        if isinstance(first, dict) and "image_id" in first and "answers" in first:
            return "textvqa"
    if isinstance(data, dict) and data and all(isinstance(v, dict) and "choices" in v for v in data.values()):
        return "scienceqa"
    raise Phi3VError(f"{p}: not a layout phi3v eval knows (ChartQA, DocVQA, TextVQA, ScienceQA json); "
                     "give --format or convert it to the native JSONL (docs/eval.md)")


def _load_json(p: Path):
    try:
        with open(p, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise Phi3VError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None


def _first_existing(candidates: list[Path]) -> Path:
    """The first candidate that exists, else the first (its error then shows when the record runs)."""
    return next((c for c in candidates if c.exists()), candidates[0])


def _items(data, key: str, p: Path) -> list:
    items = data.get(key) if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise Phi3VError(f"{p}: expected a list of questions{f' under {key!r}' if key else ''}")
    return items


def _field(item, name: str, where: str):
    if not isinstance(item, dict) or name not in item:
        raise Phi3VError(f"{where}: missing {name!r}")
    return item[name]


# -- the readers ------------------------------------------------------------------------------


def _native(p: Path, metric: str | None) -> list[EvalRecord]:
    files = jsonl_files(p) if p.is_dir() else [p]
    return [r for f in files for r in read_native(f, metric)]


def read_chartqa(p: Path) -> list[EvalRecord]:
    base = p.resolve().parent
    images_dir = base / "png" if (base / "png").is_dir() else base
    records = []
    for n, item in enumerate(_items(_load_json(p), "", p)):
        where = f"{p} item {n}"
        name = _field(item, "imgname", where)
        image = images_dir / name
        records.append(make_record(where, id=f"{p.stem}-{n}", images=[str(image.relative_to(base))],
                                   sources=[str(image)], question=_field(item, "query", where),
                                   answers=[str(_field(item, "label", where))], metric="relaxed"))
    return records


def read_docvqa(p: Path) -> list[EvalRecord]:
    base = p.resolve().parent
    records = []
    for n, item in enumerate(_items(_load_json(p), "data", p)):
        where = f"{p} data[{n}]"
        if isinstance(item, dict) and "image" in item:
            name = item["image"]
            image = base / name
        else:
            name = _field(item, "image_local_name", where)
            image = _first_existing([base / name, base / "images" / name])
        records.append(make_record(where, id=_field(item, "questionId", where), images=[name],
                                   sources=[str(image)], question=_field(item, "question", where),
                                   answers=_field(item, "answers", where), metric="anls"))
    return records


def read_textvqa(p: Path) -> list[EvalRecord]:
    base = p.resolve().parent
    records = []
    for n, item in enumerate(_items(_load_json(p), "data", p)):
        where = f"{p} data[{n}]"
        image_id = str(_field(item, "image_id", where))
        image = _first_existing([base / "train_images" / f"{image_id}.jpg", base / "images" / f"{image_id}.jpg",
                                 base / f"{image_id}.jpg"])
        records.append(make_record(where, id=item.get("question_id", f"{p.stem}-{n}"),
                                   images=[str(image.relative_to(base))], sources=[str(image)],
                                   question=_field(item, "question", where),
                                   answers=_field(item, "answers", where), metric="vqa"))
    return records


def read_scienceqa(p: Path) -> list[EvalRecord]:
    base = p.resolve().parent
    problems = _load_json(p)
    if not isinstance(problems, dict):
        raise Phi3VError(f"{p}: expected an object of problems keyed by id")
    with_image = {pid: q for pid, q in problems.items() if isinstance(q, dict) and q.get("image")}
    if any(q.get("split") == "test" for q in with_image.values()):
        with_image = {pid: q for pid, q in with_image.items() if q.get("split") == "test"}
    records = []
    for pid, q in with_image.items():
        where = f"{p} problem {pid}"
        choices = _field(q, "choices", where)
        answer = _field(q, "answer", where)
        if not isinstance(answer, int) or not isinstance(choices, list) or not 0 <= answer < len(choices):
            raise Phi3VError(f"{where}: 'answer' must index 'choices'")
        split = q.get("split", "")
        image = _first_existing([base / "images" / split / pid / q["image"],
                                 base.parent / "images" / split / pid / q["image"]])
        question = _field(q, "question", where)
        if q.get("hint"):
            question = f"Context: {q['hint']}\n{question}"
        records.append(make_record(where, id=pid, images=[f"{split}/{pid}/{q['image']}"], sources=[str(image)],
                                   question=question, answers=[chr(ord("A") + answer)], metric="choice",
                                   choices=choices))
    return records


def read_mmbench(p: Path) -> list[EvalRecord]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # the image column holds whole base64 images
    records = []
    with open(p, encoding="utf-8", newline="") as f:
        rows = csv.DictReader(f, delimiter="\t")
        for n, row in enumerate(rows, start=2):  # line 1 is the header
            where = f"{p}:{n}"
            choices = []
            for letter in "ABCDEFGHI":
                text = (row.get(letter) or "").strip()
                if not text or text.lower() == "nan":
                    break
                choices.append(text)
            image = (row.get("image") or "").strip()
            if not image:
                raise Phi3VError(f"{where}: the 'image' column (base64) is empty")
            question = _field(row, "question", where)
            hint = (row.get("hint") or "").strip()
            if hint and hint.lower() != "nan":
                question = f"Hint: {hint}\n{question}"
            records.append(make_record(where, id=_field(row, "index", where), images=["(embedded base64)"],
                                       sources=[f"data:image/jpeg;base64,{image}"], question=question,
                                       answers=[_field(row, "answer", where)], metric="choice", choices=choices))
    return records


def read_ai2d(p: Path) -> list[EvalRecord]:
    base = p.resolve()
    records = []
    for qfile in sorted((base / "questions").glob("*.json")):
        data = _load_json(qfile)
        where = str(qfile)
        name = _field(data, "imageName", where)
        for text, q in _field(data, "questions", where).items():
            qwhere = f"{where} question {text!r}"
            choices = _field(q, "answerTexts", qwhere)
            correct = _field(q, "correctAnswer", qwhere)
            if not isinstance(correct, int) or not isinstance(choices, list) or not 0 <= correct < len(choices):
                raise Phi3VError(f"{qwhere}: 'correctAnswer' must index 'answerTexts'")
            records.append(make_record(qwhere, id=q.get("questionId", f"{name}-{text}"),
                                       images=[f"images/{name}"], sources=[str(base / "images" / name)],
                                       question=text, answers=[chr(ord("A") + correct)], metric="choice",
                                       choices=[str(c) for c in choices]))
    return records


READERS = {"native": _native, "chartqa": read_chartqa, "docvqa": read_docvqa, "textvqa": read_textvqa,
           "scienceqa": read_scienceqa, "mmbench": read_mmbench, "ai2d": read_ai2d}
