"""`phi3v serve --ray` waits for Ctrl-C/SIGTERM while polling the Serve app's status: a signal that
arrives while Ray's client code runs must still stop it (Ray's client code can swallow a
KeyboardInterrupt; the loop then never ended). No Ray cluster: a stand-in for `serve`."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from phi3v.cli import serve_ray
from phi3v.server.ray_serve import APP_NAME


class SwallowingServe:
    """serve.status() that takes a while and swallows a KeyboardInterrupt raised inside it."""

    def __init__(self):
        self.calls = 0

    def status(self):
        self.calls += 1
        try:
            time.sleep(0.2)
        except KeyboardInterrupt:
            pass
        return type("Status", (), {"applications": {APP_NAME: object()}})()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_a_status_call_stops_the_wait(monkeypatch, sig):
    monkeypatch.setattr(serve_ray, "STATUS_EVERY_S", 0.0)  # the loop is inside status() most of the time
    fake = SwallowingServe()
    before = signal.getsignal(sig)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), sig))
    timer.start()
    guard = threading.Timer(10.0, os.kill, (os.getpid(), signal.SIGKILL))  # a hung loop must not hang the suite
    guard.start()
    try:
        started = time.monotonic()
        assert serve_ray._wait(fake) == 0
        assert time.monotonic() - started < 3.0 and fake.calls >= 1
    finally:
        guard.cancel()
        timer.cancel()
    assert signal.getsignal(sig) is before, "the previous handler is back"


def test_the_wait_ends_when_the_app_is_gone(monkeypatch):
    monkeypatch.setattr(serve_ray, "STATUS_EVERY_S", 0.0)
    gone = type("Serve", (), {"status": lambda self: type("S", (), {"applications": {}})()})()
    assert serve_ray._wait(gone) == 1
