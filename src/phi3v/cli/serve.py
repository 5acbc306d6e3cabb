"""The `serve` subcommand: load the model once, then run the app under uvicorn.

phi3v/cli.py calls `register(subparsers, common)`, where `common` is the parent parser that
carries --model/--device/--dtype/--num-crops. `python -m phi3v.server` uses the same code with a
parent parser of its own, so the server also runs without the main CLI.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys

LOOPBACK = "127.0.0.1"


EPILOG = """examples:
  phi3v serve --model microsoft/Phi-3.5-vision-instruct            # http://127.0.0.1:8000/
  phi3v serve --model ./my-checkpoint --num-crops 4 --api-key s3cret --max-queue 8
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "Phi-3.5-vision-instruct", "messages": [{"role": "user", "content": "Hi"}]}'
"""


def register(subparsers, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    extra = {}
    try:  # the main CLI's formatter keeps the examples' layout
        from .main import HelpFormatter

        extra["formatter_class"] = HelpFormatter
    except ImportError:
        extra["formatter_class"] = argparse.RawDescriptionHelpFormatter
    parser = subparsers.add_parser(
        "serve", parents=[common], help="run the OpenAI-compatible server and its web page",
        description="Serve POST /v1/chat/completions (OpenAI-compatible, images as data: URIs), "
                    "GET /v1/models, GET /health and a chat web page at /. The model loads once, at start-up.",
        epilog=EPILOG, **extra)
    add_serve_arguments(parser)
    parser.set_defaults(func=run_serve)
    return parser


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default=LOOPBACK,
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    g.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    g.add_argument("--api-key", default=os.environ.get("PHI3V_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1/* (default: $PHI3V_API_KEY, else none)")
    g.add_argument("--allow-remote-images", action="store_true",
                   help="let clients send http(s) image URLs, fetched by the server with a timeout and "
                        "size cap (default: data: URIs only)")
    g.add_argument("--max-images", type=_positive, default=8, metavar="N",
                   help="images per request, over all messages (default 8)")
    g.add_argument("--max-queue", type=_positive, default=16, metavar="N",
                   help="requests waiting for the model; more get 429 + Retry-After (default 16)")
    g.add_argument("--max-body-mb", type=_positive_float, default=20.0, metavar="N",
                   help="largest request body in MiB; larger ones get 413 (default 20)")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level (default info)")


def settings_from_args(args: argparse.Namespace):
    from ..server.settings import ServerSettings

    return ServerSettings(
        api_key=args.api_key or None,
        allow_remote_images=args.allow_remote_images,
        max_images=args.max_images,
        max_queue=args.max_queue,
        max_body_bytes=int(args.max_body_mb * 2**20),
        default_num_crops=getattr(args, "num_crops", None),
    )


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..server import create_app

    settings = settings_from_args(args)
    if not _is_loopback(args.host) and settings.api_key is None:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach this port can use "
              f"the model", file=sys.stderr)
    print(f"phi3v: loading {args.model} ...", file=sys.stderr)
    model = _load(args)
    app = create_app(model, settings)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"phi3v: serving {model.name} at http://{shown}:{args.port}/  (API: /v1/chat/completions)",
          file=sys.stderr)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


def _load(args):
    try:
        from .main import load_model_from_args  # same loading (dtype "auto", progress rules) as the CLI
    except ImportError:
        import phi3v

        dtype = None if getattr(args, "dtype", None) in (None, "auto") else args.dtype
        return phi3v.load(args.model, device=getattr(args, "device", "auto") or "auto", dtype=dtype)
    return load_model_from_args(args)


def main(argv=None) -> int:
    """`python -m phi3v.server`: the serve subcommand on its own (through the main CLI when present)."""
    try:
        from .main import main as cli_main
    except ImportError:
        return _standalone_main(argv)
    return cli_main(["serve", *(sys.argv[1:] if argv is None else argv)])


def _standalone_main(argv=None) -> int:
    import phi3v

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=phi3v.DEFAULT_MODEL, help="hub id or local checkpoint folder")
    common.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    common.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bfloat16 on GPU, float32 on CPU)")
    common.add_argument("--num-crops", type=int, default=None, help="default HD crops per image (1-64)")
    parser = argparse.ArgumentParser(prog="python -m phi3v.server", parents=[common],
                                     description="phi3v OpenAI-compatible server")
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_serve(args)
    except phi3v.Phi3VError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value
