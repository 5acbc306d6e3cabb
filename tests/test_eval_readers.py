"""Eval data readers: the native JSONL and the published layouts (phi3v.eval.records, readers)."""

from __future__ import annotations

import base64
import json

import pytest
from PIL import Image

from phi3v.errors import Phi3VError
from phi3v.eval.prompts import build_prompt, check_template
from phi3v.eval.readers import detect_format, read_data
from phi3v.eval.variants import parse_variants


def _png(path, colour=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def _jsonl(path, *objs):
    path.write_text("\n".join(json.dumps(o) for o in objs) + "\n")
    return path


def test_native_records_paths_defaults_and_choices(tmp_path):
    _png(tmp_path / "img" / "a.png")
    data = _jsonl(tmp_path / "recs.jsonl",
                  {"id": 7, "image": "img/a.png", "question": "What?", "answers": "42", "metric": "relaxed"},
                  {"images": ["img/a.png"], "question": "Which?", "choices": ["cat", "dog"], "answer": "dog",
                   "metric": "choice"},
                  {"id": "t", "images": [], "question": "Say hi", "answers": ["hi"]})
    records = read_data(data)
    assert [r.id for r in records] == ["7", "line-2", "t"]
    assert records[0].sources == (str((tmp_path / "img" / "a.png").resolve()),)
    assert records[0].images == ("img/a.png",) and records[0].answers == ("42",)
    assert records[2].metric == "exact"  # the default
    assert build_prompt(records[1]) == ("Which?\nA. cat\nB. dog\nAnswer with the option's letter from the "
                                        "given choices directly.")
    assert build_prompt(records[0], "Q: {question}") == "Q: What?"
    assert read_data(data, metric="anls")[2].metric == "anls"  # --metric fills in the default
    assert [r.id for r in read_data(tmp_path)] == ["7", "line-2", "t"]  # a folder of .jsonl files


@pytest.mark.parametrize("obj,message", [
    ({"question": "q", "answers": ["a"], "colour": 1}, "unknown key"),
    ({"question": "q"}, "'answers' is missing"),
    ({"question": "q", "answers": []}, "non-empty list"),
    ({"question": "", "answers": ["a"]}, "'question'"),
    ({"question": "q", "answers": ["a"], "metric": "bleu"}, "unknown metric"),
    ({"question": "q", "answers": ["horse"], "choices": ["cat", "dog"], "metric": "choice"}, "neither an option"),
    ({"question": "q", "answers": ["A"], "choices": ["cat"], "metric": "choice"}, "two or more"),
    ({"question": "q", "answers": ["a"], "images": ["x.png"], "video": "v/"}, "one of"),
    ({"question": "q", "answers": ["a"], "video": "missing.mp4"}, "does not exist"),
    ({"question": "q", "answers": ["a"], "video": ["a.png", "notes.txt"]}, "frame image files only"),
])
def test_native_errors_name_the_line(tmp_path, obj, message):
    (tmp_path / "clip.mp4").write_bytes(b"\0")
    data = _jsonl(tmp_path / "bad.jsonl", {"id": "ok", "question": "q", "answers": ["a"]}, obj)
    with pytest.raises(Phi3VError, match=message) as err:
        read_data(data)
    assert "bad.jsonl:2" in str(err.value)


def test_duplicate_ids_and_bad_json(tmp_path):
    with pytest.raises(Phi3VError, match="duplicate record id 'x'"):
        read_data(_jsonl(tmp_path / "d.jsonl", {"id": "x", "question": "q", "answers": ["a"]},
                         {"id": "x", "question": "q", "answers": ["b"]}))
    (tmp_path / "j.jsonl").write_text("{not json\n")
    with pytest.raises(Phi3VError, match="j.jsonl:1: not valid JSON"):
        read_data(tmp_path / "j.jsonl")
    with pytest.raises(Phi3VError, match="does not exist"):
        read_data(tmp_path / "missing.jsonl")


def test_video_records(tmp_path):
    for i in range(20):
        _png(tmp_path / "frames" / f"{i:03d}.png")
    (tmp_path / "clip.mp4").write_bytes(b"\0")
    frames = [f"frames/{i:03d}.png" for i in range(20)]
    data = _jsonl(tmp_path / "v.jsonl", {"id": "list", "video": frames, "question": "q", "answers": ["a"]},
                  {"id": "folder", "video": "frames", "question": "q", "answers": ["a"]},
                  {"id": "file", "video": "clip.mp4", "question": "q", "answers": ["a"]})
    as_list, folder, file = read_data(data)
    assert len(as_list.images) == 8  # a list of frames: 8 of them, evenly spaced, as images
    assert as_list.images[0] == "frames/000.png" and as_list.images[-1] == "frames/019.png"
    # a folder or a file: one source the engine's video input opens (video_input.VideoPrompts)
    assert folder.sources == ("video:" + str((tmp_path / "frames").resolve()),)
    assert file.sources == ("video:" + str((tmp_path / "clip.mp4").resolve()),) and file.images == ("clip.mp4",)


def test_chartqa_layout(tmp_path):
    _png(tmp_path / "png" / "41699051005347.png")
    path = tmp_path / "test_human.json"
    path.write_text(json.dumps([{"imgname": "41699051005347.png", "query": "What is the peak?", "label": "52.3"}]))
    assert detect_format(path) == "chartqa"
    (r,) = read_data(path)
    assert (r.id, r.metric, r.answers, r.question) == ("test_human-0", "relaxed", ("52.3",), "What is the peak?")
    assert r.sources == (str(tmp_path / "png" / "41699051005347.png"),)


def test_docvqa_and_infographicvqa_layouts(tmp_path):
    _png(tmp_path / "documents" / "pybv0228_81.png")
    doc = tmp_path / "val_v1.0.json"
    doc.write_text(json.dumps({"dataset_name": "docvqa", "data": [
        {"questionId": 52212, "question": "What is the date?", "image": "documents/pybv0228_81.png",
         "docId": 1, "answers": ["1/8/93", "01/08/93"]}]}))
    (r,) = read_data(doc)
    assert (r.id, r.metric, r.answers) == ("52212", "anls", ("1/8/93", "01/08/93"))
    assert r.sources == (str(tmp_path / "documents" / "pybv0228_81.png"),)
    _png(tmp_path / "images" / "10002.jpeg")
    info = tmp_path / "infographicVQA_val_v1.0.json"
    info.write_text(json.dumps({"data": [{"questionId": 65718, "question": "Which year?",
                                          "image_local_name": "10002.jpeg", "answers": ["2016"]}]}))
    (r,) = read_data(info)
    assert r.sources == (str(tmp_path / "images" / "10002.jpeg"),) and r.metric == "anls"


def test_textvqa_layout(tmp_path):
    _png(tmp_path / "train_images" / "003a8ae2ef43b901.jpg")
    path = tmp_path / "TextVQA_0.5.1_val.json"
    answers = ["nous les gosses"] * 6 + ["dakota"] * 4
    path.write_text(json.dumps({"dataset_name": "textvqa", "data": [
        {"question": "what is the brand?", "image_id": "003a8ae2ef43b901", "question_id": 34602,
         "answers": answers}]}))
    (r,) = read_data(path)
    assert (r.id, r.metric, len(r.answers)) == ("34602", "vqa", 10)
    assert r.sources[0].endswith("train_images/003a8ae2ef43b901.jpg")


def test_scienceqa_layout_keeps_test_records_with_images(tmp_path):
    _png(tmp_path / "images" / "test" / "5" / "image.png")
    path = tmp_path / "problems.json"
    path.write_text(json.dumps({
        "5": {"question": "Which is a mammal?", "choices": ["shark", "whale"], "answer": 1, "hint": "Look.",
              "image": "image.png", "split": "test"},
        "6": {"question": "No image", "choices": ["a", "b"], "answer": 0, "image": None, "split": "test"},
        "7": {"question": "Train", "choices": ["a", "b"], "answer": 0, "image": "image.png", "split": "train"}}))
    (r,) = read_data(path)
    assert (r.id, r.metric, r.answers, r.choices) == ("5", "choice", ("B",), ("shark", "whale"))
    assert r.question == "Context: Look.\nWhich is a mammal?"
    assert r.sources == (str(tmp_path / "images" / "test" / "5" / "image.png"),)


def test_mmbench_tsv_with_base64_images(tmp_path):
    import io

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 0, 255)).save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    path = tmp_path / "MMBench_DEV_EN.tsv"
    path.write_text("index\tquestion\thint\tA\tB\tC\tD\tanswer\timage\n"
                    f"12\tWhat colour?\tnan\tred\tblue\tnan\tnan\tB\t{b64}\n")
    (r,) = read_data(path)
    assert (r.id, r.choices, r.answers, r.metric) == ("12", ("red", "blue"), ("B",), "choice")
    from phi3v.engine.image import open_image

    assert open_image(r.sources[0]).getpixel((0, 0)) == (0, 0, 255)


def test_ai2d_folder(tmp_path):
    _png(tmp_path / "images" / "0.png")
    (tmp_path / "questions").mkdir()
    (tmp_path / "questions" / "0.png.json").write_text(json.dumps({"imageName": "0.png", "questions": {
        "Which stage comes after egg?": {"answerTexts": ["larva", "adult", "pupa", "nymph"], "correctAnswer": 0,
                                         "abcLabel": False, "questionId": "0.png-0"}}}))
    (r,) = read_data(tmp_path)
    assert (r.id, r.answers, r.metric) == ("0.png-0", ("A",), "choice")
    assert r.sources == (str(tmp_path / "images" / "0.png"),)


def test_unknown_layouts_are_named(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"foo": 1}))
    with pytest.raises(Phi3VError, match="not a layout phi3v eval knows"):
        read_data(tmp_path / "x.json")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(Phi3VError, match="--format"):
        read_data(tmp_path / "x.csv")


def test_variants_grid_and_errors():
    names = [v.name for v in parse_variants("bf16,int4", "4,16")]
    assert names == ["bf16/c4", "bf16/c16", "int4/c4", "int4/c16"]
    v = parse_variants("int8,int4:32,fp32")
    assert [(x.dtype, x.quantize) for x in v] == [("bfloat16", "int8"), ("bfloat16", "int4:32"), ("float32", None)]
    assert v[0].feature_group == v[1].feature_group != v[2].feature_group
    assert [x.name for x in parse_variants(None, None, ["{question}?", "Q: {question}"])] == ["bf16/p1", "bf16/p2"]
    for bad, message in (("bf16,int3", "unknown setting"), ("int8:32", "unknown setting"), ("bf16,bf16", "twice")):
        with pytest.raises(Phi3VError, match=message):
            parse_variants(bad)
    with pytest.raises(Phi3VError, match="1..64"):
        parse_variants("bf16", "4,x")
    with pytest.raises(Phi3VError, match="must contain"):
        check_template("no field")
    with pytest.raises(Phi3VError, match="unknown field"):
        check_template("{question} {answer}")
