"""The `phi3v` command on a tiny checkpoint.

Greedy output of a random tiny model is deterministic but meaningless, so every generating
command is checked against the Python API's result for the same request (same checkpoint,
float32, CPU, --num-crops 1, a few tokens): the texts must be identical and the usage equal.

Most tests run the command in this process (`cli`: phi3v.cli.main.main(argv), no interpreter and
torch start per call). A few run a real process (`run_process`: `python -m phi3v ...`, or the
`phi3v` console script), offline (HF_HUB_OFFLINE=1, an empty HF_HOME) with NO_COLOR and one
thread: exit codes of the real entry points, binary stdin, and the hub (whose offline mode and
cache folder huggingface_hub fixes when it is imported).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from phi3v import tasks

# The options every generating call shares: float32 on CPU like the `tiny_model` fixture.
GEN = ["--device", "cpu", "--dtype", "float32", "--num-crops", "1", "--max-tokens", "8", "--quiet"]
API = dict(max_new_tokens=8, num_crops=1)
SUBCOMMANDS = ("describe", "ocr", "table", "compare", "ask", "chat", "download", "info")


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """Small RGB images (a 1-crop image costs 313 tokens) and a file that is not an image."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("cli_images")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(folder / "b.jpg", quality=95)
    Image.new("RGB", (336, 336), (200, 30, 30)).save(folder / "square.png")
    (folder / "notes.png").write_text("this is text, not a PNG\n")
    return folder


@pytest.fixture(scope="session")
def cli_env(tiny_model_dir, tmp_path_factory):
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", NO_COLOR="1", HF_HUB_OFFLINE="1",
               HF_HOME=str(tmp_path_factory.mktemp("hf_home")), PHI3V_MODEL=str(tiny_model_dir))
    env.pop("PYTHONWARNINGS", None)
    return env


def run_process(env, *args, stdin: bytes | str | None = None, cwd=None, timeout=120):
    """`python -m phi3v ARGS` in a fresh interpreter -> (exit code, stdout, stderr)."""
    data = stdin.encode() if isinstance(stdin, str) else stdin
    proc = subprocess.run([sys.executable, "-m", "phi3v", *map(str, args)], input=data,
                          capture_output=True, env=env, cwd=cwd, timeout=timeout)
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


@pytest.fixture
def cli(run_cli, monkeypatch, tiny_model_dir):
    """`phi3v ARGS` in this process (conftest.run_cli) with the tiny model as PHI3V_MODEL."""
    monkeypatch.setenv("PHI3V_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("NO_COLOR", "1")
    return run_cli


def assert_one_error_line(stderr: str, *needles: str) -> None:
    """An error is `phi3v: error: ...` + `hint: ...`, never a traceback (no --verbose)."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("phi3v: error:")]
    assert len(errors) == 1, stderr
    assert any(ln.startswith("hint: ") for ln in lines), stderr
    for needle in needles:
        assert needle in stderr, (needle, stderr)


def assert_same_as_api(out: dict, completion) -> None:
    assert out["text"] == completion.text
    assert out["finish_reason"] == completion.finish_reason
    assert out["usage"] == completion.usage.to_dict()
    assert set(out["timings"]) >= {"preprocess_s", "vision_s", "prefill_s", "decode_s",
                                   "first_token_s", "decode_tokens_per_s", "load_s"}
    assert all(v >= 0 for v in out["timings"].values())


# ---------------------------------------------------------------------------------------------
# without the model: help, prompts, usage errors


def test_help_of_every_subcommand_has_examples(cli):
    code, out, _ = cli("--help")
    assert code == 0
    for name in SUBCOMMANDS:
        assert f"    {name} " in out
    for name in SUBCOMMANDS:
        code, out, _ = cli(name, "--help")
        assert code == 0, name
        assert "examples:" in out and f"phi3v {name}" in out, name
        assert "--model" in out, name
        assert ("--device" in out) == (name != "download"), name  # a download uses no device


def test_show_prompt_prints_the_task_prompt_and_prompt_overrides_it(cli):
    code, out, _ = cli("describe", "--show-prompt")
    assert (code, out) == (0, tasks.task_prompt("describe") + "\n")
    code, out, _ = cli("table", "--format", "csv", "--show-prompt")
    assert (code, out) == (0, tasks.task_prompt("table", "csv") + "\n")
    code, out, _ = cli("ocr", "--format", "markdown", "--prompt", "Read it.", "--show-prompt")
    assert (code, out) == (0, "Read it.\n")


@pytest.mark.parametrize("args, needle", [
    (["compare", "a.png"], "at least two images"),
    (["describe"], "IMAGE is required"),
    (["table", "a.png", "--format", "xml"], "invalid choice"),
    (["ask", "a.png"], "--prompt"),
    (["describe", "a.png", "--num-crops", "0"], "--num-crops"),
    (["describe", "a.png", "--device", "gpu"], "--device"),
    (["frobnicate"], "unknown command 'frobnicate'"),
])
def test_usage_errors_exit_2(cli, images, args, needle):
    code, out, err = cli(*args, cwd=images)
    assert code == 2, err
    assert needle in err and "Traceback" not in err and out == ""


def test_task_prompts_module():
    assert set(tasks.TASKS) == {"describe", "ocr", "table", "compare", "ask"}
    assert tasks.TASKS["table"].formats == ("markdown", "csv", "json")
    assert tasks.TASKS["ocr"].formats == ("text", "markdown")
    assert tasks.task_prompt("table") == tasks.task_prompt("table", "markdown")
    assert "CSV" in tasks.task_prompt("table", "csv") and "JSON" in tasks.task_prompt("table", "json")
    assert tasks.task_prompt("ask", question="Why?") == "Why?"
    from phi3v.errors import PromptError

    for bad in (lambda: tasks.task_prompt("poem"), lambda: tasks.task_prompt("ocr", "csv"),
                lambda: tasks.task_prompt("ask"), lambda: tasks.check_image_count("compare", 1)):
        with pytest.raises(PromptError):
            bad()


def test_console_script_exit_codes(cli_env, images):
    """The installed `phi3v` console script, a real process: --version 0, usage error 2, bad image 1."""
    script = shutil.which("phi3v", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("no phi3v console script next to this interpreter")

    def run(*args):
        proc = subprocess.run([script, *map(str, args)], capture_output=True, text=True, env=cli_env, timeout=60)
        return proc.returncode, proc.stdout, proc.stderr

    code, out, _ = run("--version")
    assert code == 0 and out.startswith("phi3v ")
    code, _, err = run("frobnicate")
    assert code == 2 and "unknown command 'frobnicate'" in err
    code, out, err = run("describe", images / "nope.png")
    assert code == 1 and out == ""
    assert_one_error_line(err, "nope.png: no such file")


# ---------------------------------------------------------------------------------------------
# generating commands: identical to the Python API for the same greedy request


def test_describe_json_equals_python_api(cli, images, tiny_model, tiny_model_dir):
    code, out, err = cli("describe", images / "a.png", *GEN, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert out.count("\n") == 1  # one JSON object on one line
    expected = tiny_model.ask(tasks.task_prompt("describe"), images=[str(images / "a.png")], **API)
    assert_same_as_api(result, expected)
    assert result["usage"]["image_tokens"] == 313 and result["usage"]["completion_tokens"] >= 1
    assert (result["model"], result["device"], result["dtype"]) == (str(tiny_model_dir), "cpu", "float32")
    assert result["command"] == "describe" and result["num_crops"] == 1
    assert result["prompt"] == tasks.task_prompt("describe")


def test_ocr_markdown_no_stream_prints_the_api_text(cli, images, tiny_model):
    code, out, err = cli("ocr", images / "b.jpg", "--format", "markdown", "--no-stream", *GEN)
    assert code == 0, err
    expected = tiny_model.ask(tasks.task_prompt("ocr", "markdown"), images=[str(images / "b.jpg")], **API)
    assert out == expected.text + "\n"


def test_table_from_stdin_equals_python_api(cli_env, images, tiny_model):
    """A real process: the image bytes come through a real stdin pipe (and `python -m phi3v` exits 0)."""
    data = (images / "a.png").read_bytes()
    code, out, err = run_process(cli_env, "table", "-", "--format", "json", *GEN, "--max-tokens", "400", "--json",
                                 stdin=data)
    assert code == 0, err
    result = json.loads(out)
    assert result["images"] == ["<stdin>"] and result["prompt"] == tasks.task_prompt("table", "json")
    # --format json is constrained to the table shape (tests/test_cli_structured.py)
    expected = tiny_model.ask(tasks.task_prompt("table", "json"), images=[data], json_schema=tasks.TABLE_SCHEMA,
                              **{**API, "max_new_tokens": 400})
    assert_same_as_api(result, expected)
    assert result["parsed"] == expected.parsed


def test_compare_two_images_equals_python_api(cli, images, tiny_model):
    paths = [images / "a.png", images / "b.jpg"]
    code, out, err = cli("compare", *paths, *GEN, "--json")
    assert code == 0, err
    result = json.loads(out)
    expected = tiny_model.ask(tasks.task_prompt("compare"), images=[str(p) for p in paths], **API)
    assert_same_as_api(result, expected)
    assert result["usage"]["image_tokens"] == 2 * 313


def test_ask_text_only_streams_the_api_text_and_verbose_timings(cli, tiny_model):
    code, out, err = cli("ask", "-p", "Name three colours.", *GEN, "--verbose", "--stop", "zzzz-never")
    assert code == 0, err
    expected = tiny_model.ask("Name three colours.", **API, stop=("zzzz-never",))
    assert out == expected.text + "\n"
    for word in ("load", "preprocess", "vision", "prefill", "tok/s", "image 0"):
        assert word in err, err


def test_chat_session_from_stdin(cli, images, tiny_model, tmp_path):
    """Three turns, /image between them, /save, /reset, another turn, /save; compared with the API."""
    a, b = images / "a.png", images / "b.jpg"
    script = (f"What is this?\n/image {b}\nAnd this one?\n/image {images / 'missing.png'}\n/bogus\n"
              f"/save {tmp_path / 'one.json'}\n/reset\nHello\n/save {tmp_path / 'two.json'}\n")
    gen = [x if x != "8" else "6" for x in GEN]
    code, out, err = cli("chat", a, *gen, stdin=script)
    assert code == 0, err
    assert "Traceback" not in err
    assert "missing.png: no such file" in err and "unknown command /bogus" in err

    one = json.loads((tmp_path / "one.json").read_text())
    msgs = one["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert msgs[0]["content"] == [{"type": "image", "image": str(a)}, {"type": "text", "text": "What is this?"}]
    assert msgs[2]["content"] == [{"type": "image", "image": str(b)}, {"type": "text", "text": "And this one?"}]
    # the saved conversation is valid API input, and each answer is the API's answer to its history
    opts = dict(max_new_tokens=6, num_crops=1)
    assert tiny_model.chat(msgs[:1], **opts).text == msgs[1]["content"]
    assert tiny_model.chat(msgs[:3], **opts).text == msgs[3]["content"]

    two = json.loads((tmp_path / "two.json").read_text())["messages"]
    assert [m["role"] for m in two] == ["user", "assistant"]  # /reset forgot the first turns...
    assert two[0]["content"][0] == {"type": "image", "image": str(a)}  # ...but re-attached a.png
    assert tiny_model.chat(two[:1], **opts).text == two[1]["content"]
    # the answers were streamed to stdout, in order
    position = 0
    for answer in (msgs[1]["content"], msgs[3]["content"], two[1]["content"]):
        position = out.index(answer, position) + len(answer)


# ---------------------------------------------------------------------------------------------
# info and download: no weights loaded


def test_info_counts_tokens_and_parameters_from_the_folder(cli, images, tiny_model_dir):
    from safetensors import safe_open

    from phi3v.engine.image import crop_grid, num_image_tokens

    code, out, err = cli("info", images / "square.png", images / "a.png", "--num-crops", "4", "--dtype", "float32",
                         "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["num_crops"] == 4
    for entry, (w, h) in zip(info["images"], [(336, 336), (64, 48)]):
        assert (entry["width"], entry["height"], entry["format"]) == (w, h, "PNG")
        ns = [row["num_crops"] for row in entry["by_num_crops"]]
        assert {1, 2, 4, 9, 16} <= set(ns)  # the standard values + the model's default (2)
        for row in entry["by_num_crops"]:
            assert row["tokens"] == num_image_tokens(w, h, row["num_crops"])
            assert tuple(row["grid"]) == crop_grid(w, h, row["num_crops"])
    model = info["model"]
    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as f:
        stored = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert model["parameters"]["total"] == stored and not model["estimated"]
    assert model["dtype"] == "float32" and model["weights_bytes"] == 4 * stored
    assert model["default_num_crops"] == 2

    code, out, _ = cli("info", images / "square.png", "--num-crops", "16")
    assert code == 0 and "336×336" in out and "2509  ← chosen" in out  # spec §3.1: 4×4 grid


def test_info_reads_every_supported_format_with_exif_orientation(cli, tmp_path):
    """PNG, JPEG (EXIF orientation 6 = rotated 90°), GIF (first frame of two), WebP, BMP, TIFF."""
    from PIL import Image

    base = Image.new("RGB", (60, 20), (10, 200, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    base.save(tmp_path / "rotated.jpg", exif=exif)
    frames = [base, Image.new("RGB", (60, 20), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    for ext in ("png", "webp", "bmp", "tiff"):
        base.save(tmp_path / f"plain.{ext}")
    names = ["plain.png", "rotated.jpg", "anim.gif", "plain.webp", "plain.bmp", "plain.tiff"]
    code, out, err = cli("info", *names, "--json", cwd=tmp_path)
    assert code == 0, err
    got = {e["image"]: (e["format"], e["width"], e["height"]) for e in json.loads(out)["images"]}
    assert got == {"plain.png": ("PNG", 60, 20), "rotated.jpg": ("JPEG", 20, 60), "anim.gif": ("GIF", 60, 20),
                   "plain.webp": ("WEBP", 60, 20), "plain.bmp": ("BMP", 60, 20), "plain.tiff": ("TIFF", 60, 20)}


def test_info_estimates_an_uncached_hub_model_offline(cli_env):
    code, out, err = run_process(cli_env, "info", "--model", "microsoft/Phi-3.5-vision-instruct",
                                 "--dtype", "bfloat16", "--json")
    assert code == 0, err
    model = json.loads(out)["model"]
    assert model["estimated"] and model["default_num_crops"] == 4
    assert model["parameters"]["total"] == 4_146_621_440  # spec §0
    assert model["weights_bytes"] == 8_293_242_880  # = the real index's total_size


def test_info_reads_an_image_from_an_http_url(cli, images, monkeypatch):
    """http(s) image arguments, served here from 127.0.0.1 (no outside network)."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(images))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    for name in [k for k in os.environ if "proxy" in k.lower()]:
        monkeypatch.delenv(name)
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        code, out, err = cli("info", f"{base}/b.jpg", "--json")
        assert code == 0, err
        entry = json.loads(out)["images"][0]
        assert (entry["image"], entry["width"], entry["height"]) == (f"{base}/b.jpg", 30, 40)
        code, out, err = cli("info", f"{base}/absent.png")
        assert code == 1
        assert_one_error_line(err, "absent.png", "404")
    finally:
        server.shutdown()
        server.server_close()


def test_download_prints_the_folder_or_fails_offline(cli_env, tiny_model_dir):
    code, out, err = run_process(cli_env, "download", tiny_model_dir)
    assert code == 0, err
    assert Path(out.strip()) == Path(tiny_model_dir).resolve()
    code, out, err = run_process(cli_env, "download", "someone/not-a-cached-model")
    assert code == 1 and out == ""
    assert_one_error_line(err, "someone/not-a-cached-model", "offline", "phi3v download")


# ---------------------------------------------------------------------------------------------
# errors a person will hit: one line, a hint, exit code 1, no traceback


@pytest.fixture(scope="session")
def short_context_dir(tiny_model_dir, tmp_path_factory):
    """The tiny checkpoint with a 2048-token context (weights shared through symlinks)."""
    folder = tmp_path_factory.mktemp("short_context")
    for f in Path(tiny_model_dir).iterdir():
        if f.name != "config.json":
            (folder / f.name).symlink_to(f)
    cfg = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    cfg["max_position_embeddings"] = cfg["original_max_position_embeddings"] = 2048
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_error_missing_image(cli, images):
    code, out, err = cli("describe", "nope.png", cwd=images)
    assert code == 1 and out == ""
    assert_one_error_line(err, "nope.png: no such file", "check the path")


def test_error_unsupported_format(cli, images):
    code, out, err = cli("ask", "a.png", "notes.png", "-p", "Hi?", cwd=images)
    assert code == 1 and out == ""
    assert_one_error_line(err, "notes.png", "supported format", "PNG, JPEG")


def test_error_prompt_longer_than_the_context_suggests_num_crops(cli, images, short_context_dir):
    # 336x336 at 16 crops = 2509 image tokens > 2048; at 9 crops (3x3 grid) 1489 tokens fit.
    code, out, err = cli("describe", images / "square.png", "-m", short_context_dir,
                         "--num-crops", "16", "--max-tokens", "8", "--device", "cpu")
    assert code == 1 and out == ""
    assert_one_error_line(err, "2509", "2048", "--num-crops 9")


def test_error_offline_model_that_is_not_cached(cli_env, images):
    code, out, err = run_process(cli_env, "describe", images / "a.png", "-m", "microsoft/Phi-3.5-vision-instruct")
    assert code == 1 and out == ""
    assert_one_error_line(err, "Phi-3.5-vision-instruct", "offline")


def test_error_cuda_without_cuda(cli, images):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, out, err = cli("describe", images / "a.png", "--device", "cuda")
    assert code == 1 and out == ""
    assert_one_error_line(err, "CUDA", "--device cpu")


def test_verbose_shows_the_traceback(cli, images):
    code, _, err = cli("describe", images / "missing.png", "--verbose")
    assert code == 1 and "Traceback" in err and "phi3v: error:" in err


# ---------------------------------------------------------------------------------------------
# the command table: main() runs a registered command and turns its errors into one line


def test_a_command_of_the_table_runs_and_its_errors_are_one_line(monkeypatch, capsys):
    import types

    from phi3v.cli import arguments, main as cli

    def register(sub, name):
        p = sub.add_parser(name, parents=[arguments.model_parent()])
        p.add_argument("--fail", action="store_true")
        p.set_defaults(func=run)

    def run(args):
        if args.fail:
            from phi3v.errors import ImageFormatError
            raise ImageFormatError("bad picture")
        print("hello", args.model, args.num_crops)
        return 3

    monkeypatch.setitem(cli.COMMANDS, "hello", types.SimpleNamespace(register=register))
    assert cli.main(["hello", "--model", "m", "--num-crops", "4"]) == 3
    assert capsys.readouterr().out == "hello m 4\n"

    assert cli.main(["hello", "--fail"]) == 1  # a Phi3VError from a command: one line and a hint
    _, err = capsys.readouterr()
    assert "phi3v: error: bad picture" in err and "hint:" in err and "Traceback" not in err


def test_quantize_at_load_equals_the_python_api(cli, images, tiny_model_dir):
    import phi3v

    code, out, err = cli("describe", images / "a.png", *GEN, "--quantize", "int8", "--json")
    assert code == 0, err
    quantized = phi3v.load(str(tiny_model_dir), device="cpu", dtype="float32", progress=False,
                           quantize="int8", prefix_cache=False)
    expected = quantized.ask(tasks.task_prompt("describe"), images=[str(images / "a.png")], **API)
    assert_same_as_api(json.loads(out), expected)


def test_low_memory_flag_keeps_the_answer(cli, images, tiny_model_dir):
    import phi3v

    expected = phi3v.load(str(tiny_model_dir), device="cpu", dtype="float32", progress=False,
                          prefix_cache=False).ask(tasks.task_prompt("describe"), images=[str(images / "a.png")], **API)
    for flag in ("--low-memory", "--no-low-memory"):
        code, out, err = cli("describe", images / "a.png", *GEN, flag, "--json")
        assert code == 0, err
        assert_same_as_api(json.loads(out), expected)
