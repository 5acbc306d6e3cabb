"""Shared fixtures and helpers: tiny random checkpoints, the tiny model on CPU, the CLI in-process.

- `tiny_model_dir` / `tiny_model`: one phi3v-style checkpoint per session (num_crops 2, the real
  RoPE boundary at 4096) and that folder loaded on CPU in float32.
- `tiny_checkpoint(style, **kwargs)`: a factory of tiny checkpoints written once per session per
  arguments (make_tiny_checkpoint's keywords). `tiny_checkpoint(style, original_max_position_embeddings=
  SHORT_ROPE)` moves the long/short RoPE boundary to SHORT_ROPE tokens, so tests cross it with a
  few hundred tokens instead of 4,200 (tests/golden keeps a crossing at the real length).
- `run_cli(argv, stdin=...)`: `phi3v.cli.main.main(argv)` in this process, returning
  (exit code, stdout, stderr): no interpreter and torch start per call. Tests that need a real
  process (console script, signals, exit on a closed pipe) keep using subprocesses.
The folders are shared: a test that edits one copies it first.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from dataclasses import dataclass

import pytest

SHORT_ROPE = 256  # original_max_position_embeddings of the checkpoints that cross the boundary early


@pytest.fixture(autouse=True)
def no_user_configuration(monkeypatch, tmp_path_factory):
    """The tester's own ~/.config/phi3v/config.toml, PHI3V_CONFIG and phi3v models folder never reach a
    test (cli/configuration.py reads them for every command); a test sets its own."""
    empty = tmp_path_factory.getbasetemp() / "no-user-config"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(empty))
    monkeypatch.setenv("PHI3V_HOME", str(empty / "phi3v-home"))
    monkeypatch.delenv("PHI3V_CONFIG", raising=False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random tiny checkpoint folder in the official layout (preprocessor num_crops = 2)."""
    from phi3v.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), num_crops=2)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """`tiny_model_dir` loaded with phi3v.load on CPU in float32 (shared: do not mutate it)."""
    import phi3v

    return phi3v.load(str(tiny_model_dir), device="cpu", dtype="float32", progress=False)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(style="phi3v", **make_tiny_checkpoint keywords) -> folder, made once per session."""
    from phi3v.testing import make_tiny_checkpoint

    made = {}

    def make(style: str = "phi3v", **kwargs):
        key = (style, repr(sorted(kwargs.items())))
        if key not in made:
            made[key] = make_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny-{style}"), style=style, **kwargs)
        return made[key]

    return make


@dataclass
class CliResult:
    """What one in-process `phi3v` call did; unpacks as (code, out, err) like a subprocess run."""

    code: int
    out: str
    err: str

    def __iter__(self):
        return iter((self.code, self.out, self.err))


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """run_cli(*args, stdin=None, cwd=None) -> CliResult: phi3v.cli.main.main(args) in this process.

    stdin (str or bytes) replaces sys.stdin and cwd the working folder for the call; SystemExit
    (argparse errors, --help) becomes the exit code. Output is what capsys captured during the
    call. Environment variables the command reads (PHI3V_MODEL, NO_COLOR) are the test's to set
    with monkeypatch.
    """
    from phi3v.cli.main import main

    def run(*args, stdin: bytes | str | None = None, cwd=None) -> CliResult:
        data = stdin.encode() if isinstance(stdin, str) else (stdin or b"")
        # a text stdin over bytes: .buffer serves commands that read an image from "-"
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
        capsys.readouterr()  # drop anything printed before this call
        with contextlib.chdir(cwd or os.getcwd()):
            try:
                code = main([str(a) for a in args])
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        out, err = capsys.readouterr()
        return CliResult(code or 0, out, err)

    return run
