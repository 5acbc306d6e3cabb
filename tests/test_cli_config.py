"""Defaults from the environment and the config file (cli/configuration.py), `phi3v config`, and
"did you mean ...?" for a mistyped command (cli/suggest.py). No model is loaded.

Precedence: flag > environment (PHI3V_<DEST>) > config file ([command] table > top level) > default.
"""

from __future__ import annotations

import json

import pytest

from phi3v.cli import main as cli
from phi3v.cli.configuration import apply_configuration


def parse(argv: list[str]):
    """argv parsed as `phi3v` would: configured defaults first, then the command line."""
    parser = cli.build_parser()
    apply_configuration(parser, argv)
    return parser.parse_args(argv)


@pytest.fixture
def config_file(tmp_path, monkeypatch):
    """write(text) -> the path of a config file PHI3V_CONFIG points at."""
    path = tmp_path / "config.toml"

    def write(text: str):
        path.write_text(text)
        monkeypatch.setenv("PHI3V_CONFIG", str(path))
        return path

    return write


def test_built_in_defaults_without_environment_or_file():
    args = parse(["ask", "-p", "hi"])
    assert (args.device, args.dtype, args.num_crops, args.ctx, args.image_cache_mb) == ("auto", "auto", None, None, 512)
    assert args.config_sources["num_crops"] == "default"


def test_environment_sets_defaults_with_the_flags_types(monkeypatch):
    for name, value in {"PHI3V_DEVICE": "cpu", "PHI3V_DTYPE": "float32", "PHI3V_NUM_CROPS": "4",
                        "PHI3V_QUANTIZE": "int8", "PHI3V_TEMPERATURE": "0.5", "PHI3V_CTX": "2048",
                        "PHI3V_REPETITION_PENALTY": "1.1", "PHI3V_IMAGE_CACHE_MB": "64",
                        "PHI3V_LOW_MEMORY": "yes"}.items():
        monkeypatch.setenv(name, value)
    args = parse(["ask", "-p", "hi"])
    assert (args.device, args.dtype, args.num_crops, args.quantize) == ("cpu", "float32", 4, "int8")
    assert (args.temperature, args.ctx, args.repetition_penalty, args.image_cache_mb) == (0.5, 2048, 1.1, 64.0)
    assert args.low_memory is True
    assert args.config_sources["num_crops"] == "environment PHI3V_NUM_CROPS"


def test_flag_beats_environment_beats_file_beats_default(monkeypatch, config_file):
    path = config_file('num_crops = 9\ndevice = "cpu"\ntop_k = 3\n[ask]\ntop_k = 5\n[serve]\nport = 8081\n')
    monkeypatch.setenv("PHI3V_NUM_CROPS", "4")
    args = parse(["ask", "-p", "hi"])
    assert args.num_crops == 4 and args.config_sources["num_crops"] == "environment PHI3V_NUM_CROPS"
    assert args.device == "cpu" and args.config_sources["device"] == f"{path} device"
    assert args.top_k == 5 and args.config_sources["top_k"] == f"{path} [ask] top_k"  # the table wins
    assert parse(["describe", "x.png"]).top_k == 3  # the top level for the other commands
    flagged = parse(["ask", "-p", "hi", "--num-crops", "2", "--device=auto"])
    assert (flagged.num_crops, flagged.device) == (2, "auto")
    assert flagged.config_sources["num_crops"] == "command line"
    served = parse(["serve"])
    assert (served.port, served.host) == (8081, "127.0.0.1")


def test_server_settings_and_host_port_from_the_environment(monkeypatch):
    monkeypatch.setenv("PHI3V_HOST", "0.0.0.0")
    monkeypatch.setenv("PHI3V_PORT", "9001")
    monkeypatch.setenv("PHI3V_MAX_QUEUE", "3")
    monkeypatch.setenv("PHI3V_LOG_FORMAT", "json")
    monkeypatch.setenv("PHI3V_IMAGE_CACHE_MB", "8")
    from phi3v.cli.serve import settings_from_args

    args = parse(["serve"])
    assert (args.host, args.port) == ("0.0.0.0", 9001)
    settings = settings_from_args(args)
    assert (settings.max_queue, settings.log_format, settings.image_cache_bytes) == (3, "json", 8 * 2**20)


@pytest.mark.parametrize("name, value, expected", [
    ("PHI3V_DTYPE", "int3", "environment variable PHI3V_DTYPE: expected one of auto, float32, bfloat16, float16"),
    ("PHI3V_NUM_CROPS", "99", "environment variable PHI3V_NUM_CROPS: must be between 1 and 64, got 99"),
    ("PHI3V_DEVICE", "tpu", "environment variable PHI3V_DEVICE: expected auto, cpu"),
    ("PHI3V_LOW_MEMORY", "maybe", "environment variable PHI3V_LOW_MEMORY: expected true or false"),
    ("PHI3V_PORT", "80a", "environment variable PHI3V_PORT: expected a whole number, got '80a'"),
    ("PHI3V_LOG_FORMAT", "xml", "environment variable PHI3V_LOG_FORMAT: expected one of text, json, got 'xml'"),
])
def test_a_bad_environment_value_is_a_usage_error_naming_the_variable(run_cli, monkeypatch, name, value, expected):
    monkeypatch.setenv(name, value)
    argv = ("serve",) if name in ("PHI3V_PORT", "PHI3V_LOG_FORMAT") else ("ask", "-p", "hi")
    code, out, err = run_cli(*argv)
    assert code == 2 and expected in err, err


@pytest.mark.parametrize("text, expected", [
    ("num_crops = 0\n", "key 'num_crops': must be between 1 and 64, got 0"),
    ("colour = 'red'\n", "unknown key 'colour'"),
    ("[ask]\nport = 1\n", "key 'port' in [ask] is not a configurable option of phi3v ask"),
    ("[nosuch]\nport = 1\n", "[nosuch] is not a phi3v command"),
    ("num_crops = [", "not valid TOML"),
    ("device = 3\n", "key 'device': expected auto, cpu"),
])
def test_a_bad_config_file_is_a_usage_error_naming_file_and_key(run_cli, config_file, text, expected):
    path = config_file(text)
    code, out, err = run_cli("ask", "-p", "hi")
    assert code == 2 and str(path) in err and expected in err, err


def test_a_missing_file_named_by_phi3v_config_is_an_error(run_cli, monkeypatch, tmp_path):
    monkeypatch.setenv("PHI3V_CONFIG", str(tmp_path / "absent.toml"))
    code, out, err = run_cli("ask", "-p", "hi")
    assert code == 2 and "absent.toml: no such file" in err


def test_phi3v_config_lists_values_sources_and_variables(run_cli, monkeypatch, config_file):
    path = config_file("dtype = 'float32'\n[serve]\nport = 8123\napi_key = 's3cret'\n")
    monkeypatch.setenv("PHI3V_NUM_CROPS", "4")
    code, out, err = run_cli("config", "serve", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["file"] == str(path) and report["file_exists"]
    rows = {r["key"]: r for r in report["options"]}
    assert rows["num_crops"]["value"] == 4 and rows["num_crops"]["source"] == "environment PHI3V_NUM_CROPS"
    assert rows["dtype"]["value"] == "float32" and rows["dtype"]["source"] == f"{path} dtype"
    assert rows["port"]["value"] == 8123 and rows["port"]["env"] == "PHI3V_PORT"
    assert rows["api_key"]["value"] == "(set)"  # never the secret itself
    assert rows["device"]["source"] == "default"
    assert "temperature" not in rows  # serve has no sampling flags
    code, out, err = run_cli("config")
    assert code == 0 and "temperature" in out and "PHI3V_TEMPERATURE" in out and str(path) in out
    assert "8123" not in out  # the [serve] table applies to serve only


@pytest.mark.parametrize("typed, suggestion", [("descibe", "describe"), ("serv", "serve"), ("qunatize", "quantize")])
def test_a_mistyped_command_suggests_the_closest(run_cli, typed, suggestion):
    code, out, err = run_cli(typed, "photo.jpg")
    assert code == 2 and f"unknown command '{typed}'; did you mean {suggestion}" in err, err


def test_an_unknown_command_with_no_close_match_lists_the_commands(run_cli):
    code, out, err = run_cli("xyzzy")
    assert code == 2 and "unknown command 'xyzzy' (commands: describe, ocr" in err


def test_ctx_and_image_cache_mb_reach_the_loaded_model(run_cli, monkeypatch, tiny_model_dir):
    """--ctx caps prompt + answer (the answer is cut to the room left); --image-cache-mb is the caches' budget."""
    import phi3v

    loaded = []
    real_load = phi3v.load

    def recording_load(*args, **kwargs):
        loaded.append(real_load(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(phi3v, "load", recording_load)
    monkeypatch.setenv("PHI3V_IMAGE_CACHE_MB", "0")
    code, out, err = run_cli("ask", "-m", tiny_model_dir, "-p", "Name three colours.", "--ctx", "24",
                             "--max-tokens", "100", "--dtype", "float32", "--json", "-q")
    assert code == 0, err
    report = json.loads(out)
    assert report["usage"]["total_tokens"] == 24 and report["finish_reason"] == "length"
    assert loaded[0].context_length == 24
    assert loaded[0].images.feature_cache.max_bytes == 0
