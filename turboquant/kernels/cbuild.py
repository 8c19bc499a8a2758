"""Build a C source of this package into a shared library at first use, and load it with ``ctypes``.

One helper for every CPU kernel (``_cpu_attention.c``, ``_cpu_scan.c``): the system C compiler
(``$CC``, else ``cc``/``gcc``/``clang``) with ``-O3 -march=native``, the result cached under
``cache_dir()/cpu_kernels`` by a digest of the source, the flags and the CPU's feature flags (a
library built for one instruction set is never loaded on another). ``TURBOQUANT_NO_CEXT=1``
disables every C kernel; callers then use their fallback. Compiling is atomic (temp file +
``os.replace``), so concurrent processes never load a half-written library.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from ..config import cache_dir

logger = logging.getLogger(__name__)

CFLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-fPIC", "-shared", "-pthread")

_lock = threading.Lock()
_loaded: dict[tuple[str, tuple[str, ...]], ctypes.CDLL | None] = {}
_errors: dict[tuple[str, tuple[str, ...]], str] = {}


def machine_key() -> str:
    """Identifies the instruction set a library is built for (``-march=native``)."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = line
                    break
    except OSError:
        pass
    return f"{platform.machine()}|{flags}"


def _compile(source: Path, flags: tuple[str, ...], target: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise OSError("no C compiler found (cc, gcc or clang)")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [compiler, *flags, str(source), "-o", tmp, "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            raise OSError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _source_bytes(source: Path) -> bytes:
    """The source and the local headers it includes (``#include "x.h"``): editing a header rebuilds too."""
    text = source.read_bytes()
    local = re.findall(rb'^\s*#include\s+"([^"]+)"', text, flags=re.MULTILINE)
    return text + b"".join((source.parent / name.decode()).read_bytes() for name in local)


def load_c_library(
    source: Path, declare: Callable[[ctypes.CDLL], None], extra_flags: tuple[str, ...] = (), what: str = "C kernel"
) -> ctypes.CDLL | None:
    """The library built from ``source`` with :data:`CFLAGS` + ``extra_flags``, or None.

    ``declare(lib)`` sets the functions' ``argtypes``/``restype``. None when ``TURBOQUANT_NO_CEXT=1``
    or building fails; the reason is logged once (naming ``what`` and the fallback is the
    caller's business) and kept for :func:`build_error`. Each (source, flags) is built and loaded once.
    """
    key = (str(source), tuple(extra_flags))
    if key in _loaded:
        return _loaded[key]
    with _lock:
        if key in _loaded:
            return _loaded[key]
        lib: ctypes.CDLL | None = None
        if os.environ.get("TURBOQUANT_NO_CEXT") == "1":
            _errors[key] = "disabled by TURBOQUANT_NO_CEXT=1"
        else:
            flags = (*CFLAGS, *extra_flags)
            try:
                digest = hashlib.sha256(_source_bytes(source) + " ".join(flags).encode() + machine_key().encode())
                target = cache_dir() / "cpu_kernels" / f"{source.stem.lstrip('_')}_{digest.hexdigest()[:16]}.so"
                if not target.exists():
                    _compile(source, flags, target)
                lib = ctypes.CDLL(str(target))
                declare(lib)
            except (OSError, subprocess.SubprocessError, AttributeError) as exc:
                lib = None
                _errors[key] = str(exc)
                logger.warning("turboquant: %s unavailable, using the fallback (%s)", what, exc)
        _loaded[key] = lib
        return lib


def build_error(source: Path, extra_flags: tuple[str, ...] = ()) -> str | None:
    """Why the library of ``source`` is not in use (None when loaded or not tried yet)."""
    return _errors.get((str(source), tuple(extra_flags)))


__all__ = ["CFLAGS", "build_error", "load_c_library", "machine_key"]
