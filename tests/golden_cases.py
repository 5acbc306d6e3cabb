"""Where the golden test vectors live and how to list their cases.

Default: tests/golden (the shared set). Set PHI3V_GOLDEN_DIR to another folder in the same format
(cases.json, images/, processor/, model/, models/, see tests/golden/README.md) to run it unchanged.
"""

from __future__ import annotations

import json
import os
import pathlib

_DEFAULT_DIR = pathlib.Path(__file__).resolve().parent / "golden"
_KINDS = ("processor_cases", "model_cases")


def golden_dir() -> pathlib.Path:
    """The golden set folder: $PHI3V_GOLDEN_DIR when set, else tests/golden."""
    override = os.environ.get("PHI3V_GOLDEN_DIR")
    return pathlib.Path(override).expanduser().resolve() if override else _DEFAULT_DIR


def load_index() -> dict:
    """The whole cases.json of the golden set."""
    index = golden_dir() / "cases.json"
    if not index.is_file():
        where = "PHI3V_GOLDEN_DIR" if os.environ.get("PHI3V_GOLDEN_DIR") else "the default tests/golden"
        raise FileNotFoundError(f"no golden set at {index.parent} ({where}): cases.json is missing")
    with open(index, encoding="utf-8") as f:
        return json.load(f)


def load_cases(kind: str) -> list[dict]:
    """The case list of one kind from cases.json: "processor_cases" or "model_cases"."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    return list(load_index().get(kind, []))
