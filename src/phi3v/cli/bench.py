"""`phi3v bench`: phi3v (bf16, int8, int4) vs transformers and OpenVINO on the same full-size weights.

Without --model it writes a random full-size checkpoint once (about 8.3 GB, in --data-dir) and its
int8/int4 copies; nothing is downloaded.  The OpenVINO variants convert it to IR once (into
--data-dir/openvino-ir/; needs `pip install 'phi3v[openvino]'`, else they are skipped with a note).
Each variant runs in its own process, one at a time.
"""

from __future__ import annotations

import argparse
import sys

from ..bench.variants import DEFAULT_VARIANTS, VARIANTS
from .arguments import HelpFormatter
from .running import run_alone

EPILOG = """measured per variant: load time, RSS after load and peak RSS; image preprocessing; the
vision tower on 1, 5 and 17 crops; time to first token for one image at num_crops 4 and 16;
prefill tokens/s; decode tokens/s over 128 tokens at a short context and with 2,048 cached
tokens; time to first token of a follow-up question in the same chat.  Medians (min-max) of the
repeats; ratios are vs transformers bf16 (higher = phi3v better), and each phi3v variant vs its
OpenVINO peer (bf16/int8/int4), with the precisions OpenVINO actually ran (inference, KV cache).

examples:
  phi3v bench --quick                      # a few minutes: fewer repeats, smaller workloads
  phi3v bench --out bench.json             # the full run (long on a small CPU)
  phi3v bench -m ./Phi-3-vision-128k-instruct --variants phi3v-bf16,transformers-bf16
  phi3v bench --variants phi3v-int4,openvino-int4 --quick
"""


def register(sub, name: str) -> None:
    p = sub.add_parser(name, help="benchmark phi3v against transformers on the same weights",
                       description=__doc__.split("\n\n")[0], epilog=EPILOG, formatter_class=HelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None,
                   help="checkpoint folder or hub id (default: a random full-size checkpoint in --data-dir)")
    p.add_argument("--data-dir", default=None,
                   help="where the random and quantized checkpoints live (default: $PHI3V_BENCH_DIR "
                        "or ~/.cache/phi3v/bench)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated, from {', '.join(VARIANTS)} (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="one repeat, smaller workloads (for development)")
    p.add_argument("--repeats", type=int, default=None, help="samples of the cheap metrics (default 3)")
    p.add_argument("--heavy-repeats", type=int, default=None,
                   help="samples of vision on 17 crops, TTFT and follow-up (default 3)")
    p.add_argument("--decode-tokens", type=int, default=None, help="tokens per decode sample (default 128)")
    p.add_argument("--threads", type=int, default=None, help="torch (and OpenVINO) threads (default: torch's)")
    p.add_argument("--vision-all", action="store_true",
                   help="also measure vision and TTFT for int8/int4 (their vision tower is bf16 too)")
    p.add_argument("--out", default=None, metavar="FILE.json", help="write the full report as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks on errors")


def run(args) -> int:
    from ..bench.runner import run_benchmark

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    report = run_benchmark(args.model, data_dir=args.data_dir, variants=[v.strip() for v in args.variants.split(",")
                                                                          if v.strip()],
                           quick=args.quick, repeats=args.repeats, heavy_repeats=args.heavy_repeats,
                           decode_tokens=args.decode_tokens, threads=args.threads, vision_all=args.vision_all,
                           out_json=args.out, log=log)
    print(report["table"])
    if args.out:
        log(f"wrote {args.out}")
    return 0 if report["variants"] else 1


def main(argv=None) -> int:
    """`python -m phi3v.cli.bench ARGS` = `phi3v bench ARGS`."""
    return run_alone(register, "bench", argv)


if __name__ == "__main__":
    sys.exit(main())
