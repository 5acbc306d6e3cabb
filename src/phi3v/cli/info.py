"""`phi3v info IMAGE…`: what an image costs and what the model needs, without loading weights.

For each image: its size (EXIF orientation applied), and for each --num-crops value the HD
crop grid and the number of image tokens (phi3v.engine.image.crop_grid / num_image_tokens).
For the model: config.json (a local folder or a hub id already in the Hugging Face cache;
nothing is downloaded), or the published Phi-3-vision configuration when neither is available;
its parameter count, the memory the weights and the KV cache take in the chosen dtype, and the
context come from phi3v.engine.facts (the module counted on the meta device; torch is imported
only when the model numbers are computed, not for --help).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..options import OPTION_BY_NAME
from ..errors import CheckpointError, ModelNotFoundError
from .arguments import HelpFormatter, add_option_flag, model_parent, output_parent, video_parent

STANDARD_NUM_CROPS = (1, 4, 9, 16)


def find_config_files(model: str) -> tuple[dict | None, dict | None, str]:
    """(config.json, preprocessor_config.json or None, where they came from) without downloading.

    A local folder must hold config.json; a hub id is looked up in the local cache only.
    Returns (None, None, reason) when nothing is available (the caller estimates).
    """
    path = Path(os.path.expanduser(model))
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ModelNotFoundError(f"{model}: folder has no config.json; not a Phi-3-vision checkpoint")
        pre_file = path / "preprocessor_config.json"
        pre = _read_json(pre_file) if pre_file.is_file() else None
        return _read_json(cfg_file), pre, f"folder {path}"
    if model.startswith((".", "/", "~")):  # meant as a folder, and there is none
        raise ModelNotFoundError(f"{model}: no such folder")
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return None, None, "huggingface_hub is not installed"
    try:
        cfg_path = try_to_load_from_cache(model, "config.json")
        pre_path = try_to_load_from_cache(model, "preprocessor_config.json")
    except Exception:  # an id the hub library rejects (bad characters...): nothing cached
        cfg_path = pre_path = None
    if not isinstance(cfg_path, str):
        return None, None, "not in the local cache"
    pre = _read_json(Path(pre_path)) if isinstance(pre_path, str) else None
    return _read_json(Path(cfg_path)), pre, "the Hugging Face cache"


def _read_json(file: Path) -> dict:
    """A checkpoint's JSON file; unreadable or malformed -> CheckpointError (as loading says it)."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"cannot read {file.name} in {file.parent}: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file.name} in {file.parent} is not a JSON object")
    return data


def model_info(model: str, dtype: str, device: str) -> dict:
    """The model's numbers for `info`: from its config files, or the published configuration."""
    from ..engine.config import Phi3VConfig
    from ..engine.devices import dtype_name, resolve_dtype
    from ..engine.facts import model_facts, published_config

    cfg, pre, source = find_config_files(model)
    estimated = cfg is None
    facts = model_facts(published_config(model) if estimated else Phi3VConfig.from_dicts(cfg, pre))
    dt = resolve_dtype(dtype, device)  # what phi3v.load would pick for this --dtype and --device
    return {
        "model": model,
        "config_source": source,
        "estimated": estimated,
        "default_num_crops": facts.default_num_crops,
        "context_length": facts.context_length,
        "parameters": dict(facts.parameters),
        "dtype": dtype_name(dt),
        "weights_bytes": facts.weight_bytes(dt),
        "kv_cache_bytes_per_token": facts.kv_cache_bytes_per_token(dt),
    }


def image_info(label: str, image, crops: list[int], fmt: str | None = None) -> dict:
    from ..engine.image import crop_grid, num_image_tokens

    w, h = image.size
    rows = []
    for n in crops:
        r, c = crop_grid(w, h, n)
        rows.append({"num_crops": n, "grid": [r, c], "crops": r * c,
                     "tokens": num_image_tokens(w, h, n)})
    return {"image": label, "width": w, "height": h, "format": fmt or getattr(image, "format", None),
            "mode": image.mode, "by_num_crops": rows}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"  # pragma: no cover


def human_count(n: int) -> str:
    if n >= 10**9:
        return f"{n / 1e9:.2f} B"
    if n >= 10**6:
        return f"{n / 1e6:.1f} M"
    return f"{n:,}"


def format_info(images: list[dict], model: dict, chosen: int) -> str:
    lines = []
    for im in images:
        kind = " ".join(x for x in (im["format"], im["mode"]) if x)
        lines.append(f"{im['image']}: {im['width']}×{im['height']} {kind}")
        lines.append(f"  {'num_crops':>9}  {'grid':>6}  {'crops':>5}  {'tokens':>6}")
        for row in im["by_num_crops"]:
            grid = f"{row['grid'][0]}×{row['grid'][1]}"
            mark = "  ← chosen" if row["num_crops"] == chosen else ""
            lines.append(f"  {row['num_crops']:>9}  {grid:>6}  {row['crops']:>5}  {row['tokens']:>6}{mark}")
    p = model["parameters"]
    where = (model["config_source"] + ": sizes of the published Phi-3-vision config"
             if model["estimated"] else "config from " + model["config_source"])
    lines.append(f"model: {model['model']} ({where})")
    lines.append(f"  parameters: {human_count(p['total'])} (decoder {human_count(p['decoder'])}, "
                 f"vision {human_count(p['vision'])}, projector {human_count(p['projector'])})")
    lines.append(f"  weights in {model['dtype']}: {human_bytes(model['weights_bytes'])} "
                 f"({model['weights_bytes'] / 1e9:.2f} GB)")
    per_tok = model["kv_cache_bytes_per_token"]
    kv = f"  KV cache: {human_bytes(per_tok)} per token"
    total_tokens = sum(next(r["tokens"] for r in im["by_num_crops"] if r["num_crops"] == chosen)
                       for im in images)
    if images:
        kv += f"; the image tokens at --num-crops {chosen} ({total_tokens}) take {human_bytes(per_tok * total_tokens)}"
    lines.append(kv)
    lines.append(f"  context: {model['context_length']} tokens; default --num-crops {model['default_num_crops']}")
    return "\n".join(lines)


def run_info(args) -> int:
    from .images import open_cli_images
    from .output import print_json

    from .info_video import format_video_plan, video_plan
    from .video import is_video_argument

    model = model_info(args.model, args.dtype, args.device)
    chosen = args.num_crops or model["default_num_crops"]
    crops = sorted(set(STANDARD_NUM_CROPS) | {chosen, model["default_num_crops"]})
    videos = [video_plan(args, a, find_config_files(args.model))  # docs/video.md
              for a in args.images if is_video_argument(a)]
    paths = [a for a in args.images if not is_video_argument(a)]
    images = [image_info(im.label, im.image, crops, im.format) for im in open_cli_images(paths)]
    if args.json:
        print_json({"images": images, "model": model, "num_crops": chosen,
                    **({"videos": videos} if videos else {})})
    else:
        print("\n".join([format_info(images, model, chosen)]
                        + [format_video_plan(v, args.model, human_bytes) for v in videos]))
    return 0


EXAMPLES = """examples:
  phi3v info photo.jpg
  phi3v info a.png b.png --num-crops 4 --dtype bfloat16
  phi3v info --model microsoft/Phi-3.5-vision-instruct --json
  phi3v info clip.mp4 --frames 16 --dtype bfloat16 --quantize int4   (a video's frames, tokens, memory)"""


def register(sub, name: str) -> None:
    p = sub.add_parser(name, parents=[model_parent(), output_parent(), video_parent()],
                       help="image sizes, crops, token counts, model memory",
                       description="Without loading the model: each image's size, its crop grid and "
                                   "token count at each --num-crops, and the model's parameter count "
                                   "and memory for the chosen dtype.",
                       epilog=EXAMPLES, formatter_class=HelpFormatter)
    p.add_argument("images", nargs="*", metavar="IMAGE", help="file path, - for stdin, or http(s) URL; "
                   "a video file or a folder of frames: its plan (frames, tokens, KV cache, peak memory)")
    p.add_argument("--json", action="store_true", help="print the facts as one JSON object")
    g = p.add_argument_group("video plan")
    g.add_argument("-p", "--prompt", default=None, metavar="QUESTION",
                   help="the question the plan counts (default: phi3v video's description prompt)")
    add_option_flag(g, OPTION_BY_NAME["max_new_tokens"])
    p.set_defaults(func=run_info)
