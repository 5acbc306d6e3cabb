"""`phi3v serve --ray [ADDRESS] --replicas N`: the server as replicas on Ray Serve.

This process is only the driver: it connects to (or starts) Ray, starts Serve's HTTP proxy on
--host/--port, deploys the app (server/ray_serve.py: every replica loads its own model with the
same load flags and runs its own engine worker), waits until Ctrl-C / SIGTERM, then deletes the
app (and Serve, if no other app is left on the cluster). The model is never loaded here.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

from ..errors import Phi3VError
from .running import missing_extra

STATUS_EVERY_S = 5.0  # how often the driver checks that the app still runs
SIGNAL_POLL_S = 0.2  # how soon a Ctrl-C or SIGTERM is acted on


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("replicas on Ray Serve (needs the 'ray' extra)")
    g.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="serve with Ray Serve: without ADDRESS a new local Ray instance (stopped on exit); "
                        "with `auto` or HOST:PORT (e.g. 10.0.0.5:6379) the Ray cluster there. --host/--port "
                        "are then those of Serve's HTTP proxy (one on every node running a replica)")
    g.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="model replicas, each its own model and continuous batch (default 1; needs --ray)")
    g.add_argument("--ray-cpus-per-replica", type=float, default=1.0, metavar="N",
                   help="CPUs each replica reserves, also its torch threads on CPU (default 1); a GPU "
                        "replica also reserves one GPU")


def run_on_ray(args: argparse.Namespace, settings) -> int:
    """Deploy and wait; the exit code of `phi3v serve --ray`."""
    if args.ray is None:
        raise Phi3VError("--replicas needs --ray (replicas run on Ray Serve)")
    replicas = 1 if args.replicas is None else args.replicas
    if replicas < 1 or args.ray_cpus_per_replica <= 0:
        raise Phi3VError("--replicas must be >= 1 and --ray-cpus-per-replica > 0")
    try:  # before connecting: a missing extra fails in milliseconds
        import ray
        from ray import serve
    except ModuleNotFoundError as err:
        raise missing_extra(err, "serve --ray", "ray") from None

    from ..server.ray_serve import APP_NAME, deployment

    level = getattr(logging, args.log_level.upper())
    started_here = not ray.is_initialized()
    if started_here:
        # "local": a new instance just for this server (ray.init's meaning of that address).
        ray.init(address=args.ray, logging_level=max(level, logging.WARNING), log_to_driver=True)
    serve_started = False
    try:
        spec, actor_options = replica_plan(args, settings, ray.cluster_resources())
        # Cluster-wide proxy options: taken when Serve starts; a Serve already running keeps its own.
        serve.start(http_options={"host": args.host, "port": args.port})
        serve_started = True
        print(f"phi3v: starting {replicas} replica(s) of {args.model} on Ray Serve ({_describe(actor_options)}) ...",
              file=sys.stderr)
        app = deployment(spec, replicas=replicas, actor_options=actor_options).bind()
        # Returns once every replica has loaded its model and started (or raises if they cannot).
        serve.run(app, name=APP_NAME, route_prefix="/", logging_config={"log_level": args.log_level.upper()})
        shown = f"[{args.host}]" if ":" in args.host else args.host
        print(f"phi3v: serving {args.model} at http://{shown}:{args.port}/ with {replicas} replica(s) on Ray "
              f"Serve (API: /v1/chat/completions; Ctrl-C stops)", file=sys.stderr)
        return _wait(serve)
    finally:
        _tear_down(ray, serve if serve_started else None, APP_NAME, started_here)


def replica_plan(args, settings, resources: dict):
    """(ReplicaSpec, Ray actor options) of one replica, from the model flags and the cluster."""
    from ..server.ray_serve import ReplicaSpec

    gpus = int(resources.get("GPU", 0))
    wants_gpu = args.device.startswith("cuda") or (args.device == "auto" and gpus > 0)
    if wants_gpu and gpus == 0:
        raise Phi3VError(f"--device {args.device} asks for a GPU per replica but the Ray cluster has none")
    # Ray sets CUDA_VISIBLE_DEVICES per actor: the replica's one GPU is always "cuda" (cuda:0) there.
    device = "cuda" if wants_gpu else ("cpu" if args.device == "auto" else args.device)
    cpus = args.ray_cpus_per_replica
    # A local folder is passed by absolute path: replicas do not share the driver's working folder
    # (on other machines the folder must exist at the same path; a hub id is downloaded per node).
    model = os.path.abspath(args.model) if os.path.isdir(args.model) else args.model
    spec = ReplicaSpec(model=model, device=device, dtype=None if args.dtype in (None, "auto") else args.dtype,
                       settings=settings, quantize=args.quantize, low_memory=args.low_memory,
                       revision=getattr(args, "revision", None), torch_threads=max(1, int(cpus)))
    return spec, {"num_cpus": cpus, "num_gpus": 1 if wants_gpu else 0}


def _describe(actor_options: dict) -> str:
    gpu = ", 1 GPU" if actor_options.get("num_gpus") else ""
    return f"{actor_options['num_cpus']:g} CPU{gpu} each"


def _wait(serve) -> int:
    """Block until Ctrl-C or SIGTERM (0), or until the app is gone from the cluster (1).

    The signals only set a flag that this loop reads: a KeyboardInterrupt raised while the main
    thread is inside Ray's client code (serve.status()) can be swallowed there, and the command
    then never stopped (seen in the test suite: no exit 60 s after Ctrl-C)."""
    from ..server.ray_serve import APP_NAME

    stop = []

    def on_signal(signum, frame):
        stop.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        next_check = time.monotonic() + STATUS_EVERY_S
        while not stop:
            time.sleep(SIGNAL_POLL_S)
            if not stop and time.monotonic() >= next_check:
                if APP_NAME not in serve.status().applications:  # deleted from elsewhere (`serve shutdown`)
                    print("phi3v: the Ray Serve app was removed from the cluster; exiting", file=sys.stderr)
                    return 1
                next_check = time.monotonic() + STATUS_EVERY_S
        print("phi3v: stopping the replicas ...", file=sys.stderr)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _tear_down(ray, serve, app_name: str, started_here: bool) -> None:
    """Remove what this command deployed; other apps on a shared cluster keep running."""
    try:
        if serve is not None and ray.is_initialized():
            if app_name in serve.status().applications:
                serve.delete(app_name)
            if not serve.status().applications:  # Serve was only ours: stop its controller and proxies
                serve.shutdown()
    except Exception as err:  # the cluster is gone or unreachable: nothing left to clean here
        print(f"phi3v: could not remove the Ray Serve app ({type(err).__name__}: {err})", file=sys.stderr)
    finally:
        if started_here:
            ray.shutdown()  # disconnects; a local instance started by ray.init stops with it
