"""Compile a CUDA C++ kernel of this package at first use and cache it (``torch.utils.cpp_extension``).

One helper for every CUDA kernel (``cuda_attention.cu``, ``cuda_encode.cu``): nvcc with the
device's own architecture (``sm_90a`` on Hopper), a build directory under ``cache_dir()`` named
by a digest of the sources, so torch rebuilds only when they change. A failed build is
remembered (no second compile attempt in the process) and re-raised, or (``load_or_warn``) turned
into one warning and None, so that the caller falls back to its Triton kernel.
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import cache_dir


def arch_flags(device: torch.device) -> tuple[str, list[str]]:
    """``(tag, nvcc flags)`` for the device's compute capability."""
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) == (9, 0):  # sm_90a: Hopper's own code (the plain sm_90 pass is not needed)
        return "sm90a", ["-gencode=arch=compute_90a,code=sm_90a"]
    cc = f"{major}{minor}"
    return f"sm{cc}", [f"-gencode=arch=compute_{cc},code=sm_{cc}"]


class CudaExtension:
    """A ``load_inline`` extension built from one ``.cu`` file (+ headers) and a C++ binding.

    ``modules`` / ``failed`` are keyed by ``tune`` (whether ``-DTQ_TUNE`` adds the benchmark's
    extra launch variants).
    """

    def __init__(
        self,
        stem: str,
        source: Path,
        headers: Sequence[Path],
        binding: str,
        functions: Sequence[str],
        what: str,
        fallback: str,
        check: Callable[[Any], None] | None = None,
    ) -> None:
        self.check = check  # run once on the loaded module; an exception counts as a failed build
        self.stem, self.source, self.headers = stem, source, tuple(headers)
        self.binding, self.functions = binding, list(functions)
        self.what, self.fallback = what, fallback  # for the one warning of load_or_warn
        self.modules: dict[bool, Any] = {}
        self.failed: dict[bool, str] = {}
        self._warned = False
        self._lock = threading.Lock()

    def load(self, device: torch.device | None = None, tune: bool = False) -> Any:
        """Compile (first use) and load; raise on failure (the same error again on later calls)."""
        with self._lock:
            if tune in self.modules:
                return self.modules[tune]
            if tune in self.failed:
                raise RuntimeError(self.failed[tune])
            from torch.utils.cpp_extension import load_inline

            dev = device or torch.device("cuda", torch.cuda.current_device())
            arch, flags = arch_flags(dev)
            text = self.source.read_text()
            parts = [text, *(h.read_text() for h in self.headers), self.binding]
            digest = hashlib.sha256("".join(parts).encode()).hexdigest()[:12]
            name = f"{self.stem}_{arch}_{'tune_' if tune else ''}{digest}"
            build = cache_dir() / name
            build.mkdir(parents=True, exist_ok=True)
            cflags = ["-O3", "-std=c++17", *flags] + (["-DTQ_TUNE"] if tune else [])
            try:
                mod = load_inline(
                    name=name,
                    cpp_sources=[self.binding],
                    cuda_sources=[text],
                    functions=self.functions,
                    extra_cuda_cflags=cflags,
                    extra_cflags=["-O2"],
                    extra_include_paths=[str(self.source.parent)],
                    build_directory=str(build),
                    verbose=False,
                )
                if self.check is not None:
                    self.check(mod)
            except Exception as exc:  # compiler missing or failing, or the check refused it: remembered, the caller falls back
                self.failed[tune] = f"{type(exc).__name__}: {str(exc)[-2000:]}"
                raise
            self.modules[tune] = mod
            return mod

    def load_or_warn(self, device: torch.device | None = None, tune: bool = False) -> Any | None:
        """:meth:`load`, or None when the build fails (one ``RuntimeWarning`` per extension: the caller falls back)."""
        try:
            return self.load(device, tune)
        except Exception as exc:  # noqa: BLE001 - any build failure means: fall back, warn once
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"turboquant: the {self.what} could not be built ({str(exc)[:300]}); using {self.fallback} instead",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return None


__all__ = ["CudaExtension", "arch_flags"]
