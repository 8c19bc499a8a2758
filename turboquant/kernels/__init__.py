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

from ..config import Backend, TurboQuantError
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
    """Dispatch to :func:`torch_quantized_attention` or its Triton twin (same arguments)."""
    query: torch.Tensor = args[0] if args else kwargs["query"]
    chosen = resolve_backend(backend, query.device)
    if chosen is Backend.TRITON:
        from .triton_attention import triton_quantized_attention

        return triton_quantized_attention(*args, **kwargs)
    return torch_quantized_attention(*args, **kwargs)


__all__ = ["quantized_attention", "resolve_backend", "torch_quantized_attention", "triton_available"]
