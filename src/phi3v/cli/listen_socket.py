"""The listening socket of `phi3v serve`, bound before the model loads.

    port_number("8000") -> 8000        an argparse type: 0-65535 (0: any free port), else a usage error
    bind_listener(host, port) -> socket bound and listening; Phi3VError naming host:port when it cannot
    socket_url(sock) -> "http://127.0.0.1:8000/"   what the socket actually listens on

Binding first means a busy port is found in milliseconds, not after minutes of loading a real model,
and "serving at ..." is printed only once there is a socket to connect to: connections that arrive
while uvicorn starts wait in the socket's backlog. uvicorn is then given the socket (Server.run(sockets=...)).
"""

from __future__ import annotations

import argparse
import errno
import socket

from ..errors import Phi3VError

BACKLOG = 2048  # uvicorn's default backlog


def port_number(text: str) -> int:
    """An argparse type for --port: a whole number from 0 to 65535 (0 lets the system choose)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be between 0 and 65535, got {port}")
    return port


def bind_listener(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) and listening; one clear Phi3VError when that fails."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as err:
        raise Phi3VError(f"cannot listen on {where}: unknown host address {host!r} ({err.strerror})") from None
    sock = socket.socket(family, kind, proto)
    try:
        # As uvicorn does: a restart may bind while old connections sit in TIME_WAIT. On Linux this
        # never lets two servers listen on one port: a busy port still fails below.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as err:
        sock.close()
        reason = err.strerror or str(err)
        if err.errno == errno.EADDRINUSE:
            reason = "the port is already in use (another phi3v serve? choose another --port)"
        elif err.errno == errno.EACCES:
            reason = "permission denied (ports below 1024 need privileges; choose another --port)"
        raise Phi3VError(f"cannot listen on {where}: {reason}") from None
    sock.set_inheritable(True)
    return sock


def socket_url(sock: socket.socket) -> str:
    """http://HOST:PORT/ of a bound socket (the real port when --port 0 let the system choose)."""
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"
