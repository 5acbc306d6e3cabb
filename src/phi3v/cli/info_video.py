"""`phi3v info clip.mp4 --frames 16`: a video question's plan without loading the model.

The frames that would be chosen (index, time), the tokens per frame and in all, the prompt's
tokens, the KV cache and the estimated peak memory for the model, --dtype and --quantize, and
whether it fits the context: engine.request_plan.plan_video_request, from the model's config and
tokenizer only (a local folder's, or the published configuration and the bundled tokenizer).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from .. import tasks


def video_plan(args, source: str, config_files: tuple) -> dict:
    """The plan of asking args.prompt (default: the video description) about `source`.
    config_files: info.find_config_files(args.model) (config.json, preprocessor_config.json or None)."""
    from ..engine.config import Phi3VConfig
    from ..engine.devices import resolve_dtype
    from ..engine.facts import published_config
    from ..engine.frame_select import FrameSelection
    from ..engine.request_plan import plan_video_request
    from ..engine.tokenizer import Tokenizer
    from ..engine.vision import DEFAULT_VISION_CHUNK
    from .arguments import video_kwargs

    cfg_dict, pre, _ = config_files
    cfg = published_config(args.model) if cfg_dict is None else Phi3VConfig.from_dicts(cfg_dict, pre)
    folder = Path(args.model).expanduser()
    if (folder / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_dir(folder)
    else:  # the real Phi-3-vision tokenizer, bundled (the same for both published models)
        tokenizer = Tokenizer.from_file(importlib.resources.files("phi3v") / "assets" / "tokenizer" / "tokenizer.json")
    prompt = args.prompt or tasks.VIDEO_DESCRIBE_PROMPT
    plan = plan_video_request(cfg, tokenizer, source, FrameSelection(**video_kwargs(args)), prompt,
                              dtype=resolve_dtype(args.dtype, args.device), quantize=args.quantize,
                              max_new_tokens=args.max_tokens, num_crops=args.num_crops,
                              vision_chunk=DEFAULT_VISION_CHUNK,  # crops per CLIP call (phi3v.load's default)
                              context=args.ctx)
    out = plan.video.to_dict()
    out.update({"prompt_tokens": plan.prompt_tokens, "new_tokens": plan.new_tokens, "context": plan.context,
                "fits": plan.fits, "frames_that_fit": plan.frames_that_fit, "memory": plan.memory.to_dict()})
    return out


def format_video_plan(v: dict, model: str, human_bytes) -> str:
    """The plan as text; human_bytes: the byte formatter of info.py (bytes -> "1.50 GiB")."""
    frames = v["frames"]
    tokens = sorted({f["tokens"] for f in frames})
    each = str(tokens[0]) if len(tokens) == 1 else f"{tokens[0]}-{tokens[-1]}"
    rot = f", rotation {v['rotation']}°" if v["rotation"] else ""
    lines = [f"{v['source']}: {v['kind']}, {v['width']}×{v['height']}{rot}, {v['frame_count']} frames, "
             f"{v['duration_s']:.3f} s",
             f"  {len(frames)} frames at num_crops {v['num_crops']}: {each} tokens per frame, "
             f"{v['image_tokens']} image tokens",
             f"  {'#':>4}  {'frame':>6}  {'time':>10}  {'tokens':>6}"]
    for k, f in enumerate(frames, 1):
        lines.append(f"  {k:>4}  {f['index']:>6}  {f['time_s']:>9.3f}s  {f['tokens']:>6}")
    m = v["memory"]
    quant = f", {m['quantize']}" if m["quantize"] else ""
    lines.append(f"plan with {model} ({m['dtype']}{quant}): prompt {v['prompt_tokens']} tokens "
                 f"+ up to {v['new_tokens']} new, context {v['context']}")
    lines.append(f"  KV cache: {m['kv_cache_slots']} positions, {human_bytes(m['kv_cache_bytes'])}")
    lines.append(f"  weights: {human_bytes(m['weights_bytes'])}; pixels {human_bytes(m['pixel_bytes'])}; "
                 f"image features {human_bytes(m['feature_bytes'])}")
    lines.append(f"  vision: {m['vision_chunk_crops']} crops per call, ~{human_bytes(m['vision_chunk_bytes'])} "
                 f"of activations; prefill ~{human_bytes(m['prefill_bytes'])}")
    lines.append(f"  estimated peak memory: {human_bytes(m['peak_bytes'])}")
    if not v["fits"]:
        lines.append(f"  does not fit: {v['prompt_tokens']} prompt tokens + 1 > context {v['context']}; "
                     f"at most {v['frames_that_fit']} frames fit")
    return "\n".join(lines)
