"""phi3v.engine.weights (strict safetensors loading) and phi3v.engine.hub (model-folder resolution, no network)."""

import json
import shutil
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub.utils import LocalEntryNotFoundError, are_progress_bars_disabled
from safetensors import safe_open
from torch import nn

from phi3v.engine import hub, weights
from phi3v.errors import CheckpointError, ModelNotFoundError
from phi3v.testing import make_tiny_checkpoint

VISION = r"^model\.vision_embed_tokens\."
REAL_DOWNLOAD = hub._download


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def stored(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def module_with(shapes: dict, *, dtype=torch.float32) -> nn.Module:
    """A bare module tree whose parameter names are exactly the keys of `shapes`."""
    root = nn.Module()
    for name, shape in shapes.items():
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if part not in mod._modules:
                mod.add_module(part, nn.Module())
            mod = mod._modules[part]
        mod.register_parameter(leaf, nn.Parameter(torch.zeros(shape, dtype=dtype)))
    return root


class TinyDecoderPart(nn.Module):
    """Hand-built module with real checkpoint names: embeddings, layer 0's attention, norm, lm_head."""

    def __init__(self, hidden=64, vocab=32064):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, hidden)
        layer = nn.Module()
        layer.self_attn = nn.Module()
        layer.self_attn.qkv_proj = nn.Linear(hidden, 3 * hidden, bias=False)
        layer.self_attn.o_proj = nn.Linear(hidden, hidden, bias=False)
        self.model.layers = nn.ModuleList([layer])
        self.model.norm = nn.Module()
        self.model.norm.weight = nn.Parameter(torch.ones(hidden))
        self.lm_head = nn.Linear(hidden, vocab, bias=False)


# Everything TinyDecoderPart does not have: the vision part, layer 1, layer 0's norms and MLP.
PART_SKIP = (VISION, r"^model\.layers\.1\.", r"^model\.layers\.0\.(input_layernorm|post_attention_layernorm|mlp)\.")
PART_NAMES = ("model.embed_tokens.weight", "model.layers.0.self_attn.qkv_proj.weight",
              "model.layers.0.self_attn.o_proj.weight", "model.norm.weight", "lm_head.weight")


def file_mappings() -> list[tuple[int, int, str]]:
    rows = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            rows.append((lo, hi, parts[5]))
    return rows


# ------------------------------------------------------------------------------- load_weights

def test_bf16_cpu_load_is_exact_and_zero_copy(tiny):
    m = TinyDecoderPart()
    weights.load_weights(m, tiny, dtype=torch.bfloat16, device="cpu", skip_unused=PART_SKIP)
    params = dict(m.named_parameters())
    ref = stored(tiny)
    assert sorted(params) == sorted(PART_NAMES)
    for name, p in params.items():
        assert p.dtype == torch.bfloat16 and not p.requires_grad
        assert torch.equal(p, ref[name]), name
    if sys.platform.startswith("linux"):
        # The parameter memory is the file mapping itself: no second copy of the weights.
        ptr = params["lm_head.weight"].data_ptr()
        owners = [path for lo, hi, path in file_mappings() if lo <= ptr < hi]
        assert owners and owners[0].endswith("model.safetensors"), owners
    # The mapping is copy-on-write: changing a loaded weight in place never touches the file.
    params["lm_head.weight"].data.mul_(2)
    assert torch.equal(stored(tiny)["lm_head.weight"], ref["lm_head.weight"])


def test_float32_load_upcasts_exactly(tiny):
    m = TinyDecoderPart()
    weights.load_weights(m, tiny, dtype="float32", device="cpu", skip_unused=PART_SKIP)
    ref = stored(tiny)
    for name, p in m.named_parameters():
        assert p.dtype == torch.float32
        assert torch.equal(p, ref[name].float()), name


def test_meta_device_module_is_fully_materialised(tiny):
    with torch.device("meta"):
        m = TinyDecoderPart()
    weights.load_weights(m, tiny, dtype=torch.bfloat16, device="cpu", skip_unused=PART_SKIP)
    assert not any(p.is_meta for p in m.parameters())
    ref = stored(tiny)
    assert torch.equal(m.model.embed_tokens.weight, ref["model.embed_tokens.weight"])
    out = m.lm_head(m.model.embed_tokens(torch.tensor([1, 32010])))  # the module really runs
    assert out.shape == (2, 32064) and torch.isfinite(out.float()).all()


def test_dtype_for_overrides_single_tensors(tiny):
    m = TinyDecoderPart()
    keep_fp32 = lambda name: torch.float32 if name == "model.norm.weight" else None  # noqa: E731
    weights.load_weights(m, tiny, dtype=torch.bfloat16, device="cpu", skip_unused=PART_SKIP,
                            dtype_for=keep_fp32)
    assert m.model.norm.weight.dtype == torch.float32
    assert m.lm_head.weight.dtype == torch.bfloat16


def test_sharded_checkpoint_loads_the_same_values(tmp_path, tiny):
    sharded = make_tiny_checkpoint(tmp_path / "sharded", shards=3)
    assert len(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]) == 60
    a, b = TinyDecoderPart(), TinyDecoderPart()
    weights.load_weights(a, tiny, dtype=torch.float32, device="cpu", skip_unused=PART_SKIP)
    weights.load_weights(b, sharded, dtype=torch.float32, device="cpu", skip_unused=PART_SKIP)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name


def test_full_checkpoint_with_unused_clip_tensors_skipped(tiny):
    # Every tensor but CLIP's post_layernorm and last layer (unused by Phi-3-V, spec §2).
    shapes = {k: tuple(v.shape) for k, v in stored(tiny).items()}
    unused = weights.unused_vision_patterns(num_vision_layers=2)
    used = {k: s for k, s in shapes.items() if ".post_layernorm." not in k and ".encoder.layers.1." not in k}
    assert len(used) == len(shapes) - 2 - 16
    with torch.device("meta"):
        m = module_with(used)
    with pytest.raises(CheckpointError, match=r"18 unexpected tensor\(s\).*encoder\.layers\.1\.layer_norm1"):
        weights.load_weights(m, tiny, dtype=torch.float32, device="cpu")
    weights.load_weights(m, tiny, dtype=torch.float32, device="cpu", skip_unused=unused)
    loaded = dict(m.named_parameters())
    assert loaded.keys() == used.keys() and not any(p.is_meta for p in loaded.values())


def test_missing_tensor_names_it_and_leaves_module_untouched(tiny):
    with torch.device("meta"):
        m = TinyDecoderPart()
        m.model.extra = nn.Linear(4, 4)
    with pytest.raises(CheckpointError, match="missing") as err:
        weights.load_weights(m, tiny, dtype=torch.float32, device="cpu", skip_unused=PART_SKIP)
    assert "model.extra.weight" in str(err.value) and "model.extra.bias" in str(err.value)
    assert m.lm_head.weight.is_meta  # validation happens before any assignment


def test_missing_list_is_capped_at_ten_names(tiny):
    m = module_with({f"model.ghost{i}.weight": (2,) for i in range(15)})
    with pytest.raises(CheckpointError, match=r"15 tensor\(s\) missing.*and 5 more"):
        weights.load_weights(m, tiny, dtype=torch.float32, device="cpu", skip_unused=[".*"])


def test_unexpected_tensors_are_named(tiny):
    m = TinyDecoderPart()
    with pytest.raises(CheckpointError, match="unexpected") as err:
        weights.load_weights(m, tiny, dtype=torch.float32, device="cpu", skip_unused=PART_SKIP[1:])
    assert "model.vision_embed_tokens.glb_GN" in str(err.value)


def test_shape_mismatch_names_tensor_and_both_shapes(tiny):
    m = TinyDecoderPart()
    m.lm_head = nn.Linear(64, 1000, bias=False)
    with pytest.raises(CheckpointError, match=r"lm_head\.weight: checkpoint \[32064, 64\] vs module \[1000, 64\]"):
        weights.load_weights(m, tiny, dtype=torch.float32, device="cpu", skip_unused=PART_SKIP)


def test_shared_module_is_loaded_once_and_stays_tied(tiny):
    # The real model reuses embed_tokens inside the image embedding (no wte.* in the files).
    m = TinyDecoderPart()
    m.model.vision_embed_tokens = nn.Module()
    m.model.vision_embed_tokens.wte = m.model.embed_tokens
    weights.load_weights(m, tiny, dtype=torch.float32, device="cpu", skip_unused=PART_SKIP)
    assert m.model.vision_embed_tokens.wte.weight is m.model.embed_tokens.weight
    assert torch.equal(m.model.embed_tokens.weight, stored(tiny)["model.embed_tokens.weight"].float())


def test_non_persistent_buffers(tiny):
    with torch.device("meta"):
        m = TinyDecoderPart()
        m.register_buffer("rope_cache", torch.zeros(3), persistent=False)
    with pytest.raises(CheckpointError, match="rope_cache"):
        weights.load_weights(m, tiny, dtype=torch.float32, device="cpu", skip_unused=PART_SKIP)
    weights.load_weights(m, tiny, dtype=torch.float32, device="cpu", skip_unused=PART_SKIP,
                            allow_meta_buffers=True)
    assert m.rope_cache.is_meta and not m.lm_head.weight.is_meta
    cpu = TinyDecoderPart()
    cpu.register_buffer("rope_cache", torch.arange(3.0), persistent=False)
    weights.load_weights(cpu, tiny, dtype=torch.bfloat16, device="cpu", skip_unused=PART_SKIP)
    assert cpu.rope_cache.dtype == torch.float32  # not a checkpoint tensor: dtype untouched


def test_broken_folders_raise_checkpoint_error(tmp_path, tiny):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no weights"):
        weights.load_weights(TinyDecoderPart(), empty, dtype=torch.float32, device="cpu")
    sharded = make_tiny_checkpoint(tmp_path / "sharded", shards=2)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        weights.load_weights(TinyDecoderPart(), sharded, dtype=torch.float32, device="cpu")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        weights.load_weights(TinyDecoderPart(), corrupt, dtype=torch.float32, device="cpu")


# --------------------------------------------------------------------------- resolve_model_dir

@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty, private HF cache; the network path fails the test if it is ever taken."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    # huggingface_hub reads these at import time; snapshot_download looks them up at call time.
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)

    def no_network(*args, **kwargs):
        raise AssertionError("resolve_model_dir tried the network")

    monkeypatch.setattr(hub, "_download", no_network)
    return cache


def test_local_folder_resolves_to_itself(tiny):
    assert hub.resolve_model_dir(str(tiny)) == tiny.resolve()
    assert hub.resolve_model_dir(tiny) == tiny.resolve()


def test_local_folder_without_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        hub.resolve_model_dir(tmp_path)


def test_cached_hub_id_resolves_without_network(hf_cache, tiny, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"  # a commit hash: 40 hex digits
    snapshot = hf_cache / "models--microsoft--Phi-3.5-vision-instruct" / "snapshots" / commit
    shutil.copytree(tiny, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(commit)
    assert hub.resolve_model_dir("microsoft/Phi-3.5-vision-instruct") == snapshot
    assert hub.resolve_model_dir("microsoft/Phi-3.5-vision-instruct", revision=commit) == snapshot
    # A cached model is used even when the hub is offline.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    assert hub.resolve_model_dir("microsoft/Phi-3.5-vision-instruct", progress=False) == snapshot


def test_offline_and_not_cached_gives_a_helpful_error(hf_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError) as err:
        hub.resolve_model_dir("microsoft/Phi-3-vision-128k-instruct", progress=False)
    msg = str(err.value)
    assert "not in the Hugging Face cache" in msg and "offline" in msg
    assert "local checkpoint folder" in msg
    # neutral wording: no Python API inside the CLI's line, no CLI flag in Python's (the CLI adds a hint line)
    assert "phi3v.load" not in msg and "--model" not in msg


def test_unreachable_hub_and_not_cached(hf_cache, monkeypatch):
    # No HF_HUB_OFFLINE, but the network is down: huggingface_hub raises LocalEntryNotFoundError.
    monkeypatch.setattr(hub, "_download", REAL_DOWNLOAD)  # the fixture blocked it
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((kwargs.get("local_files_only", False), are_progress_bars_disabled()))
        raise LocalEntryNotFoundError("connection error")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    bars_before = are_progress_bars_disabled()
    with pytest.raises(ModelNotFoundError, match="cannot be reached") as err:
        hub.resolve_model_dir("microsoft/Phi-3-vision-128k-instruct", progress=False)
    assert "local checkpoint folder" in str(err.value)
    assert calls == [(True, bars_before), (False, True)]  # cache first; bars off for the download
    assert are_progress_bars_disabled() == bars_before  # and restored afterwards


@pytest.mark.parametrize("name", ["not a model!", "microsoft", "/no/such/folder", "./missing", "a/b/c"])
def test_unknown_names(hf_cache, name):
    with pytest.raises(ModelNotFoundError, match="unknown model") as err:
        hub.resolve_model_dir(name)
    assert "microsoft/Phi-3-vision-128k-instruct" in str(err.value) and "local folder" in str(err.value)


def test_a_file_is_not_a_model_folder(tiny):
    with pytest.raises(ModelNotFoundError, match="is a file"):
        hub.resolve_model_dir(tiny / "config.json")
