"""`phi3v list` and `phi3v rm` (cli/models.py, cli/local_models.py), and `phi3v quantize SOURCE`
writing to $PHI3V_HOME/models where `list` and `--model NAME` find it.

A Hugging Face cache is laid out by hand in a temporary HF_HUB_CACHE (a phi3v model and a model
of another kind), so huggingface_hub.scan_cache_dir reads a real cache; nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil

import pytest

from phi3v.cli.local_models import QUANT_KEY, models_dir


@pytest.fixture(autouse=True)
def empty_hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache of the test's own (huggingface_hub reads HF_HUB_CACHE once, at import:
    its constant is set too)."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def hub_cache(empty_hub_cache, tiny_model_dir):
    """A cache holding test/tiny-phi3v (the tiny checkpoint) and test/not-phi3v (another model_type)."""
    cache = empty_hub_cache
    snap = cache / "models--test--tiny-phi3v" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_model_dir, snap)
    (cache / "models--test--tiny-phi3v" / "refs").mkdir()
    (cache / "models--test--tiny-phi3v" / "refs" / "main").write_text("a" * 40)
    other = cache / "models--test--not-phi3v" / "snapshots" / ("b" * 40)
    other.mkdir(parents=True)
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return cache


@pytest.fixture
def cli(run_cli, monkeypatch, tmp_path):
    monkeypatch.setenv("PHI3V_HOME", str(tmp_path / "phi3v-home"))
    monkeypatch.setenv("NO_COLOR", "1")
    return run_cli


def listing(cli, *folders) -> dict:
    code, out, err = cli("list", "--json", *folders)
    assert code == 0, err
    return json.loads(out)


def test_quant_key_is_the_one_quantize_writes():
    from phi3v.quant.layers import CONFIG_KEY

    assert QUANT_KEY == CONFIG_KEY


def test_list_shows_phi3v_models_of_the_hub_cache_with_size_and_dtype(cli, hub_cache, tiny_model_dir):
    report = listing(cli)
    assert [m["name"] for m in report["models"]] == ["test/tiny-phi3v"]  # not the llama one
    model = report["models"][0]
    size = sum(p.stat().st_size for p in tiny_model_dir.rglob("*") if p.is_file())
    assert model["source"] == "hub cache" and model["size_bytes"] == size == report["total_bytes"]
    assert model["dtype"] == json.loads((tiny_model_dir / "config.json").read_text())["torch_dtype"]
    assert model["quantization"] is None and model["complete"]
    code, out, err = cli("list")
    assert code == 0 and "test/tiny-phi3v" in out and "hub cache" in out
    assert out.splitlines()[-1].startswith("1 model, ") and out.splitlines()[-1].endswith(" in all")


def test_quantize_without_output_writes_to_the_models_folder_that_list_and_model_find(cli, hub_cache, tiny_model_dir,
                                                                                      tmp_path):
    code, out, err = cli("quantize", tiny_model_dir, "--scheme", "int8", "-q")
    assert code == 0, err
    written = models_dir() / f"{tiny_model_dir.name}-int8"
    assert out.strip() == str(written) and (written / "config.json").is_file()
    report = listing(cli)
    by_name = {m["name"]: m for m in report["models"]}
    assert by_name[written.name]["quantization"] == "int8" and by_name[written.name]["source"] == "models folder"
    assert report["total_bytes"] == sum(m["size_bytes"] for m in report["models"])
    # --model NAME finds the copy in the models folder
    code, out, err = cli("ask", "-m", written.name, "-p", "hi", "--max-tokens", "2", "--device", "cpu",
                         "--dtype", "float32", "--json", "-q")
    assert code == 0, err
    assert json.loads(out)["model"] == str(written)


def test_list_looks_in_folders_given_and_marks_folders_without_weights(cli, tiny_model_dir, tmp_path):
    parent = tmp_path / "checkpoints"
    shutil.copytree(tiny_model_dir, parent / "mine")
    (parent / "not-a-model").mkdir()
    (parent / "cut-short").mkdir()
    shutil.copy(tiny_model_dir / "config.json", parent / "cut-short")
    report = listing(cli, parent)
    assert [(m["name"], m["complete"]) for m in report["models"]] == [(str(parent / "cut-short"), False),
                                                                      (str(parent / "mine"), True)]
    assert report["models"][0]["source"] == "folder"
    code, out, err = cli("list", parent)
    assert "folder (incomplete: no weights)" in out.splitlines()[1]


def test_rm_asks_first_and_deletes_a_models_folder_copy(cli, tiny_model_dir):
    copy = models_dir() / "copy"
    shutil.copytree(tiny_model_dir, copy)
    code, out, err = cli("rm", "copy", stdin="n\n")
    assert code == 1 and copy.is_dir() and "delete copy" in err and "nothing deleted" in err
    code, out, err = cli("rm", "copy", stdin="")  # no answer is no
    assert code == 1 and copy.is_dir()
    code, out, err = cli("rm", "copy", stdin="y\n")
    assert code == 0 and not copy.exists() and "deleted copy" in err


def test_rm_yes_deletes_a_hub_cache_model_without_asking(cli, hub_cache):
    code, out, err = cli("rm", "test/tiny-phi3v", "--yes")
    assert code == 0, err
    assert not (hub_cache / "models--test--tiny-phi3v").exists()
    assert (hub_cache / "models--test--not-phi3v").exists()
    assert listing(cli)["models"] == []


def test_rm_of_an_unknown_model_is_one_error_line(cli, hub_cache):
    code, out, err = cli("rm", "test/nothing", "--yes")
    assert code == 1 and "no model 'test/nothing'" in err and "phi3v list" in err
