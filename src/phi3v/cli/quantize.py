"""`phi3v quantize SOURCE OUTPUT --scheme int4`: write a weight-only quantized checkpoint.

The output folder keeps the official layout (config.json, tokenizer, safetensors shards) with the
scheme recorded in config.json under "phi3v_quantization"; `phi3v ... -m OUTPUT` and
`phi3v.load(OUTPUT)` load it quantized directly.  The source is read one tensor at a time, so the
command needs little memory (about one shard of output).
"""

from __future__ import annotations

import argparse
import sys
import time

from ..errors import Phi3VError
from .arguments import HelpFormatter
from .output import note
from .running import run_alone

EPILOG = """schemes:
  int8   per output channel, symmetric (about 4.3 GB for Phi-3-vision)
  int4   per group of --group-size inputs, asymmetric (about 2.9 GB); the fastest decode on CPU
  w8a8   int8 weights as int8, CLIP tower included (--vision implied); loaded, prefill and vision
         also quantize activations per token (int8 x int8 GEMM, docs/performance.md)

The decoder's linear layers are quantized; embeddings, lm_head, norms and (unless --vision) the
CLIP tower and projector keep the source dtype.

examples:
  phi3v quantize microsoft/Phi-3-vision-128k-instruct phi3v-int4 --scheme int4
  phi3v quantize ./Phi-3.5-vision-instruct ./phi35v-int8 --scheme int8
  phi3v ask -m phi3v-int4 photo.jpg -p "What is in this picture?"
"""


def register(sub, name: str) -> None:
    p = sub.add_parser(name, help="write an int8 / int4 weight-only quantized checkpoint",
                       description=__doc__.split("\n\n")[0], epilog=EPILOG, formatter_class=HelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="float checkpoint: a local folder or a hub id")
    p.add_argument("output", nargs="?", default=None,
                   help="folder to write (must not exist or be empty; default: $PHI3V_HOME/models/NAME-SCHEME, "
                        "which `phi3v list` shows and --model NAME-SCHEME finds)")
    p.add_argument("--scheme", choices=("int8", "int4", "w8a8"), required=True, help="quantization scheme")
    p.add_argument("--group-size", type=int, default=None, metavar="N",
                   help="int4: inputs per scale/zero pair, a power of two >= 16 (default 128)")
    p.add_argument("--vision", action="store_true", help="also quantize the CLIP tower's layers (the projector stays float)")
    p.add_argument("--shard-size-gb", type=float, default=2.0, metavar="GB",
                   help="largest output shard (default 2)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks on errors")


def run(args) -> int:
    from ..engine.hub import resolve_model_dir
    from ..quant.checkpoint import quantize_checkpoint
    from ..quant.layers import QuantConfig

    if args.scheme in ("int8", "w8a8") and args.group_size is not None:
        raise Phi3VError(f"--group-size applies to int4 only ({args.scheme} is per output channel)")
    if args.shard_size_gb <= 0:
        raise Phi3VError("--shard-size-gb must be positive")
    qc = QuantConfig(args.scheme, args.group_size, vision=args.vision or args.scheme == "w8a8")
    src = resolve_model_dir(args.source, progress=not args.quiet)
    show = not args.quiet and sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if show:
            print(f"\rquantizing tensor {done}/{total}", end="", file=sys.stderr, flush=True)

    start = time.perf_counter()
    output = args.output or default_output(args.source, args.scheme)  # $PHI3V_HOME/models/NAME-SCHEME
    out = quantize_checkpoint(src, output, qc, shard_bytes=int(args.shard_size_gb * 2**30), progress=progress)
    if show:
        print(file=sys.stderr)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    if not args.quiet:
        note(f"wrote {qc.label()} checkpoint {out} ({size / 2**30:.2f} GiB) in {time.perf_counter() - start:.1f}s")
    print(out)
    return 0


def default_output(source: str, scheme: str):
    """$PHI3V_HOME/models/<the source's last name>-<scheme> (cli/local_models.py)."""
    from .local_models import models_dir

    name = source.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1] or "model"
    return models_dir() / f"{name}-{scheme}"


def main(argv=None) -> int:
    """`python -m phi3v.cli.quantize ARGS` = `phi3v quantize ARGS`."""
    return run_alone(register, "quantize", argv)


if __name__ == "__main__":
    sys.exit(main())
