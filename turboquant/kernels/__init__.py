"""Attention and encode kernels over TurboQuant codes.

``torch_*`` functions (``reference.py``) are the specification and the CPU path;
``triton_*`` functions (``triton_attention.py``, imported lazily so that
``import turboquant`` never needs Triton) are fused GPU kernels with the same
signatures. :func:`quantized_attention` picks one by :class:`~turboquant.config.Backend`.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch

from ..config import Backend, QuantizerConfig, TurboQuantError
from ..quantizer import QuantizedVectors
from .cpu_attention import cpu_quantized_attention
from .encode import torch_quantize_into
from .reference import torch_quantized_attention


def triton_available() -> bool:
    """True when Triton is importable (CUDA, or CPU with ``TRITON_INTERPRET=1``)."""
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: Backend | str, device: torch.device) -> Backend:
    """Turn ``AUTO`` into a concrete backend for tensors on ``device``."""
    backend = Backend(backend)
    if backend is Backend.AUTO:
        on_gpu = device.type == "cuda"
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        return Backend.TRITON if (on_gpu and triton_available() and not interpret) else Backend.TORCH
    if backend is Backend.TRITON and not triton_available():
        raise TurboQuantError("backend='triton' needs the 'triton' package (pip install triton)")
    return backend


def quantized_attention(*args: Any, backend: Backend | str = Backend.AUTO, **kwargs: Any) -> torch.Tensor:
    """Dispatch to :func:`torch_quantized_attention` (on CPU tensors its compiled twin
    :func:`~turboquant.kernels.cpu_attention.cpu_quantized_attention`) or the Triton kernel (same arguments)."""
    query: torch.Tensor = args[0] if args else kwargs["query"]
    chosen = resolve_backend(backend, query.device)
    if chosen is Backend.TRITON:
        from .triton_attention import triton_quantized_attention  # falls back to torch for unsupported inputs

        return triton_quantized_attention(*args, **kwargs)
    if query.device.type == "cpu":
        # compiled decode kernel; falls back to the reference for inputs it does not cover
        return cpu_quantized_attention(*args, **kwargs)
    return torch_quantized_attention(*args, **kwargs)


def quantize_into(
    x: torch.Tensor,
    config: QuantizerConfig,
    codes: torch.Tensor,
    norms: torch.Tensor,
    start: int,
    backend: Backend | str = Backend.AUTO,
) -> QuantizedVectors:
    """Quantize ``x [*R, T, d]`` into preallocated ``codes [*R, S_cap, code_bytes]`` / ``norms [*R, S_cap]`` at ``start``.

    Dispatches to :func:`~turboquant.kernels.encode.torch_quantize_into` or its fused Triton twin.
    """
    if resolve_backend(backend, x.device) is Backend.TRITON:
        from .triton_encode import triton_quantize_into  # falls back to torch for unsupported configs

        return triton_quantize_into(x, config, codes, norms, start)
    return torch_quantize_into(x, config, codes, norms, start)


__all__ = [
    "cpu_quantized_attention",
    "quantize_into",
    "quantized_attention",
    "resolve_backend",
    "torch_quantize_into",
    "torch_quantized_attention",
    "triton_available",
]
