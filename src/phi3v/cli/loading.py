"""Loading the model a command names (--model, --device, --dtype, --quantize, --low-memory)."""

from __future__ import annotations

import sys
import time

from .local_models import find_in_models_dir
from .output import Spinner, is_tty, note


def load_model_from_args(args):
    """phi3v.load with the model options; the seconds loading took are left in `args.load_s`.

    The model is first resolved to a folder (a hub download shows huggingface_hub's progress
    bars), then loaded from that folder under a spinner with the elapsed time (phi3v.load's
    model_dir: resolved once). Bars and spinner only for a person watching a terminal.
    """
    import phi3v

    from ..engine.devices import resolve_device
    from ..engine.hub import resolve_model_dir

    resolve_device(args.device)  # --device cuda without CUDA: said before a download, not after 8 GB
    dtype = None if args.dtype in (None, "auto") else args.dtype
    show = not getattr(args, "quiet", False) and is_tty(sys.stderr)
    revision = getattr(args, "revision", None)
    local = find_in_models_dir(args.model)  # a quantized copy in $PHI3V_HOME/models, by its name
    if local is not None:
        args.model = str(local)
    folder = resolve_model_dir(args.model, progress=show, revision=revision)
    start = time.perf_counter()
    with Spinner(f"loading {args.model}", enabled=show):
        model = phi3v.load(args.model, device=args.device, dtype=dtype, progress=show, revision=revision,
                           quantize=getattr(args, "quantize", None), low_memory=getattr(args, "low_memory", None),
                           model_dir=folder, max_context=getattr(args, "ctx", None),
                           image_cache_mb=getattr(args, "image_cache_mb", 512))
    args.load_s = time.perf_counter() - start
    if getattr(args, "verbose", False):
        note(f"loaded {model.name} on {model.device} ({weights_kind(model)}) in {args.load_s:.2f}s")
    return model


def weights_kind(model) -> str:
    """"bfloat16", or "int4 (group 128) weights, bfloat16 compute" for a quantized model (--quantize
    or a `phi3v quantize` checkpoint): the decoder's weights are not in the compute dtype then."""
    compute = dtype_name(model.dtype)
    quantization = getattr(getattr(model, "module", None), "quantization", None)
    return compute if quantization is None else f"{quantization.label()} weights, {compute} compute"


def dtype_name(dtype) -> str:
    """torch.bfloat16 -> "bfloat16"."""
    return str(dtype).replace("torch.", "")
