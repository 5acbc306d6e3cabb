"""The W8A8 activation quantizer and output scaling in C (w8a8_rows.c): built with the system
compiler, called via ctypes.

Why: the per-token quantization in torch takes five passes with temporaries and costs as much as
the int8 GEMM itself on CLIP's small layers; the C loop reads each row once while it is in cache.
The epilogue (y * sx per row + bias) is one pass in C where torch needs two.
Built like phi3v.kernels.native (same compiler, cache folder and PHI3V_NATIVE=0 switch; flags from
/proc/cpuinfo: AVX-512 or AVX2 or none), the first time a W8A8 model loads (`prepare()`), cached
under $PHI3V_CACHE_DIR/native keyed by the source, flags and compiler.  Anything that fails ->
`quantize_rows()` returns None and the caller uses the torch version (identical bytes).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from ..kernels import native

_SOURCE = Path(__file__).with_name("w8a8_rows.c")
_FLAGS = ["-O3", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off"]
_ISA_FLAGS = (({"avx512f", "avx512bw"}, ["-mavx512f", "-mavx512bw"]), ({"avx2", "fma"}, ["-mavx2"]))
_lock = threading.Lock()
_fn = None  # phi3v_w8a8_quantize_rows
_scale_fn = None  # phi3v_w8a8_scale_rows
_tried = False


def prepare() -> bool:
    """Build (or find in the cache) and load the quantizer now; True when usable."""
    return _load() is not None


def _isa_flags() -> list[str]:
    flags = native._cpu_flags()
    for needed, extra in _ISA_FLAGS:
        if needed <= flags:
            return extra
    return []


def _build() -> Path:
    flags = _FLAGS + _isa_flags()
    cc = native._compiler()
    key = hashlib.sha256(_SOURCE.read_bytes() + " ".join(flags).encode()
                         + native._compiler_identity(cc).encode()).hexdigest()[:16]
    target = native._cache_dir() / f"w8a8-rows-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, str(_SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-500:]}")
        os.replace(tmp, target)  # atomic: a concurrent builder's file is equally good
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load():
    global _fn, _scale_fn, _tried
    if _tried:
        return _fn
    with _lock:
        if not _tried:
            why = native._unsupported_reason()  # PHI3V_NATIVE=0, not x86-64 Linux, ...
            if not why:
                try:
                    lib = ctypes.CDLL(str(_build()))
                    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
                    fn, scale = lib.phi3v_w8a8_quantize_rows, lib.phi3v_w8a8_scale_rows
                    fn.argtypes, fn.restype = [p, i32, p, p, i64, i64, i32], i32
                    scale.argtypes, scale.restype = [p, i32, p, p, i64, i64, i32], i32
                    _fn, _scale_fn = fn, scale
                except Exception as err:  # noqa: BLE001 - any build/load problem means "use torch"
                    warnings.warn(f"W8A8 activation quantizer not built ({err}); using torch", RuntimeWarning,
                                  stacklevel=3)
            _tried = True
    return _fn


def reset_for_tests() -> None:
    global _fn, _scale_fn, _tried
    with _lock:
        _fn, _scale_fn, _tried = None, None, False


def quantize_rows(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(u8 (M, K), sx (M, 1) float32) as w8a8_kernel.quantize_rows computes them, or None when the
    C quantizer is not available or does not take this input (then use the torch version)."""
    if x2.device.type != "cpu" or x2.dtype not in (torch.bfloat16, torch.float32) or x2.dim() != 2:
        return None
    fn = _load()
    if fn is None:
        return None
    x2 = x2.contiguous()
    M, K = x2.shape
    q = torch.empty(M, K, dtype=torch.uint8)
    sx = torch.empty(M, 1, dtype=torch.float32)
    rc = fn(x2.data_ptr(), int(x2.dtype == torch.bfloat16), q.data_ptr(), sx.data_ptr(), M, K,
            torch.get_num_threads())
    return (q, sx) if rc == 0 else None


def scale_rows(y: torch.Tensor, sx: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """In place: y (M, N) = y * sx (M, 1) (+ bias (N,)), in fp32 and rounded once to y's dtype.
    True when done; False when the C code is not available or does not take the input (the
    caller then does it in torch)."""
    if (_load() is None or y.device.type != "cpu" or y.dtype not in (torch.bfloat16, torch.float32)
            or y.dim() != 2 or not y.is_contiguous() or sx.dtype != torch.float32 or not sx.is_contiguous()
            or sx.numel() != y.shape[0]):
        return False
    if bias is not None:
        bias = bias.to(y.dtype).contiguous()
        if bias.numel() != y.shape[1]:
            return False
    rc = _scale_fn(y.data_ptr(), int(y.dtype == torch.bfloat16), sx.data_ptr(),
                   None if bias is None else bias.data_ptr(), y.shape[0], y.shape[1], torch.get_num_threads())
    return rc == 0
