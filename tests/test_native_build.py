"""When and how phi3v.kernels.native finds its library: prepare() builds once, a cached build is
found without starting a process (no `cc --version` at every start), and the cache key follows the
compiler binary."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from phi3v.kernels import native


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    if native._unsupported_reason():
        pytest.skip(native._unsupported_reason())
    monkeypatch.setenv("PHI3V_CACHE_DIR", str(tmp_path))
    native.reset_for_tests()
    yield tmp_path
    monkeypatch.undo()
    native.reset_for_tests()


def test_a_cached_build_is_found_without_starting_a_process(fresh_native, monkeypatch):
    if not native.prepare():
        pytest.skip(native.why_unavailable())
    built = list((fresh_native / "native").glob("kernels-*.so"))
    assert len(built) == 1
    native.reset_for_tests()  # a new process, as far as the module knows

    started = []
    real_run = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: started.append(a[0]) or real_run(*a, **k))
    assert native.prepare() and native.isa()
    assert started == []  # neither the compiler nor `cc --version`
    assert list((fresh_native / "native").glob("kernels-*.so")) == built


def test_prepare_reports_an_unusable_compiler_once(fresh_native, monkeypatch):
    monkeypatch.setenv("CC", str(fresh_native / "no-such-compiler"))
    native.reset_for_tests()
    with pytest.warns(RuntimeWarning, match="not found"):
        assert not native.prepare()
    assert "no-such-compiler" in native.why_unavailable()
    assert not native.prepare()  # remembered: no second attempt, no second warning


def test_the_cache_key_follows_the_compiler_binary(tmp_path):
    cc = shutil.which(native._compiler())
    if cc is None:
        pytest.skip("no C compiler here")
    link = tmp_path / "cc-link"
    os.symlink(cc, link)
    assert native._compiler_identity(str(link)) == native._compiler_identity(cc)  # same binary
    copy = tmp_path / "cc-copy"
    copy.write_bytes(b"#!/bin/sh\nexit 1\n")
    copy.chmod(0o755)
    assert native._compiler_identity(str(copy)) != native._compiler_identity(cc)
