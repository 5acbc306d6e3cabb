"""The rough edges a new user hit (issue 17, defects 1-10), each pinned by a test.

serve: -q/-v accepted, a bad --port is a usage error, a busy port fails before the model loads,
"serving at" only once the socket is bound; every --help example parses; batch --ray without Ray
prints its error alone; info on a malformed config.json; chat has no --json; hints that fit the
error (image too large, missing /image file, too long in chat, retry/resume wording, earlier
failures of a resumed batch); quantized shards' file mode; the --verbose load line of a quantized
model; download's options; a 0-byte image.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import stat
import subprocess
import sys
import time

import pytest
from PIL import Image
from shell_lines import example_argv

import phi3v.cli.main as cli

# ---------------------------------------------------------------------------------------------
# helpers


def error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("phi3v: error:")]


def hint_of(err: str) -> str | None:
    return next((ln for ln in err.splitlines() if ln.startswith("hint:")), None)


def png(path, size=(64, 48)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path


def no_model_load(monkeypatch, module):
    """The command must fail before it loads anything."""
    def refuse(args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(module, "load_model_from_args", refuse)


# ---------------------------------------------------------------------------------------------
# 1-2: phi3v serve


def test_serve_accepts_the_global_quiet_and_verbose_flags(monkeypatch, run_cli):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # stop at the extras check
    for flag in ("-q", "--quiet", "-v", "--verbose"):
        code, _, err = run_cli("serve", flag, "--model", "unused")
        assert code == 1, err
        assert error_lines(err) == ["phi3v: error: phi3v serve needs the 'server' extra (uvicorn is not installed)"]
        assert "hint: pip install 'phi3v[server]'" in err and "unrecognized" not in err


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_serve_bad_port_is_a_usage_error_before_anything_loads(monkeypatch, run_cli, port):
    import phi3v.cli.serve as serve

    no_model_load(monkeypatch, serve)
    code, _, err = run_cli("serve", "--port", port, "--model", "unused")
    assert code == 2
    assert "argument --port:" in err and "serving" not in err and "Traceback" not in err


def test_serve_busy_port_fails_before_the_model_loads(monkeypatch, run_cli):
    import phi3v.cli.serve as serve

    no_model_load(monkeypatch, serve)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = run_cli("serve", "--port", port, "--model", "unused")
    assert code == 1
    assert error_lines(err) == [f"phi3v: error: cannot listen on 127.0.0.1:{port}: the port is already in use "
                                "(another phi3v serve? choose another --port)"]
    assert "serving" not in err and "loading" not in err


def test_serve_prints_serving_at_once_the_socket_is_bound(tiny_model_dir):
    """--port 0: the line names the real port, and a client connecting right after it is accepted."""
    pytest.importorskip("uvicorn", reason="the server extra is part of the test setup (scripts/dev-setup.sh)")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "phi3v", "serve", "-m", str(tiny_model_dir), "--port", "0",
                             "--device", "cpu", "--log-level", "warning"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        line = ""
        deadline = time.monotonic() + 120
        while "serving" not in line:
            assert time.monotonic() < deadline, "no 'serving at' line"
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "phi3v serve exited before serving"
        url = re.search(r"at (http://\S+/)", line).group(1)
        host, port = re.match(r"http://([\d.]+):(\d+)/", url).groups()
        assert int(port) > 0
        with socket.create_connection((host, int(port)), timeout=5):  # accepted: the socket is listening
            pass
        import httpx

        deadline = time.monotonic() + 60
        while True:  # the app answers once uvicorn has taken the socket over
            try:
                assert httpx.get(url + "health", timeout=5).status_code == 200
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0  # SIGTERM: drained, exit 0 (docs/server.md)
        proc.stderr.close()


# ---------------------------------------------------------------------------------------------
# 3: every example in every command's --help parses


def help_examples():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        for line in (command.epilog or "").splitlines():
            line = line.strip()
            if line.startswith("phi3v "):
                yield pytest.param(line, id=f"{name}: {line[:60]}")


@pytest.mark.parametrize("line", list(help_examples()))
def test_every_help_example_is_a_valid_command_line(line, tmp_path, monkeypatch):
    argv = example_argv(line)
    monkeypatch.chdir(tmp_path)
    for word in argv:  # files that options read while parsing (--schema FILE.json)
        if word.endswith(".json") and not word.startswith("-"):
            (tmp_path / word).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / word).write_text('{"type": "object"}')
    try:
        args = cli.build_parser().parse_args(argv)
        if getattr(args, "check", None):
            args.check(args)
    except SystemExit as exit_:
        pytest.fail(f"`{line}` is not a valid command line (exit {exit_.code})")


# ---------------------------------------------------------------------------------------------
# 4: batch --ray without Ray


def test_batch_ray_without_ray_prints_only_the_error(monkeypatch, run_cli, tmp_path, tiny_model_dir):
    monkeypatch.setitem(sys.modules, "ray", None)
    png(tmp_path / "imgs" / "a.png")
    code, _, err = run_cli("batch", tmp_path / "imgs", "--task", "describe", "--out", tmp_path / "o.jsonl",
                           "-m", tiny_model_dir, "--ray")
    assert code == 1
    assert err.splitlines()[0].startswith("phi3v: error: --ray needs Ray Data")
    assert "interrupted" not in err and "resume" not in err and "batch" not in err.splitlines()[0][:20]


# ---------------------------------------------------------------------------------------------
# 6: info on a malformed config.json


def test_info_on_a_malformed_config_is_a_checkpoint_error(run_cli, tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    code, _, err = run_cli("info", "-m", tmp_path)
    assert code == 1
    assert error_lines(err)[0].startswith(f"phi3v: error: cannot read config.json in {tmp_path}:")
    assert "unexpected" not in err and "download it again" in hint_of(err)


# ---------------------------------------------------------------------------------------------
# 7: chat has no --json


def test_chat_does_not_offer_json(run_cli):
    code, out, _ = run_cli("chat", "--help")
    assert code == 0 and "--json" not in out and "--no-stream" in out
    code, _, err = run_cli("chat", "--json", "-m", "unused")
    assert code == 2 and "unrecognized arguments: --json" in err


# ---------------------------------------------------------------------------------------------
# 9: hints that fit


FORMATS_HINT = "supported: PNG"


def test_too_large_and_empty_images_get_no_format_hint(run_cli, tmp_path):
    big = tmp_path / "big.png"
    Image.new("1", (10000, 10000)).save(big)  # 100 Mpx: over the 40 Mpx budget, refused from the header
    code, _, err = run_cli("info", big)
    assert code == 1 and "more than the limit" in err and FORMATS_HINT not in err
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    code, _, err = run_cli("info", empty)
    assert code == 1 and error_lines(err) == [f"phi3v: error: {empty}: empty.png is empty (0 bytes)"]
    assert FORMATS_HINT not in err
    notes = tmp_path / "notes.png"
    notes.write_text("plain text")
    code, _, err = run_cli("info", notes)
    assert "is not an image in a supported format" in err and hint_of(err).startswith(f"hint: {FORMATS_HINT}")


def test_chat_hints_fit_the_session(monkeypatch, run_cli, tmp_path, tiny_model_dir):
    import phi3v
    import phi3v.cli.chat as chat

    small = phi3v.load(str(tiny_model_dir), device="cpu", dtype="float32", progress=False, max_context=200)
    monkeypatch.setattr(chat, "load_model_from_args", lambda args: small)
    image = png(tmp_path / "a.png", (336, 336))
    code, _, err = run_cli("chat", "-m", tiny_model_dir, "--max-tokens", "2",
                           stdin=f"/image {tmp_path / 'missing.png'}\n/image {image}\nWhat is this?\n")
    assert code == 0
    hints = [ln for ln in err.splitlines() if ln.startswith("hint:")]
    assert len(hints) == 2, err
    assert "check the path" in hints[0] and FORMATS_HINT not in hints[0]  # /image missing.png
    assert "/reset" in hints[1] and "try --num-crops" not in hints[1]  # too long: no flag to change mid-session


def test_batch_summaries_hint_what_applies(monkeypatch, run_cli, tmp_path, tiny_model_dir):
    from phi3v.batch.runner import BatchStats

    python = BatchStats(total=3, done=3, errors=1).summary("o.jsonl")
    assert "retry_errors=True" in python and "--" not in python  # Python's run_batch: no CLI flag
    again = BatchStats(total=3, done=1, errors=1, skipped=2, retried=True).summary("o.jsonl")
    assert "retry" not in again.split(" -> ")[1] and "failed again" in again

    imgs = tmp_path / "imgs"
    png(imgs / "a.png")
    (imgs / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    out = tmp_path / "o.jsonl"
    argv = ("batch", imgs, "--task", "describe", "--out", out, "-m", tiny_model_dir, "--max-tokens", "2", "-q")
    code, _, err = run_cli(*argv)
    assert code == 1 and "1 errors" in err and "rerun with --retry-errors" in err
    code, _, err = run_cli(*argv)  # a resume: nothing to do, but the output still holds a failed record
    assert code == 1
    assert "0 errors, 2 skipped" in err and "1 skipped record(s) failed in an earlier run" in err
    assert "rerun with --retry-errors" in err
    code, _, err = run_cli(*argv, "--retry-errors")  # fails again: no advice to use the flag just used
    assert code == 1 and "failed again" in err and "rerun with --retry-errors" not in err


# ---------------------------------------------------------------------------------------------
# 10: small defects


def test_quantized_shards_have_the_mode_of_the_other_files(run_cli, tmp_path, tiny_model_dir):
    out = tmp_path / "q8"
    code, _, err = run_cli("quantize", tiny_model_dir, out, "--scheme", "int8", "-q")
    assert code == 0, err
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes


def test_verbose_load_line_names_the_quantization(run_cli, tiny_model_dir):
    code, _, err = run_cli("ask", "-m", tiny_model_dir, "--device", "cpu", "--quantize", "int8", "-p", "hi",
                           "--max-tokens", "1", "-v")
    assert code == 0, err
    line = next(ln for ln in err.splitlines() if ln.startswith("loaded "))
    assert "(int8 weights, bfloat16 compute)" in line


def test_download_offers_only_what_a_download_uses(run_cli):
    code, out, _ = run_cli("download", "--help")
    assert code == 0
    for flag in ("--device", "--dtype", "--quantize", "--num-crops", "--low-memory"):
        assert flag not in out
    assert "--model" in out and "--revision" in out


def test_load_refuses_an_unknown_device_clearly(tiny_model_dir):
    import phi3v
    from phi3v.errors import DeviceError

    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        phi3v.load(str(tiny_model_dir), device="tpu", progress=False)
    with pytest.raises(DeviceError, match="float16"):
        phi3v.load(str(tiny_model_dir), dtype="int3", progress=False)


def test_unexpected_errors_suggest_verbose_only_where_the_command_has_it(capsys):
    from phi3v.cli.running import run_with_errors

    def broken(args):
        raise ValueError("boom")

    assert run_with_errors(broken, argparse.Namespace(verbose=False)) == 1
    assert "hint: run again with --verbose" in capsys.readouterr().err
    assert run_with_errors(broken, argparse.Namespace()) == 1  # a command without -v/--verbose
    err = capsys.readouterr().err
    assert "phi3v: error: unexpected ValueError: boom" in err and "--verbose" not in err


def test_pillow_bomb_warning_stays_silent_under_a_callers_warning_filters(tmp_path):
    """The filter holds even when the caller shows every warning (or imported phi3v inside
    catch_warnings, as pytest does): the pixel budget's ImageError is the only report."""
    import warnings

    from phi3v.engine.image import open_image
    from phi3v.errors import ImageError

    big = tmp_path / "big.png"
    Image.new("1", (10000, 10000)).save(big)  # 100 Mpx: over Pillow's 89 Mpx warning threshold
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageError, match="more than the limit"):
            open_image(big)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
