"""Where phi3v models live on this machine, and what each one is (for `phi3v list` and `phi3v rm`).

Two places are looked at:

  - the Hugging Face cache (huggingface_hub.scan_cache_dir: $HF_HUB_CACHE, else $HF_HOME/hub, else
    ~/.cache/huggingface/hub), where `phi3v download` and hub ids given to --model put models;
  - phi3v's models folder, $PHI3V_HOME/models ($PHI3V_HOME defaults to $XDG_DATA_HOME/phi3v, i.e.
    ~/.local/share/phi3v), where `phi3v quantize SOURCE` writes its copy when no OUTPUT is given;
    `--model NAME` finds a folder there by its name;

plus any folder given to `phi3v list FOLDER`. A model is a folder whose config.json says
model_type "phi3_v"; its dtype is config.json's torch_dtype, its quantization the scheme
`phi3v quantize` records there (quant/layers.py CONFIG_KEY), its size the bytes of its files.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

HOME_ENV = "PHI3V_HOME"
QUANT_KEY = "phi3v_quantization"  # = phi3v.quant.layers.CONFIG_KEY (that module imports torch); a test checks


def phi3v_home() -> Path:
    if os.environ.get(HOME_ENV):
        return Path(os.path.expanduser(os.environ[HOME_ENV]))
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data) / "phi3v"


def models_dir() -> Path:
    """The folder `phi3v quantize` writes to by default and `--model NAME` looks in."""
    return phi3v_home() / "models"


@dataclass
class LocalModel:
    name: str  # what --model takes: the hub id, or the folder's name in the models folder, or its path
    source: str  # "hub cache" | "models folder" | "folder"
    path: str
    size_bytes: int
    dtype: str | None  # config.json torch_dtype
    quantization: str | None  # "int4 (group 128)", "int8", or None for a float checkpoint
    revisions: tuple[str, ...] = ()  # hub cache: the commits held (rm deletes them all)
    complete: bool = True  # weights present (a download or quantize cut short leaves a folder without them)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["revisions"] = list(self.revisions)
        return d


def read_model_config(folder: Path) -> dict | None:
    """config.json of a phi3v checkpoint folder, or None when the folder is not one."""
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) and cfg.get("model_type") == "phi3_v" else None


def quantization_label(cfg: dict) -> str | None:
    entry = cfg.get(QUANT_KEY)
    if not isinstance(entry, dict):
        return None
    scheme = str(entry.get("scheme"))
    label = f"{scheme} (group {entry['group_size']})" if entry.get("group_size") else scheme
    return label + (" +vision" if entry.get("vision") else "")


def folder_size(folder: Path) -> int:
    """Bytes of the files under `folder` (links followed once: a hub snapshot links into blobs)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def describe_folder(folder: Path, name: str, source: str) -> LocalModel | None:
    cfg = read_model_config(folder)
    if cfg is None:
        return None
    return LocalModel(name, source, str(folder), folder_size(folder), cfg.get("torch_dtype"),
                      quantization_label(cfg), complete=has_weights(folder))


def has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file()


def scan_hub_cache():
    """huggingface_hub's HFCacheInfo of the cache downloads go to (its constant read now, not at import)."""
    from huggingface_hub import constants, scan_cache_dir

    return scan_cache_dir(constants.HF_HUB_CACHE)


def hub_cache_models() -> list[LocalModel]:
    """The phi3v models in the Hugging Face cache (newest revision's config.json decides)."""
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_hub_cache()
    except CacheNotFound:
        return []
    out = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        newest = max(repo.revisions, key=lambda r: r.last_modified)
        cfg = read_model_config(Path(newest.snapshot_path))
        if cfg is None:
            continue
        out.append(LocalModel(repo.repo_id, "hub cache", str(repo.repo_path), repo.size_on_disk,
                              cfg.get("torch_dtype"), quantization_label(cfg),
                              tuple(r.commit_hash for r in repo.revisions),
                              complete=has_weights(Path(newest.snapshot_path))))
    return out


def folder_models(folder: Path, source: str) -> list[LocalModel]:
    """The folder itself when it is a checkpoint, else its checkpoint sub-folders."""
    folder = Path(os.path.expanduser(str(folder)))
    if not folder.is_dir():
        return []
    own = describe_folder(folder, str(folder), source)
    if own is not None:
        return [own]
    models = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        name = sub.name if source == "models folder" else str(sub)
        found = describe_folder(sub, name, source)
        if found is not None:
            models.append(found)
    return models


def all_models(extra_folders=()) -> list[LocalModel]:
    models = hub_cache_models() + folder_models(models_dir(), "models folder")
    for folder in extra_folders:
        models += folder_models(Path(folder), "folder")
    return models


def find_in_models_dir(name: str) -> Path | None:
    """models_dir()/name when `name` is a plain name (no path) of a checkpoint there."""
    if not name or "/" in name or os.sep in name or name.startswith((".", "~")):
        return None
    folder = models_dir() / name
    return folder if read_model_config(folder) is not None else None
