"""`phi3v serve`: load the model once, then run the OpenAI-compatible app under uvicorn.

The server's flags come from the fields of phi3v.server.settings.ServerSettings (one flag per
setting, see `setting` there); --host, --port and --log-level are uvicorn's, not the app's.
`python -m phi3v.server ARGS` is `phi3v serve ARGS`.

The order of start-up (cli/listen_socket.py): the optional extras are checked, then the socket is
bound, then the model loads, then "serving at URL" is printed and uvicorn takes the socket over.
Exit status: 0 stopped by SIGTERM (after the drain), 1 an error (a missing extra, a busy port, a
model that does not load, a server that did not start), 2 a usage error (a bad --port...), 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import sys
from dataclasses import fields

from ..server.settings import ServerSettings
from .arguments import HelpFormatter, model_parent, number, output_parent, with_default
from .listen_socket import bind_listener, port_number, socket_url
from .configuration import configurable
from .loading import load_model_from_args
from .output import print_error
from .running import missing_extra
from .serve_ray import add_arguments as add_ray_arguments

LOOPBACK = "127.0.0.1"

EPILOG = """examples:
  phi3v serve --model microsoft/Phi-3.5-vision-instruct            # http://127.0.0.1:8000/
  phi3v serve --model ./my-checkpoint --num-crops 4 --api-key s3cret --max-queue 8
  phi3v serve --model ./my-checkpoint --ray 10.0.0.5:6379 --replicas 2 --host 0.0.0.0 --api-key s3cret
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "Phi-3.5-vision-instruct", "messages": [{"role": "user", "content": "Hi"}]}'
"""


def register(sub, name: str) -> None:
    parser = sub.add_parser(
        name, parents=[model_parent(), output_parent()], help="run the OpenAI-compatible server and its web page",
        description="Serve POST /v1/chat/completions (OpenAI-compatible, images as data: URIs), "
                    "GET /v1/models, GET /health and a chat web page at /. The model loads once, at start-up.",
        epilog=EPILOG, formatter_class=HelpFormatter)
    g = parser.add_argument_group("server")
    g.add_argument("--host", default=LOOPBACK,
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    g.add_argument("--port", type=port_number, default=8000,
                   help="TCP port, 0-65535; 0 lets the system choose one (default 8000)")
    add_settings_arguments(g)
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level (default info)")
    add_ray_arguments(parser)  # --ray, --replicas: replicas on Ray Serve (cli/serve_ray.py)
    for action in parser._actions:  # PHI3V_HOST, PHI3V_PORT, ... or the config file (cli/configuration.py)
        if action.dest in ("host", "port", "log_level"):
            configurable(action)
    parser.set_defaults(func=run)


def _dest(f) -> str:
    return f.metadata["flag"].lstrip("-").replace("-", "_")


def add_settings_arguments(group) -> None:
    """One flag per ServerSettings field (but those the model options already have: --num-crops)."""
    for f in fields(ServerSettings):
        meta = f.metadata
        if meta["model_option"]:
            continue
        unit = meta["unit"]
        default = os.environ.get(meta["env"]) if meta["env"] else None
        default = f.default if default is None else default
        shown = meta["default_text"] or f"{default / unit:g}"
        help = with_default(meta["help"], shown)
        if isinstance(f.default, bool):  # an on/off setting, off by default
            action = group.add_argument(meta["flag"], dest=_dest(f), action="store_true", help=help)
        elif isinstance(f.default, (int, float)):  # a number; a size in units may have decimals
            kind = float if unit != 1 else type(f.default)
            action = group.add_argument(meta["flag"], dest=_dest(f), type=number(kind, meta["bounds"].scaled(unit)),
                                        default=default if unit == 1 else default / unit, metavar=meta["metavar"],
                                        help=help)
        else:  # text
            action = group.add_argument(meta["flag"], dest=_dest(f), default=default, metavar=meta["metavar"],
                                        help=help, choices=meta.get("choices"))
        configurable(action)  # PHI3V_<DEST> or the config file (cli/configuration.py)


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """ServerSettings from the parsed flags (sizes given in MiB become bytes; "" means none)."""
    values = {}
    for f in fields(ServerSettings):
        value = getattr(args, _dest(f), f.default)
        if value is not None and f.metadata["unit"] != 1:
            value = int(value * f.metadata["unit"])
        values[f.name] = None if value == "" else value
    return ServerSettings(**values)


def served_settings(args: argparse.Namespace) -> ServerSettings:
    """The settings `phi3v serve` runs with: those of the flags, and the Host allow-list's default
    for the address bound (localhost names on loopback, where DNS rebinding is the threat; on any
    other address its names are unknown here, a DNS name or a proxy's: any, unless --allowed-hosts)."""
    settings = settings_from_args(args)
    if not _is_loopback(args.host) and settings.allowed_hosts is None:
        settings = dataclasses.replace(settings, allowed_hosts="*")
    return settings


def run(args: argparse.Namespace) -> int:
    try:  # before the model loads: a missing extra fails in milliseconds
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
        import prometheus_client  # noqa: F401 - /metrics
    except ModuleNotFoundError as err:
        raise missing_extra(err, "serve", "server") from None

    settings = served_settings(args)
    if not _is_loopback(args.host) and settings.api_key is None:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach this port can use "
              f"the model", file=sys.stderr)
    if args.ray is not None or args.replicas is not None:  # replicas on Ray Serve, each loading its own model
        from .serve_ray import run_on_ray

        return run_on_ray(args, settings)
    # Bound before the model loads: a busy port fails at once (exit 1), not after the load.
    listener = bind_listener(args.host, args.port)
    try:
        return _serve(args, settings, listener)
    finally:
        listener.close()


def _serve(args: argparse.Namespace, settings: ServerSettings, listener) -> int:
    from ..server import create_app
    from ..server.connections import uvicorn_config
    from ..server.request_log import configure_logging
    from ..server.shutdown import DrainingServer

    if not args.quiet:
        print(f"phi3v: loading {args.model} ...", file=sys.stderr)
    model = load_model_from_args(args)  # same loading (dtype "auto", progress rules) as the other commands
    app = create_app(model, settings)
    # The socket is bound and listening: a client connecting from now on waits in its backlog.
    print(f"phi3v: serving {model.name} at {socket_url(listener)}  (API: /v1/chat/completions)",
          file=sys.stderr)
    # --log-format json: every line one JSON object, uvicorn's too (server/request_log.py).
    log_options = configure_logging(args.log_level, settings.log_format)
    # Limits and deadlines of connections (server/connections.py): header and keep-alive timeouts,
    # at most --max-connections, bounded header size.
    # SIGTERM drains first (server/shutdown.py): new requests get 503, those in flight get
    # --shutdown-timeout-s to finish; then the process exits 0.
    server = DrainingServer(uvicorn_config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           **log_options), app.state.lifecycle)
    server.run(sockets=[listener])
    if not server.started:  # the app's start-up failed (its error is in the log above)
        print_error("the server did not start (see the log above)")
        return 1
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
