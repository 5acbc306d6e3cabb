"""`phi3v list` and `phi3v rm MODEL`: the phi3v models on this machine, their sizes, and removal.

Where models are looked for is local_models.py's job (the Hugging Face cache, $PHI3V_HOME/models
and folders given to `list`). `rm` asks before deleting unless --yes; a hub model is removed
with huggingface_hub's own cache deletion (every revision of it), a folder with shutil.rmtree.
Nothing is loaded; no network.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from ..errors import Phi3VError
from .arguments import HelpFormatter
from .local_models import LocalModel, all_models, models_dir
from .output import note, print_json

LIST_EXAMPLES = """examples:
  phi3v list
  phi3v list ~/checkpoints          (also the phi3v checkpoints in this folder)
  phi3v list --json

Looked at: the Hugging Face cache and $PHI3V_HOME/models (default ~/.local/share/phi3v/models),
where `phi3v quantize SOURCE` writes when no OUTPUT is given."""

RM_EXAMPLES = """examples:
  phi3v rm microsoft/Phi-3-vision-128k-instruct     (from the Hugging Face cache)
  phi3v rm Phi-3-vision-128k-instruct-int4 --yes     (from $PHI3V_HOME/models)"""


def register(sub, name: str) -> None:
    if name == "list":
        p = sub.add_parser(name, help="the phi3v models on this machine, with size, dtype and quantization",
                           description="List the phi3v models in the Hugging Face cache and in phi3v's models "
                                       "folder, with their disk usage.",
                           epilog=LIST_EXAMPLES, formatter_class=HelpFormatter)
        p.add_argument("folders", nargs="*", metavar="FOLDER", help="also look in these folders")
        p.add_argument("--json", action="store_true", help="one JSON object: models, total_bytes, models_dir")
        p.set_defaults(func=run_list)
    else:
        p = sub.add_parser(name, help="delete a model from the cache or the models folder",
                           description="Delete a model that `phi3v list` shows (asks first unless --yes).",
                           epilog=RM_EXAMPLES, formatter_class=HelpFormatter)
        p.add_argument("model", metavar="MODEL", help="a NAME as `phi3v list` shows it")
        p.add_argument("-y", "--yes", action="store_true", help="do not ask")
        p.set_defaults(func=run_rm)


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def run_list(args) -> int:
    models = all_models(args.folders)
    total = sum(m.size_bytes for m in models)
    if args.json:
        print_json({"models": [m.to_dict() for m in models], "total_bytes": total, "models_dir": str(models_dir())})
        return 0
    if not models:
        note(f"no phi3v models found (looked in the Hugging Face cache and {models_dir()})")
        return 0
    rows = [(m.name, human_size(m.size_bytes), m.dtype or "?", m.quantization or "-",
             m.source + ("" if m.complete else " (incomplete: no weights)"), m.path) for m in models]
    head = ("NAME", "SIZE", "DTYPE", "QUANTIZATION", "WHERE", "PATH")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head) - 1)]
    for row in [head, *rows]:
        print("  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths)) + "  " + row[-1])
    print(f"{len(models)} model{'s' if len(models) != 1 else ''}, {human_size(total)} in all")
    return 0


def find_model(name: str) -> LocalModel:
    matches = [m for m in all_models() if name in (m.name, m.path) or (m.source != "hub cache"
                                                                        and Path(name).expanduser() == Path(m.path))]
    if not matches:
        err = Phi3VError(f"no model {name!r} in the Hugging Face cache or {models_dir()}")
        err.cli_hint = "`phi3v list` shows the names"
        raise err
    return matches[0]


def confirm(question: str) -> bool:
    """y/yes on stdin (a terminal or a pipe); anything else, or nothing, is no."""
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline()
    if not sys.stdin.isatty():
        print(file=sys.stderr)
    return answer.strip().lower() in ("y", "yes")


def run_rm(args) -> int:
    model = find_model(args.model)
    what = f"{model.name} ({human_size(model.size_bytes)}, {model.source}: {model.path})"
    if not args.yes and not confirm(f"delete {what}?"):
        note("nothing deleted")
        return 1
    if model.source == "hub cache":
        from .local_models import scan_hub_cache

        scan_hub_cache().delete_revisions(*model.revisions).execute()
    else:
        shutil.rmtree(model.path)
    note(f"deleted {what}")
    return 0
