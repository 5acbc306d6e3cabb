#!/usr/bin/env bash
# Set up a development / test environment in .venv: phi3v (editable) with its test, server and
# Ray extras, and Debian's Chromium for the web-page test. Safe to run again.
#
# torch is pinned to 2.13.0: on the project's machines that is the CPU build lying on disk
# (an unpinned torch would pull a multi-GB CUDA build). Override with PHI3V_TORCH_SPEC.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
TORCH_SPEC=${PHI3V_TORCH_SPEC:-torch==2.13.0}

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q -e ".[test,server,ray]"

# Chromium for tests/test_web_page.py (Debian package; never a downloaded browser build).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: chromium is not installed; the web-page test needs it (apt-get install chromium)" >&2
  fi
fi
echo "environment ready: .venv"
