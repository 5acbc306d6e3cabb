"""The `phi3v` command table and the flags derived from one declaration (no model involved).

- every command of phi3v.cli.main.COMMANDS is registered and answers --help, without importing
  torch, numpy, PIL, fastapi, tokenizers or huggingface_hub (so --help is quick);
- the cli modules import each other without a circle;
- each generation option (phi3v.options.OPTIONS) has the same range as a CLI flag (answer commands
  and `phi3v batch`), in GenerationOptions and as a server request field;
- each ServerSettings field is a `phi3v serve` flag, and the flags' defaults are the settings';
- a command whose optional dependency is missing still lists, and says which extra to install.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from phi3v.cli import main as cli
from phi3v.cli.serve import settings_from_args
from phi3v.errors import Phi3VError
from phi3v.options import OPTIONS, GenerationOptions
from phi3v.server.settings import ServerSettings

HEAVY = ("torch", "numpy", "PIL", "fastapi", "pydantic", "tokenizers", "huggingface_hub", "safetensors", "uvicorn")
CLI_DIR = Path(cli.__file__).parent


def parse(argv: list[str]):
    return cli.build_parser().parse_args(argv)


def usage_error(argv: list[str], capsys) -> str:
    """The message of a usage error (exit code 2) for argv."""
    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code == 2, argv
    return capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the command table and --help


def test_every_command_of_the_table_is_registered_with_help(capsys):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert list(sub.choices) == list(cli.COMMANDS)
    assert {"describe", "ocr", "table", "compare", "ask", "video", "extract", "chat", "download", "info", "serve", "batch",
            "quantize", "bench", "eval", "config", "completion", "list", "rm"} == set(cli.COMMANDS)
    for name in cli.COMMANDS:
        with pytest.raises(SystemExit) as exc:
            parse([name, "--help"])
        assert exc.value.code == 0, name
        out = capsys.readouterr().out
        assert out.startswith(f"usage: phi3v {name} "), name
        assert "examples:" in out, name


def test_help_imports_nothing_heavy():
    """`phi3v --help` and `phi3v COMMAND --help` for every command, in one fresh interpreter."""
    script = f"""
import contextlib, io, json, sys
from phi3v.cli.main import COMMANDS, main
for argv in [["--help"]] + [[name, "--help"] for name in COMMANDS]:
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit as exc:
            assert exc.code == 0, argv
print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_python_m_phi3v_help_imports_nothing_heavy():
    """The real entry point (`python -m phi3v --help`), seen by -X importtime."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "phi3v", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "COMMAND" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert not {m for m in imported if m.split(".")[0] in HEAVY}


def _cli_imports(path: Path) -> set[str]:
    """The phi3v.cli modules `path` imports, at any level (function-level imports count too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("phi3v.cli."):
            out.add(node.module.split(".")[2])
    return out


def test_cli_modules_import_each_other_without_a_circle():
    modules = {p.stem for p in CLI_DIR.glob("*.py") if p.stem != "__init__"}
    graph = {m: _cli_imports(CLI_DIR / f"{m}.py") & modules for m in modules}
    assert "main" not in set().union(*(graph[m] for m in modules if m != "main"))  # main is the top
    done, active = set(), []

    def visit(m):
        assert m not in active, f"import circle: {' -> '.join(active + [m])}"
        if m in done:
            return
        active.append(m)
        for n in sorted(graph[m]):
            visit(n)
        active.pop()
        done.add(m)

    for m in sorted(modules):
        visit(m)


def test_a_missing_optional_dependency_lists_and_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # `import uvicorn` now fails like a missing package
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "    serve " in capsys.readouterr().out
    assert cli.main(["serve", "--model", "no-such-model-needed"]) == 1
    err = capsys.readouterr().err
    assert [ln for ln in err.splitlines() if ln.startswith("phi3v: error:")] == [
        "phi3v: error: phi3v serve needs the 'server' extra (uvicorn is not installed)"]
    assert "hint: pip install 'phi3v[server]'" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# generation options: one declaration, the same range everywhere


def test_every_generation_option_is_declared_once():
    assert [spec.name for spec in OPTIONS] == [f.name for f in fields(GenerationOptions)]
    assert len({spec.flag for spec in OPTIONS}) == len(OPTIONS)


def _outside_and_inside(spec):
    """Values just outside and at the edges of the option's CLI/library range."""
    b, step = spec.bounds, 1 if spec.kind is int else 0.5
    outside, inside = [], []
    if b.lo is not None:
        (outside if b.lo_open else inside).append(b.lo)
        outside.append(b.lo - step)
        if b.lo_open:
            inside.append(b.lo + (b.hi - b.lo) / 2 if b.hi is not None else b.lo + step)
    if b.hi is not None:
        inside.append(b.hi)
        outside.append(b.hi + step)
    return outside, inside


@pytest.mark.parametrize("spec", [s for s in OPTIONS if s.bounds.lo is not None or s.bounds.hi is not None],
                         ids=lambda s: s.name)
def test_flags_and_generation_options_share_each_range(spec, capsys, tmp_path):
    outside, inside = _outside_and_inside(spec)
    commands = (["describe", "x.png"], ["batch", str(tmp_path), "--out", "o.jsonl"])
    for value in outside:
        for command in commands:
            err = usage_error([*command, spec.flag, str(value)], capsys)
            assert spec.flag in err and "must be" in err, (command, value, err)
        with pytest.raises(Phi3VError, match=f"{spec.name} must be"):
            GenerationOptions(**{spec.name: value})
    for value in inside:
        for command in commands:
            assert getattr(parse([*command, spec.flag, str(value)]), spec.flag[2:].replace("-", "_")) == value
        GenerationOptions(**{spec.name: value})


def test_batch_rejects_an_out_of_range_temperature(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "phi3v", "batch", str(tmp_path), "--out", str(tmp_path / "x.jsonl"),
                           "--temperature", "-1"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--temperature" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_defaults_are_the_generation_options_defaults(tmp_path):
    from phi3v.cli.arguments import options_from_args

    for argv in (["describe", "x.png"], ["ask", "-p", "hi"], ["chat"], ["batch", str(tmp_path), "--out", "o.jsonl"]):
        assert options_from_args(parse(argv)) == GenerationOptions()
    got = options_from_args(parse(["ask", "-p", "hi", "--max-tokens", "7", "--stop", "a", "--stop", "b",
                                   "--repetition-penalty", "1.2", "--seed", "3", "--num-crops", "4"]))
    assert got == GenerationOptions(max_new_tokens=7, stop=("a", "b"), repetition_penalty=1.2, seed=3, num_crops=4)


def test_server_request_fields_take_each_range_from_the_options():
    pytest.importorskip("pydantic")
    from phi3v.server.schemas import ChatCompletionRequest, requested_options

    model_fields = ChatCompletionRequest.model_fields
    for spec in OPTIONS:
        assert spec.server_fields, spec.name
        for name in spec.server_fields:
            bounds = {(key := type(m).__name__.lower()): getattr(m, key) for m in model_fields[name].metadata}
            assert bounds == spec.request_bounds.pydantic(), (name, bounds)
            assert model_fields[name].description == spec.help
        b, server = spec.bounds, spec.request_bounds  # the server's range may only be narrower (OpenAI's)
        assert (server.lo, server.lo_open) == (b.lo, b.lo_open)
        assert b.hi is None or (server.hi is not None and server.hi <= b.hi)

    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], max_tokens=5,
                                max_completion_tokens=6, top_k=3, repetition_penalty=1.1, stop="END")
    got = requested_options(req)
    assert got == {"max_new_tokens": 6, "temperature": None, "top_p": None, "top_k": 3,
                   "repetition_penalty": 1.1, "seed": None, "stop": "END", "num_crops": None}


def test_the_server_turns_every_request_option_into_generation_options():
    pytest.importorskip("fastapi")
    from phi3v.server.schemas import ChatCompletionRequest
    from phi3v.server.service import ChatService

    service = ChatService(None, ServerSettings(default_num_crops=2, default_max_tokens=9), None, "m",
                          frozenset({"m"}))
    try:
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
        plan = service.plan(ChatCompletionRequest(**body))
        assert plan.options == GenerationOptions(max_new_tokens=9, num_crops=2) and not plan.max_tokens_given
        request = dict(body, max_tokens=5, temperature=0.5, top_p=0.9, top_k=4, repetition_penalty=1.3, seed=1,
                       stop=["a", "b"], num_crops=3)
        plan = service.plan(ChatCompletionRequest(**request))
        assert plan.options == GenerationOptions(max_new_tokens=5, temperature=0.5, top_p=0.9, top_k=4,
                                                 repetition_penalty=1.3, seed=1, stop=("a", "b"), num_crops=3)
    finally:
        service.close()


# ---------------------------------------------------------------------------------------------
# server settings: one declaration, one flag each


def test_every_server_setting_is_a_serve_flag_with_the_same_default():
    serve = next(a for a in cli.build_parser()._actions if a.dest == "command").choices["serve"]
    flags = {opt for action in serve._actions for opt in action.option_strings}
    for f in fields(ServerSettings):
        assert f.metadata["flag"] in flags, f.name
    assert settings_from_args(parse(["serve"])) == ServerSettings()


def test_serve_flags_become_settings(monkeypatch, capsys):
    monkeypatch.setenv("PHI3V_API_KEY", "from-env")
    args = parse(["serve", "--max-body-mb", "1.5", "--remote-max-mb", "2", "--remote-timeout-s", "3",
                  "--default-max-tokens", "64", "--prepare-threads", "3", "--model-id", "mine",
                  "--num-crops", "4", "--max-images", "2", "--max-queue", "5", "--allow-remote-images"])
    assert settings_from_args(args) == ServerSettings(
        api_key="from-env", allow_remote_images=True, max_images=2, max_queue=5, max_body_bytes=int(1.5 * 2**20),
        default_num_crops=4, default_max_tokens=64, remote_timeout_s=3.0, remote_max_bytes=2 * 2**20,
        prepare_threads=3, model_id="mine")
    for bad in (["--max-images", "0"], ["--max-body-mb", "0"], ["--remote-timeout-s", "-1"],
                ["--default-max-tokens", "0"], ["--num-crops", "65"]):
        assert bad[0] in usage_error(["serve", *bad], capsys)
    with pytest.raises(Phi3VError, match="max_queue must be >= 1"):
        ServerSettings(max_queue=0)
