"""`phi3v completion bash|zsh|fish` (cli/completion.py): scripts made from the real parsers.

The bash script is sourced in a real bash and its function called as bash's completion would
(COMP_WORDS / COMP_CWORD), so what is tested is what a person's <TAB> gets.
"""

from __future__ import annotations

import subprocess

import pytest

from phi3v.cli import main as cli
from phi3v.cli.configuration import command_parsers



@pytest.fixture(scope="module")
def bash_script(tmp_path_factory):
    from phi3v.cli.completion import script

    path = tmp_path_factory.mktemp("completion") / "phi3v.bash"
    path.write_text(script("bash", command_parsers(cli.build_parser())))
    return path


def complete(script_path, *words: str, cwd=None) -> list[str]:
    """What bash offers for `phi3v WORDS<TAB>` (the last word is the one being completed)."""
    words_array = " ".join("'" + w + "'" for w in ("phi3v", *words))
    code = (f"source {script_path}; COMP_WORDS=({words_array}); COMP_CWORD={len(words)}; _phi3v; "
            'printf "%s\\n" "${COMPREPLY[@]}"')
    out = subprocess.run(["bash", "--norc", "--noprofile", "-c", code], capture_output=True, text=True,
                         cwd=cwd, timeout=30, check=True).stdout
    return [line for line in out.splitlines() if line]


def test_the_command_prints_each_script(run_cli, bash_script):
    code, out, err = run_cli("completion", "bash")
    assert code == 0 and out == bash_script.read_text(), err
    code, out, err = run_cli("completion", "zsh")
    assert code == 0 and "bashcompinit" in out and "complete -o filenames -o bashdefault -F _phi3v phi3v" in out
    code, out, err = run_cli("completion", "tcsh")
    assert code == 2 and "invalid choice: 'tcsh'" in err


def test_bash_completes_commands(bash_script):
    assert complete(bash_script, "de") == ["describe"]
    assert complete(bash_script, "com") == ["compare", "completion"]
    assert set(complete(bash_script, "")) >= set(cli.COMMANDS)


def test_bash_completes_the_commands_flags_and_their_choices(bash_script):
    assert complete(bash_script, "ask", "--dt") == ["--dtype"]
    assert complete(bash_script, "ask", "--dtype", "f") == ["float32", "float16"]
    assert complete(bash_script, "table", "--format", "") == ["markdown", "csv", "json"]
    assert complete(bash_script, "ocr", "--format", "") == ["text", "markdown"]  # the command's own choices
    assert "--port" in complete(bash_script, "serve", "--p")
    assert "--port" not in complete(bash_script, "ask", "--p")


def test_bash_completes_files_for_images(bash_script, tmp_path):
    (tmp_path / "photo.jpg").write_bytes(b"x")
    (tmp_path / "other.png").write_bytes(b"x")
    assert complete(bash_script, "describe", "ph", cwd=tmp_path) == ["photo.jpg"]


def test_every_command_and_flag_is_in_each_script(run_cli):
    parsers = command_parsers(cli.build_parser())
    scripts = {shell: run_cli("completion", shell).out for shell in ("bash", "fish")}
    for name, parser in parsers.items():
        assert f"-a {name} " in scripts["fish"], name
        for action in parser._actions:
            for opt in action.option_strings:
                assert opt in scripts["bash"], (name, opt)
                fish_opt = f" -l {opt[2:]} " if opt.startswith("--") else f" -s {opt[1:]} "
                own_lines = [line for line in scripts["fish"].splitlines()
                             if f"__fish_seen_subcommand_from {name}'" in line]
                assert any(fish_opt in line for line in own_lines), (name, opt)
