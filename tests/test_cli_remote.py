"""--server URL / PHI3V_SERVER (cli/remote.py): the answer commands ask a real `phi3v serve` app
(tiny checkpoint, uvicorn on 127.0.0.1, tests/server_harness.py) and print what a local run prints.

The server serves the session's tiny_model (float32, CPU), so its answers are compared with
tiny_model.ask on the same inputs (greedy decoding: the same text).
"""

from __future__ import annotations

import json
import socket

import pytest

from phi3v.server.settings import ServerSettings
from server_harness import RunningServer, png_bytes

GEN = ("--max-tokens", "6", "--num-crops", "1", "-q")


@pytest.fixture(scope="module")
def server(tiny_model):
    with RunningServer(tiny_model, ServerSettings(default_num_crops=1)) as srv:
        yield srv


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(png_bytes(48, 40, seed=3))
    return path


@pytest.fixture
def cli(run_cli, monkeypatch, tmp_path):
    # a model folder that does not exist: proof that nothing is loaded here
    monkeypatch.setenv("PHI3V_MODEL", str(tmp_path / "no-model-here"))
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.delenv("PHI3V_SERVER", raising=False)
    monkeypatch.delenv("PHI3V_API_KEY", raising=False)
    return run_cli


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_ask_through_the_server_prints_the_same_answer(cli, server, photo, tiny_model):
    code, out, err = cli("ask", photo, "-p", "What is in this picture?", *GEN, "--server", server.base_url)
    assert code == 0, err
    expected = tiny_model.ask("What is in this picture?", images=[str(photo)], max_new_tokens=6, num_crops=1)
    assert out == expected.text + "\n"


def test_json_report_has_the_servers_usage_and_timings(cli, server, photo, tiny_model, monkeypatch):
    monkeypatch.setenv("PHI3V_SERVER", server.base_url + "/v1/")  # the env var; a /v1 suffix is fine
    code, out, err = cli("describe", photo, *GEN, "--json")
    assert code == 0, err
    report = json.loads(out)
    from phi3v import tasks

    expected = tiny_model.ask(tasks.task_prompt("describe"), images=[str(photo)], max_new_tokens=6, num_crops=1)
    assert report["text"] == expected.text and report["finish_reason"] == expected.finish_reason
    assert report["usage"] == expected.usage.to_dict()
    assert report["model"] == tiny_model.model_dir.name and report["device"] == f"server {server.base_url}"
    assert report["num_crops"] == 1 and report["timings"]["first_token_s"] > 0


def test_schema_goes_as_response_format_and_parsed_comes_back(cli, server, tmp_path):
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}))
    code, out, err = cli("ask", "-p", "Is it ok?", "--max-tokens", "40", "-q", "--schema", schema, "--json",
                         "--server", server.base_url)
    assert code == 0, err
    report = json.loads(out)
    assert isinstance(report["parsed"], dict) and set(report["parsed"]) == {"ok"}
    assert json.loads(report["text"]) == report["parsed"]


def test_a_server_that_is_down_is_one_error_line(cli):
    url = f"http://127.0.0.1:{closed_port()}"
    code, out, err = cli("ask", "-p", "hi", *GEN, "--server", url)
    assert code == 1 and out == ""
    assert f"phi3v: error: cannot reach a phi3v server at {url}" in err and "hint: start one with `phi3v serve`" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, expected", [
    (("--temperature", "5"), "answered 400"),  # the server's narrower range (OpenAI's 0..2)
    (("--choices", "a,b"), "--regex and --choices are not available with --server"),
    (("-m", "some/other-model"), "answered 404: The model `some/other-model` does not exist"),
])
def test_errors_of_the_server_or_of_the_request_are_one_line(cli, server, argv, expected):
    code, out, err = cli("ask", "-p", "hi", *GEN, *argv, "--server", server.base_url)
    assert code == 1 and expected in err, err


def test_a_bad_server_url_is_an_error(cli):
    code, out, err = cli("ask", "-p", "hi", *GEN, "--server", "ftp://example.com")
    assert code == 1 and "--server must be an http:// or https:// URL" in err


def test_an_api_key_is_sent_from_the_environment(cli, tiny_model, monkeypatch):
    with RunningServer(tiny_model, ServerSettings(api_key="s3cret", default_num_crops=1)) as srv:
        code, out, err = cli("ask", "-p", "hi", *GEN, "--server", srv.base_url)
        assert code == 1 and "answered 401" in err and "PHI3V_API_KEY" in err
        monkeypatch.setenv("PHI3V_API_KEY", "s3cret")
        code, out, err = cli("ask", "-p", "hi", *GEN, "--server", srv.base_url)
        assert code == 0 and out.strip() == tiny_model.ask("hi", max_new_tokens=6).text.strip(), err


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    pytest.importorskip("av")
    from video_fixtures import write_video

    return write_video(tmp_path_factory.mktemp("v") / "clip.mp4", seconds=4, fps=5, width=672, height=336)


def test_video_through_the_server_is_the_local_answer(cli, server, clip, tiny_model):
    """`phi3v video CLIP --server`: the clip goes as a video_url data: URI with its selection keys;
    the server picks the same frames, so the answer and the usage equal model.ask(video=...)."""
    code, out, err = cli("video", clip, "-p", "What happens?", "--frames", "3", "--max-tokens", "6", "-q",
                         "--num-crops", "1", "--json", "--server", server.base_url)
    assert code == 0, err
    report = json.loads(out)
    expected = tiny_model.ask("What happens?", video=str(clip), frames=3, max_new_tokens=6, num_crops=1)
    assert report["text"] == expected.text and report["usage"] == expected.usage.to_dict()
    assert [f["time_s"] for f in report["video"]["frames"]] == [0.6, 2.0, 3.2]  # frames 3, 10, 16 at 5 fps


def test_describe_of_a_video_through_the_server_streams_the_answer(cli, server, clip, tiny_model):
    from phi3v import tasks

    code, out, err = cli("describe", clip, "--fps", "0.5", "--max-tokens", "5", "-q", "--num-crops", "1",
                         "--server", server.base_url)
    assert code == 0, err
    expected = tiny_model.ask(tasks.VIDEO_DESCRIBE_PROMPT, video=str(clip), fps=0.5, max_new_tokens=5, num_crops=1)
    assert out == expected.text + "\n"


def test_a_folder_of_frames_cannot_go_to_the_server(cli, server, tmp_path):
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "f1.png").write_bytes(png_bytes(40, 30, seed=1))
    code, out, err = cli("video", tmp_path / "frames", "--server", server.base_url, "-q")
    assert code != 0 and "folder of frames cannot be sent with --server" in err and "Traceback" not in err
