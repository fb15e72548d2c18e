"""Compiling and caching the package's C libraries (the fused epilogue, the sliding-window kernel).

:func:`compile_library` builds a C source with the system C compiler (``$CC``, else ``cc``/``gcc``) and
OpenMP — which resolves to the OpenMP runtime torch has already loaded, so both share one thread pool — and
caches the library under :func:`cache_dir`, keyed by the source, the flags, the compiler and the CPU.  Where
no compiler is found, the build fails, or ``LEMMSE_RAY_FUSED=0`` (:func:`enabled`), the callers fall back to
the pure-torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings

FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fPIC", "-shared"]


def _cpu_key() -> str:
    """What the compiled code depends on besides source and flags: architecture and CPU features."""
    key = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            return key + next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:  # no /proc/cpuinfo (not Linux): the architecture alone names the build
        return key


def compiler() -> str | None:
    """The C compiler used: ``$CC`` if set, else ``cc`` or ``gcc`` on PATH (None: none found)."""
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"])
    return shutil.which("cc") or shutil.which("gcc")


def compile_library(cc: str | None, cache_dir: str, name: str, source: str,
                    signatures: dict[str, tuple[list, type | None]]) -> ctypes.CDLL | None:
    """Compile (or reuse) the C library ``source`` with ``cc`` in ``cache_dir`` (file ``name-<digest>.so``) and
    set the ``argtypes`` and ``restype`` of its functions from ``signatures`` (symbol → (argtypes, restype));
    None (with a warning) if that is impossible."""
    if cc is None:
        return None
    digest = hashlib.sha256("\0".join([source, *FLAGS, _cpu_key(), cc]).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"{name}-{digest}.so")
    try:
        if not os.path.exists(path):
            os.makedirs(cache_dir, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
                src = os.path.join(tmp, f"{name}.c")
                with open(src, "w") as f:
                    f.write(source)
                out = os.path.join(tmp, f"{name}.so")
                subprocess.run([cc, *FLAGS, src, "-o", out, "-lm"], check=True, capture_output=True, timeout=120)
                os.replace(out, path)  # atomic: concurrent builders (Ray workers) never see half a file
        lib = ctypes.CDLL(path)
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", b"") or b""
        warnings.warn(f"lemmse_ray: the compiled {name} is unavailable ({err}; "
                      f"{detail.decode(errors='replace')[:300]}); using the pure-torch path", stacklevel=3)
        return None
    for symbol, (argtypes, restype) in signatures.items():
        fn = getattr(lib, symbol)
        fn.argtypes, fn.restype = argtypes, restype
    return lib


def cache_dir() -> str:
    """Where compiled libraries are cached: ``$LEMMSE_RAY_CACHE``, default ``~/.cache/lemmse_ray``."""
    return os.environ.get("LEMMSE_RAY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lemmse_ray")


def enabled() -> bool:
    """Compiled kernels are used unless ``LEMMSE_RAY_FUSED=0``."""
    return os.environ.get("LEMMSE_RAY_FUSED", "1") != "0"
