"""Find a model folder: a local folder as it is, a hub id through huggingface_hub's cache.

`resolve_model_dir(name)` turns a local folder or a hub id ("owner/name") into a folder that holds
config.json, the tokenizer files and the weights.  Hub ids go through huggingface_hub's own cache
(HF_HOME / HF_HUB_CACHE); the cache is always tried first so a cached model never touches the
network.  Offline (HF_HUB_OFFLINE=1, or no network) a model that is not cached is a
ModelNotFoundError that says so; only `_download` may use the network, with huggingface_hub's
progress bars on stderr unless progress=False.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Iterator

from ..errors import ModelNotFoundError

SUPPORTED_HUB_MODELS = ("microsoft/Phi-3-vision-128k-instruct", "microsoft/Phi-3.5-vision-instruct")

# Files a model folder needs: config / generation / preprocessor / index json, the weights, the
# tokenizer (tokenizer.json, tokenizer_config.json; special_tokens_map.json matches *.json).
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*"]

# The weights of a model folder: one file, or shards listed by an index (read by weights.py).
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# "owner/name" as the hub accepts it: letters, digits, "-", "_", "."; no "--" or ".." (hub rules).
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}$")

_SUPPORTED_HINT = (f"supported: {', '.join(SUPPORTED_HUB_MODELS)}, or a local folder "
                   "with config.json and *.safetensors")
# Neutral wording (the engine's message serves Python and the CLI; the CLI adds its own hint line).
_LOCAL_HINT = "or give a local checkpoint folder instead of the hub id"


def is_repo_id(name: str) -> bool:
    """True for a well-formed hub id "owner/name"."""
    return bool(_REPO_ID_RE.match(name)) and "--" not in name and ".." not in name


def _looks_like_path(name: str) -> bool:
    return (name.startswith(("/", "~", ".", "\\")) or name.count("/") > 1 or "\\" in name
            or (len(name) > 1 and name[1] == ":"))


def resolve_model_dir(name_or_path, *, progress: bool = True, revision: str | None = None,
                      cache_dir: str | os.PathLike | None = None) -> Path:
    """A folder holding the model files.

    - an existing folder: itself (it must contain config.json);
    - a hub id "owner/name": its snapshot in the Hugging Face cache, downloaded first when missing
      (only *.json, *.safetensors and tokenizer* files), with huggingface_hub's progress bars on
      stderr unless progress=False;
    - anything else: ModelNotFoundError.
    Offline (HF_HUB_OFFLINE=1 or no network) and not cached: ModelNotFoundError saying so.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ModelNotFoundError(f"model must be a hub id or a folder path, got {type(name_or_path).__name__}")
    name = os.fspath(name_or_path)
    if not name.strip():
        raise ModelNotFoundError(f"empty model name ({_SUPPORTED_HINT})")
    local = Path(name).expanduser()
    if local.is_dir():
        return _check_model_folder(local.resolve(), shown=name)
    if local.exists():
        raise ModelNotFoundError(f"model path {name!r} is a file, not a model folder ({_SUPPORTED_HINT})")
    if isinstance(name_or_path, os.PathLike) or _looks_like_path(name) or not is_repo_id(name):
        reason = "no such folder" if _looks_like_path(name) else "not a local folder nor a hub id owner/name"
        raise ModelNotFoundError(f"unknown model {name!r}: {reason} ({_SUPPORTED_HINT})")
    return _resolve_hub_id(name, progress=progress, revision=revision, cache_dir=cache_dir)


def _check_model_folder(folder: Path, *, shown: str) -> Path:
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(
            f"model folder {shown!r} has no config.json; a model folder holds config.json, "
            f"{SINGLE_FILE} or {INDEX_FILE} with its shards, and the tokenizer files")
    return folder


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub saw it at import, or as the environment says now."""
    from huggingface_hub import constants

    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").upper()
    return bool(constants.HF_HUB_OFFLINE) or env in {"1", "ON", "YES", "TRUE"}


def _cache_location(cache_dir) -> str:
    from huggingface_hub import constants

    return str(cache_dir or constants.HF_HUB_CACHE)


def _resolve_hub_id(repo_id: str, *, progress: bool, revision: str | None, cache_dir) -> Path:
    cached = _from_cache(repo_id, revision=revision, cache_dir=cache_dir)
    if cached is not None and (cached / "config.json").is_file():
        return cached
    where = f"{repo_id!r}" + (f" (revision {revision!r})" if revision else "")
    if _hub_offline():
        raise ModelNotFoundError(
            f"model {where} is not in the Hugging Face cache ({_cache_location(cache_dir)}) and the hub is "
            f"offline (HF_HUB_OFFLINE=1): unset it to download the model, {_LOCAL_HINT}")
    folder = _download(repo_id, revision=revision, progress=progress, cache_dir=cache_dir)
    return _check_model_folder(folder, shown=f"{repo_id} -> {folder}")


def _from_cache(repo_id: str, *, revision: str | None, cache_dir) -> Path | None:
    """The cached snapshot folder, or None; never uses the network (local_files_only=True)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS,
                                      cache_dir=cache_dir, local_files_only=True))
    except LocalEntryNotFoundError:  # includes IncompleteSnapshotError in newer huggingface_hub
        return None


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Turn huggingface_hub's tqdm bars off for the duration (global switch, restored after)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if enabled or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


def _download(repo_id: str, *, revision: str | None, progress: bool, cache_dir) -> Path:
    """Download the snapshot over the network (the only function here that may use it)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                       RevisionNotFoundError)

    where = f"{repo_id!r}" + (f" (revision {revision!r})" if revision else "")
    try:
        with _progress_bars(progress):
            return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS,
                                          cache_dir=cache_dir))
    except GatedRepoError as err:
        raise ModelNotFoundError(
            f"model {where} is gated on the hub: accept its licence on huggingface.co and log in "
            f"(`hf auth login` or HF_TOKEN), {_LOCAL_HINT}") from err
    except RepositoryNotFoundError as err:
        raise ModelNotFoundError(
            f"model {where} was not found on the hub (wrong id, or private without a token); "
            f"{_SUPPORTED_HINT}") from err
    except RevisionNotFoundError as err:
        raise ModelNotFoundError(f"revision {revision!r} of {repo_id!r} was not found on the hub") from err
    except (LocalEntryNotFoundError, ConnectionError) as err:
        raise ModelNotFoundError(
            f"model {where} is not in the Hugging Face cache ({_cache_location(cache_dir)}) and the hub "
            f"cannot be reached (offline or no network): connect to download it, {_LOCAL_HINT}") from err
    except OSError as err:  # other HTTP errors (HfHubHTTPError is an OSError), disk full, ...
        raise ModelNotFoundError(f"could not download model {where}: {err}") from err
