"""The README's and docs/*.md's code blocks are true (issue 17: "every doc statement true").

- every `phi3v ...` line of a ```bash block and every `$ phi3v ...` line of a ```console block is a
  valid command line for today's parser (a transcript that shows a usage error must be one);
- the README's command-line examples run against a tiny checkpoint (missing example files are
  stand-ins copied from examples/chart.png); the ones that cannot run here are listed in
  NOT_RUN with the reason, never skipped silently;
- transcripts whose output does not depend on random weights are rerun and compared line by line
  (README `phi3v info`, docs/cli.md's error transcripts);
- the README's Python examples run with phi3v.load pointed at the tiny checkpoint;
- a conversation saved by `phi3v chat` (/save) is valid input to model.chat, as docs/cli.md says.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image
from shell_lines import example_argv

import phi3v.cli.main as cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK_RE = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def blocks(doc: Path, kind: str) -> list[str]:
    return [body for lang, body in BLOCK_RE.findall(doc.read_text(encoding="utf-8")) if lang == kind]


def bash_lines(doc: Path) -> list[str]:
    """`phi3v ...` lines of the bash blocks (continuation lines joined)."""
    out = []
    for body in blocks(doc, "bash"):
        for line in body.replace("\\\n", " ").splitlines():
            line = re.sub(r"^([A-Z_]+=\S+ )+", "", line.strip())  # environment assignments
            if line.startswith("phi3v "):
                out.append(re.split(r"\s+#", line)[0].strip())  # without its comment
    return out


def transcripts(doc: Path) -> list[tuple[str, list[str]]]:
    """(command, output lines) of each `$ phi3v ...` in the console blocks."""
    found = []
    for body in blocks(doc, "console"):
        command, output = None, []
        for line in body.splitlines() + ["$ end"]:
            if line.startswith("$ "):
                if command is not None:
                    found.append((command, output))
                text = line[2:].strip()
                text = re.sub(r"^([A-Z_]+=\S+ )+", "", text)  # environment assignments
                command, output = (text, []) if text.startswith("phi3v ") else (None, [])
            elif command is not None:
                output.append(line)
    return found


def parses(argv: list[str], tmp_path: Path) -> bool:
    for word in argv:  # files that options read while parsing (--schema FILE.json)
        if word.endswith(".json") and not word.startswith("-") and not (tmp_path / word).exists():
            (tmp_path / word).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / word).write_text('{"type": "object"}')
    try:
        args = cli.build_parser().parse_args(argv)
        if getattr(args, "check", None):
            args.check(args)
    except SystemExit:
        return False
    return True


def doc_id(doc: Path) -> str:
    return str(doc.relative_to(ROOT))


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_documented_command_line_parses(doc, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    wrong = [line for line in bash_lines(doc) if not parses(example_argv(line), tmp_path)]
    for command, output in transcripts(doc):
        usage_error = any(ln.startswith("usage: ") for ln in output)
        if parses(example_argv(command), tmp_path) == usage_error:
            wrong.append(f"{command}  (the transcript {'shows' if usage_error else 'shows no'} usage error)")
    capsys.readouterr()
    assert not wrong, "\n".join(wrong)


# ---------------------------------------------------------------------------------------------
# the README's command lines, run


NOT_RUN = [  # (pattern of README command lines, why they do not run here)
    (r"^phi3v download ", "downloads 8 GB from the hub (no network in tests)"),
    (r"^phi3v serve ", "a server (tests/test_cli_rough_edges.py and test_server*.py run one)"),
    (r"--ray\b", "a Ray cluster (tests/test_batch_ray.py runs a local one)"),
    (r"--server\b", "a running phi3v serve (tests/test_cli_remote.py)"),
    (r"\.(mp4|webm|mov|mkv)\b", "a video file (tests/test_video_*.py write synthetic ones)"),
]
LOAD_FREE = {"info"}  # commands that never load a model: run as written


def stand_in_files(argv: list[str], cwd: Path) -> None:
    """Image and input files the example names but the repository lacks: copies of chart.png."""
    chart = ROOT / "examples" / "chart.png"
    for word in argv:
        target = cwd / word
        if word.startswith("-") or target.exists():
            continue
        if word.endswith((".png", ".jpg")):
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.open(chart).convert("RGB").save(target)
        elif word.endswith("/"):  # a folder of images
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(chart, target / "one.png")
        elif word.endswith(".jsonl") and word != argv[argv.index("--out") + 1 if "--out" in argv else -1]:
            shutil.copy(chart, cwd / "r1.png")
            target.write_text(json.dumps({"id": "r1", "images": ["r1.png"], "prompt": "What is this?"}) + "\n")


def readme_commands() -> list[str]:
    return bash_lines(ROOT / "README.md")


def not_run_reason(line: str) -> str | None:
    return next((why for pattern, why in NOT_RUN if re.search(pattern, line)), None)


def test_readme_commands_not_run_are_few_and_named():
    skipped = {line: not_run_reason(line) for line in readme_commands() if not_run_reason(line)}
    print("\n".join(f"NOT RUN {line}: {why}" for line, why in skipped.items()))  # pytest -s lists them
    assert len(skipped) < len(readme_commands()) / 2


def command_options(name: str) -> set[str]:
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command").choices[name]
    return {opt for action in sub._actions for opt in action.option_strings}


@pytest.mark.parametrize("line", [c for c in readme_commands() if not not_run_reason(c)])
def test_readme_command_runs_on_a_tiny_checkpoint(line, run_cli, tmp_path, tiny_model, monkeypatch):
    import phi3v

    argv = example_argv(line)
    stdin = "What is this?\n" if argv[0] == "chat" else None
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    stand_in_files(argv, tmp_path)
    options = command_options(argv[0])
    if argv[0] not in LOAD_FREE and "--model" in options:  # the session's tiny model instead of the named one
        monkeypatch.setattr(phi3v, "load", lambda *a, **k: tiny_model)
        argv += ["-m", str(tiny_model.model_dir)]
    if "--max-tokens" in options and "--max-tokens" not in argv:  # short answers; JSON needs room to close
        argv += ["--max-tokens", "200" if argv[0] == "extract" else "3"]
    argv += ["-q"] if "-q" in options else []
    code, out, err = run_cli(*argv, stdin=stdin, cwd=tmp_path)
    assert code == 0, f"{line}\n{err}"
    if argv[0] in ("describe", "ocr", "table", "compare", "ask", "extract", "info"):
        assert out.strip(), err  # the answer (or the facts) on stdout


# ---------------------------------------------------------------------------------------------
# transcripts compared line by line


def transcript(doc: str, command: str) -> list[str]:
    found = [out for cmd, out in transcripts(ROOT / doc) if cmd.startswith(command)]
    assert found, f"{doc} no longer shows `{command}`"
    return [ln for ln in found[0] if ln.strip()]


def test_readme_info_transcript_is_what_info_prints(run_cli, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # the default model is not cached: published sizes
    monkeypatch.delenv("PHI3V_MODEL", raising=False)
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    code, out, err = run_cli("info", "examples/chart.png", cwd=ROOT)
    assert code == 0, err
    assert out.splitlines() == transcript("README.md", "phi3v info examples/chart.png")


def test_cli_doc_short_context_transcript_is_what_describe_prints(run_cli, tmp_path, tiny_model_dir):
    folder = tmp_path / "short-context"
    folder.mkdir()
    for f in Path(tiny_model_dir).iterdir():
        if f.name != "config.json":
            (folder / f.name).symlink_to(f)
    cfg = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    cfg["max_position_embeddings"] = cfg["original_max_position_embeddings"] = 2048
    (folder / "config.json").write_text(json.dumps(cfg))
    Image.new("RGB", (336, 336), (10, 200, 30)).save(tmp_path / "square.png")
    code, _, err = run_cli("describe", "square.png", "--num-crops", "16", "-m", "short-context", "--device", "cpu",
                           cwd=tmp_path)
    assert code == 1
    assert err.splitlines() == transcript("docs/cli.md", "phi3v describe square.png --num-crops 16 -m short-context")


def test_cli_doc_offline_transcript_is_what_download_prints(run_cli, monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", "/root/.cache/huggingface/hub-h17-absent")
    code, _, err = run_cli("download", "microsoft/Phi-3-vision-128k-instruct")
    assert code == 1
    expected = transcript("docs/cli.md", "phi3v download microsoft/Phi-3-vision-128k-instruct")
    assert err.replace("hub-h17-absent", "hub").splitlines() == expected


def test_cli_doc_missing_file_transcript_is_what_describe_prints(run_cli, tmp_path):
    code, _, err = run_cli("describe", "missing.jpg", cwd=tmp_path)
    assert code == 1
    assert err.replace(str(tmp_path), "/tmp/docs").splitlines() == transcript("docs/cli.md",
                                                                              "phi3v describe missing.jpg")


def test_cli_doc_cuda_transcript_holds_before_any_download(run_cli, monkeypatch, tmp_path):
    """No CUDA: the device error comes first, even for a model that would have to be downloaded."""
    import huggingface_hub.constants as hf_constants
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the transcript is of one without")
    import phi3v.engine.hub as hub

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "_download", lambda *a, **k: pytest.fail("a download was started"))
    code, _, err = run_cli("describe", "examples/chart.png", "--device", "cuda", cwd=ROOT)
    assert code == 1
    assert err.splitlines() == transcript("docs/cli.md", "phi3v describe examples/chart.png --device cuda")


# ---------------------------------------------------------------------------------------------
# Python


def test_readme_python_examples_run(tiny_model, monkeypatch, tmp_path, capsys):
    import phi3v

    monkeypatch.setattr(phi3v, "load", lambda *a, **k: tiny_model)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    shutil.copy(ROOT / "examples" / "chart.png", tmp_path / "receipt.jpg")  # PNG bytes: opened by content
    namespace: dict = {}
    ran = []
    for code in blocks(ROOT / "README.md", "python"):
        if "OpenAI(base_url" in code or "video=" in code:
            continue  # NOT RUN: a running server (tests/test_server*.py use the client) / a video file (test_video_*)
        if "phi3v.load(" in code:  # load, ask, stream, chat
            exec(code.replace("max_new_tokens=200", "max_new_tokens=3").replace("max_new_tokens=100",
                                                                                "max_new_tokens=3"), namespace)
            assert namespace["model"] is tiny_model
        elif "json_schema=" in code:  # after the first block: it uses its `model`
            exec(code.replace("images=", "max_new_tokens=200, images="), namespace)
            reply = namespace["reply"]
            assert reply.parsed is not None and set(reply.parsed) >= {"merchant", "total"}, reply.text
        else:
            pytest.fail(f"a README Python block this test does not know how to run:\n{code}")
        ran.append(code)
    assert len(ran) >= 2
    capsys.readouterr()


def test_a_saved_chat_is_valid_input_to_model_chat(run_cli, tiny_model, monkeypatch, tmp_path):
    import phi3v.cli.chat as chat

    monkeypatch.setattr(chat, "load_model_from_args", lambda args: tiny_model)
    Image.open(ROOT / "examples" / "chart.png").save(tmp_path / "chart.png")
    code, _, err = run_cli("chat", "chart.png", "--max-tokens", "3", "-m", "unused",
                           stdin="What is this?\n/save chat.json\n", cwd=tmp_path)
    assert code == 0, err
    messages = json.loads((tmp_path / "chat.json").read_text())["messages"]
    reply = tiny_model.chat(messages, max_new_tokens=2)
    assert reply.usage.image_tokens > 0 and reply.finish_reason in ("stop", "length")
