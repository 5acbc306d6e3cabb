"""Native decode kernels: built with the system C compiler while a model loads, called via ctypes.

Why: one-token decode is bound by memory bandwidth, and torch's CPU paths for a (1, K) x (K, N)
product (oneDNN bf16 GEMM, the int8/int4 weight-only kernels) leave a large part of it unused on
AVX-512 CPUs without AMX.  These kernels stream each weight row once (see kernels.c).

Builds of the same entry points, chosen from `/proc/cpuinfo`: kernels_avx512.c (AVX-512 BF16:
VDPBF16PS dot products, e.g. Zen 4, Sapphire Rapids) and kernels_avx2.c (AVX2 + FMA, float32
arithmetic: most laptop CPUs); where the CPU has AMX tiles (amx_tile, amx_bf16) the AVX-512 build
adds int4 x 2-64 rows on them ("avx512amx", int4_amx.h; if the compiler or Linux refuses AMX the
plain avx512bf16 build is used, silently).  PHI3V_NATIVE_ISA=avx2|avx512bf16|avx512amx forces one
(tests use it to run the AVX2 build on an AVX-512 machine).  They need x86-64 Linux, a C compiler (`$CC` or cc) and
PHI3V_NATIVE unset or not "0".  Anything else -> `available()` is False and the callers keep their
torch paths; a failed build is reported once as a warning, never an error.  The library is cached
under $PHI3V_CACHE_DIR or ~/.cache/phi3v/native, keyed by the sources, the flags and the compiler
binary (its resolved path, size and modification time: a compiler upgrade changes them, and no
process is started to find a cached build), and written atomically so parallel processes can
build it together.

When: `prepare()` builds (or finds in the cache) and loads the library; engine.loader calls it
while loading a model for the CPU, so the first request does not pay for a build.  Any other
entry point does the same on its first call if nobody prepared the kernels before.

Python entry points take torch tensors and return the result, or None where the kernels do not
take the input (the caller then uses torch):
  gemv_bf16(w (N, K) bf16, x (M, K))                          -> (M, N)
  gemv_int8(qweight (N, K) int8, scales (N,) fp32, x (M, K))  -> (M, N)
  gemv_int4(qweight (N, K/2) uint8, scales, zeros (N, K/G) bf16, x (M, K), G) -> (M, N)
  dequant_int4_bf16(...), dequant_int8_bf16(...)              -> (N, K) bf16 (a reused buffer)
  decode_attention(q (B, H, 1, D), k_buf, v_buf (B, KVH, cap, D), length) -> (B, H, 1, D), all bf16
M is at most MAX_ROWS (8), for gemv_int4 int4_max_rows() (64 with the avx512amx build: 2-64 rows on AMX
tiles, int4_amx.h); results come back in x's dtype (bf16 or fp32).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

MAX_ROWS = 8
# int4 on AMX tiles (the avx512amx build): from AMX_MIN_ROWS to AMX_MAX_ROWS input rows; one row
# stays on the streaming AVX-512 kernel (a single weight stream per thread is fastest there)
AMX_MIN_ROWS = 2
AMX_MAX_ROWS = 64
_HERE = Path(__file__).parent
_COMMON_FLAGS = ["-O3", "-shared", "-fPIC", "-fopenmp"]
# name -> (source, compiler flags, /proc/cpuinfo flags it needs), best first
_AVX512_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma"]
_AVX512_CPU = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "fma"}
ISAS = {
    # the AVX-512 BF16 build plus int4 x 2-64 rows on AMX tiles (int4_amx.h); falls back to
    # avx512bf16 when the compiler lacks -mamx-* or Linux refuses the tile state
    "avx512amx": ("kernels_avx512.c", _AVX512_FLAGS + ["-mamx-tile", "-mamx-bf16", "-DPHI3V_AMX=1"],
                  _AVX512_CPU | {"amx_tile", "amx_bf16"}),
    "avx512bf16": ("kernels_avx512.c", _AVX512_FLAGS, _AVX512_CPU),
    "avx2": ("kernels_avx2.c", ["-mavx2", "-mfma"], {"avx2", "fma"}),
}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_isa = ""
_tried = False
_why_not = ""


def prepare() -> bool:
    """Build the kernels or find them in the cache, and load them, now (once per process).
    True when they are usable here; otherwise `why_unavailable()` says why and torch is used."""
    return _load() is not None


def available() -> bool:
    """True when the kernels are built (building them on the first call) and usable here."""
    return _load() is not None


def why_unavailable() -> str:
    """A short reason when `available()` is False ('' when it is True)."""
    _load()
    return _why_not


def isa() -> str:
    """The build in use: "avx512bf16", "avx2", or "" when none is."""
    _load()
    return _isa


def int4_group_ok(group_size: int) -> bool:
    """Whether the int4 kernel of the build in use takes this group size (a multiple of the
    inputs one step unpacks: 64 for AVX-512 BF16, 16 for AVX2)."""
    return available() and group_size % (64 if _isa.startswith("avx512") else 16) == 0


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _cache_dir() -> Path:
    root = os.environ.get("PHI3V_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "phi3v")
    return Path(root) / "native"


def _compiler() -> str:
    return os.environ.get("CC", "cc")


def _compiler_identity(cc: str) -> str:
    """The compiler binary behind `cc` ("cc" is usually a chain of links to gcc or clang): its real
    path, size and modification time.  Stat calls only, no process: this runs at every start."""
    found = shutil.which(cc)
    if found is None:
        raise RuntimeError(f"C compiler {cc!r} not found (set CC or install gcc/clang)")
    real = os.path.realpath(found)
    st = os.stat(real)
    return f"{real}:{st.st_size}:{st.st_mtime_ns}"


def _build(name: str) -> Path:
    """The `name` kernels' library in the cache, compiled first when missing (once per
    sources/flags/compiler binary); the .so path."""
    source, flags, _ = ISAS[name]
    flags = _COMMON_FLAGS + flags
    cc = _compiler()
    text = b"".join((_HERE / f).read_bytes() for f in (source, "common.h", "attention_driver.h", "int4_amx.h"))
    key = hashlib.sha256(text + " ".join(flags).encode() + _compiler_identity(cc).encode()).hexdigest()[:16]
    target = _cache_dir() / f"kernels-{name}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, str(_HERE / source), "-o", tmp], capture_output=True, text=True,
                              timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-800:]}")
        os.replace(tmp, target)  # atomic: a concurrent builder's file is equally good
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    signatures = {
        "phi3v_gemv_bf16": [p, p, p, i64, i64, i64, i32, i32],
        "phi3v_gemv_int8": [p, p, p, p, i64, i64, i64, i32, i32],
        "phi3v_gemv_int4": [p, p, p, p, p, p, i64, i64, i64, i64, i32, i32],
        "phi3v_dequant_int4_bf16": [p, p, p, p, i64, i64, i64, i32],
        "phi3v_dequant_int8_bf16": [p, p, p, i64, i64, i32],
        "phi3v_decode_attention": [p, p, p, p, i64, p, i64, i64, i64, i64, i64, i64, ctypes.c_float, i32],
        "phi3v_isa": [],
    }
    for name, args in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int


def _declare_amx(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.phi3v_amx_init.argtypes, lib.phi3v_amx_init.restype = [], ctypes.c_int
    fn = lib.phi3v_gemv_int4_amx
    fn.argtypes, fn.restype = [p, p, p, p, p, p, i64, i64, i64, i64, i32, i32], ctypes.c_int


def _load() -> ctypes.CDLL | None:
    global _lib, _isa, _tried, _why_not
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        name, _why_not = _choose_isa()
        if name == "avx512amx":  # optional extra: any problem -> the plain AVX-512 BF16 build
            try:
                lib = ctypes.CDLL(str(_build(name)))
                _declare(lib)
                _declare_amx(lib)
                if lib.phi3v_amx_init() == 0:
                    _lib, _isa = lib, name
            except Exception:  # noqa: BLE001 - e.g. a compiler without -mamx-tile
                pass
            name = "" if _lib is not None else "avx512bf16"
        if name:
            try:
                lib = ctypes.CDLL(str(_build(name)))
                _declare(lib)
                _lib, _isa = lib, name
            except Exception as err:  # noqa: BLE001 - any build/load problem means "use torch"
                _why_not = f"native kernels could not be built ({err}); using torch's kernels"
                warnings.warn(_why_not, RuntimeWarning, stacklevel=3)
        _tried = True
    return _lib


def _choose_isa() -> tuple[str, str]:
    """(build name, '') or ('', why none can be used here)."""
    if os.environ.get("PHI3V_NATIVE", "1").strip() == "0":
        return "", "disabled by PHI3V_NATIVE=0"
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return "", f"no native kernels for {sys.platform}/{platform.machine()}"
    forced = os.environ.get("PHI3V_NATIVE_ISA", "").strip().lower()
    if forced and forced not in ISAS:
        return "", f"PHI3V_NATIVE_ISA={forced!r} is not one of {', '.join(ISAS)}"
    cpu = _cpu_flags()
    missing: set[str] = set()
    for name in [forced] if forced else list(ISAS):
        missing = ISAS[name][2] - cpu
        if not missing:
            return name, ""
    return "", f"this CPU lacks {', '.join(sorted(missing))}"


def _unsupported_reason() -> str:
    """Why no build can be used here, before trying to compile ('' when one can)."""
    return _choose_isa()[1]


def reset_for_tests(enabled: bool | None = None) -> None:
    """Forget the loaded state (tests flip PHI3V_NATIVE between runs)."""
    global _lib, _isa, _tried, _why_not
    with _lock:
        _lib, _isa, _tried, _why_not = None, "", False, ""
        if enabled is not None:
            os.environ["PHI3V_NATIVE"] = "1" if enabled else "0"


# ---------------------------------------------------------------------------------------------
# tensor wrappers


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _rows_ok(x: torch.Tensor, most: int = MAX_ROWS) -> bool:
    return x.device.type == "cpu" and x.dim() == 2 and 1 <= x.shape[0] <= most and x.dtype in (
        torch.bfloat16, torch.float32)


def _out(x: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    y = torch.empty(x.shape[0], n, dtype=x.dtype)
    return y, int(x.dtype == torch.bfloat16)


def _bf16_activations(x: torch.Tensor) -> torch.Tensor:
    """x rounded to bf16, in the dtype the build reads (bf16 for AVX-512 BF16, float32 for AVX2)."""
    xb = x.to(torch.bfloat16)
    return (xb if _isa.startswith("avx512") else xb.float()).contiguous()


def gemv_bf16(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    lib = _load()
    if lib is None or not _rows_ok(x) or w.dtype != torch.bfloat16 or not w.is_contiguous():
        return None
    N, K = w.shape
    xb = _bf16_activations(x)
    y, y_bf16 = _out(x, N)
    rc = lib.phi3v_gemv_bf16(_ptr(w), _ptr(xb), _ptr(y), xb.shape[0], N, K, y_bf16, torch.get_num_threads())
    return y if rc == 0 else None


def gemv_int8(qweight: torch.Tensor, scales: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """scales: float32 (N,) contiguous."""
    lib = _load()
    if lib is None or not _rows_ok(x):
        return None
    N, K = qweight.shape
    xf = x.to(torch.float32).contiguous()
    y, y_bf16 = _out(x, N)
    rc = lib.phi3v_gemv_int8(_ptr(qweight), _ptr(scales), _ptr(xf), _ptr(y), xf.shape[0], N, K, y_bf16,
                             torch.get_num_threads())
    return y if rc == 0 else None


def gemv_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, x: torch.Tensor,
              group_size: int) -> torch.Tensor | None:
    """qweight (N, K/2) portable nibbles; scales, zeros bf16 (N, K/G) contiguous."""
    lib = _load()
    block = 64 if _isa.startswith("avx512") else 16  # inputs whose nibbles one step unpacks
    if lib is None or group_size % block:
        return None
    if _isa == "avx512amx" and AMX_MIN_ROWS <= x.shape[0] <= AMX_MAX_ROWS and _rows_ok(x, AMX_MAX_ROWS):
        return _gemv_int4_amx(lib, qweight, scales, zeros, x, group_size)
    if not _rows_ok(x):
        return None
    N, K = qweight.shape[0], qweight.shape[1] * 2
    M = x.shape[0]
    xb = _bf16_activations(x)
    # Per block of inputs: [evens | odds], matching the low/high nibbles of block/2 bytes.
    xp = xb.reshape(M, K // block, block // 2, 2).transpose(2, 3).contiguous()
    xs = xb.float().reshape(M, K // group_size, group_size).sum(-1)  # (M, K/G) of the bf16 values
    y, y_bf16 = _out(x, N)
    rc = lib.phi3v_gemv_int4(_ptr(qweight), _ptr(scales), _ptr(zeros), _ptr(xp), _ptr(xs), _ptr(y), M, N, K,
                             group_size, y_bf16, torch.get_num_threads())
    return y if rc == 0 else None


def _gemv_int4_amx(lib: ctypes.CDLL, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   x: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """gemv_int4 for 2-64 rows on AMX tiles (int4_amx.h): same inputs, same numerics."""
    N, K = qweight.shape[0], qweight.shape[1] * 2
    M = x.shape[0]
    xb = x.to(torch.bfloat16)
    # Per 64 inputs [32 evens | 32 odds] (the two A-tile rows one 32-byte load unpacks to), then
    # tile B's pair layout: (K/2, M, 2)
    xp = xb.reshape(M, K // 64, 32, 2).transpose(2, 3)
    xt = xp.reshape(M, K // 2, 2).transpose(0, 1).contiguous()
    xs = xb.float().reshape(M, K // group_size, group_size).sum(-1).t().contiguous()  # (K/G, M)
    y, y_bf16 = _out(x, N)
    rc = lib.phi3v_gemv_int4_amx(_ptr(qweight), _ptr(scales), _ptr(zeros), _ptr(xt), _ptr(xs), _ptr(y), M, N, K,
                                 group_size, y_bf16, torch.get_num_threads())
    return y if rc == 0 else None


def int4_max_rows() -> int:
    """Most input rows gemv_int4 takes with the build in use (64 with AMX tiles, else MAX_ROWS)."""
    return AMX_MAX_ROWS if isa() == "avx512amx" else MAX_ROWS


_scratch = threading.local()


def _weight_scratch(N: int, K: int) -> torch.Tensor:
    """A reused (N, K) bf16 buffer for dequantized weights (one per thread, grown as needed).
    Fresh 100 MB allocations per layer would cost more in page faults than the dequantization."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < N * K:
        buf = _scratch.buf = torch.empty(N * K, dtype=torch.bfloat16)
    return buf[: N * K].view(N, K)


def dequant_int4_bf16(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      group_size: int) -> torch.Tensor | None:
    """(N, K) bf16 weight in a per-thread scratch buffer: valid until the next dequant_* call."""
    lib = _load()
    if lib is None:
        return None
    N, K = qweight.shape[0], qweight.shape[1] * 2
    out = _weight_scratch(N, K)
    rc = lib.phi3v_dequant_int4_bf16(_ptr(qweight), _ptr(scales), _ptr(zeros), _ptr(out), N, K, group_size,
                                     torch.get_num_threads())
    return out if rc == 0 else None


def dequant_int8_bf16(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """scales: float32 (N,) contiguous.  Same scratch-buffer rule as dequant_int4_bf16."""
    lib = _load()
    if lib is None:
        return None
    N, K = qweight.shape
    out = _weight_scratch(N, K)
    rc = lib.phi3v_dequant_int8_bf16(_ptr(qweight), _ptr(scales), _ptr(out), N, K, torch.get_num_threads())
    return out if rc == 0 else None


def decode_attention(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, length: int,
                     key_valid: torch.Tensor | None = None) -> torch.Tensor | None:
    """One new token's attention over slots [0, length) of a bf16 KV cache (scale 1/sqrt(D)).
    key_valid (B, >= length) bool: False hides a slot from that row (a batch's left padding)."""
    lib = _load()
    if lib is None or q.dtype != torch.bfloat16 or k_buf.dtype != torch.bfloat16 or q.device.type != "cpu":
        return None
    if not (k_buf.is_contiguous() and v_buf.is_contiguous()):
        return None
    B, H, _, D = q.shape
    KVH, cap = k_buf.shape[1], k_buf.shape[2]
    valid_ptr, stride = None, 0
    if key_valid is not None:
        if key_valid.shape[0] != B or key_valid.shape[-1] < length:
            return None
        if key_valid.dtype not in (torch.bool, torch.uint8):  # bool is one byte of 0/1 already
            key_valid = key_valid.to(torch.uint8)
        key_valid = key_valid.contiguous()  # a (B, 1, 1, S) mask's [:, 0, 0] is: no copy per layer
        valid_ptr, stride = _ptr(key_valid), key_valid.shape[-1]
    qc = q.contiguous()
    out = torch.empty(B, H, 1, D, dtype=torch.bfloat16)
    rc = lib.phi3v_decode_attention(_ptr(qc), _ptr(k_buf), _ptr(v_buf), valid_ptr, stride, _ptr(out), B, H, KVH,
                                    cap, D, length, D**-0.5, torch.get_num_threads())
    return out if rc == 0 else None
