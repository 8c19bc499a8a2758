"""Attention and encode kernels over TurboQuant codes.

``torch_*`` functions (``reference.py``) are the specification and the CPU path;
``triton_*`` functions (``triton_attention.py``, imported lazily so that
``import turboquant`` never needs Triton) are fused GPU kernels with the same
signatures; ``cuda_quantized_attention`` (``cuda_attention.py``) is the warp-level
CUDA C++ decode kernel, built at first use. :func:`quantized_attention` picks one by
:class:`~turboquant.config.Backend`.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch

from ..codec import decode_mse, reconstruction_norms
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
        if on_gpu and triton_available() and not interpret:
            return Backend.CUDA if os.environ.get("TURBOQUANT_DISABLE_CUDA") != "1" else Backend.TRITON
        return Backend.CPU if device.type == "cpu" else Backend.TORCH
    if backend in (Backend.TRITON, Backend.CUDA) and not triton_available():
        raise TurboQuantError(f"backend={backend.value!r} needs the 'triton' package (pip install triton)")
    return backend


def quantized_attention(
    *args: Any, backend: Backend | str = Backend.AUTO, compressed_length: torch.Tensor | None = None, **kwargs: Any
) -> torch.Tensor:
    """Dispatch to :func:`torch_quantized_attention` or one of its compiled twins (same arguments).

    ``AUTO``: the CUDA decode kernel on CUDA tensors (then Triton, then torch for inputs it does
    not cover), the C kernel on CPU tensors (then torch).

    ``compressed_length`` (a 0-d integer tensor, for static buffers under CUDA graphs): attend only
    the first ``compressed_length`` compressed tokens; ``mask`` then covers the full-precision
    tokens only. The CUDA kernel reads the count on the device; other backends get the equivalent
    full mask (:func:`~turboquant.kernels.layout.length_mask`).
    """
    query: torch.Tensor = args[0] if args else kwargs["query"]
    chosen = resolve_backend(backend, query.device)
    if compressed_length is not None and chosen is not Backend.CUDA:
        args, kwargs = _with_length_mask(args, kwargs, compressed_length)
    if chosen is Backend.CUDA:
        from .cuda_attention import cuda_quantized_attention  # falls back to Triton (one warning if it cannot build)

        if compressed_length is not None:
            kwargs["compressed_length"] = compressed_length
        return cuda_quantized_attention(*args, **kwargs)
    if chosen is Backend.TRITON:
        from .triton_attention import triton_quantized_attention  # falls back to torch for unsupported inputs

        return triton_quantized_attention(*args, **kwargs)
    if chosen is Backend.CPU:
        return cpu_quantized_attention(*args, **kwargs)  # falls back to the reference for inputs it does not cover
    return torch_quantized_attention(*args, **kwargs)


_MASK_ARG = 6  # position of ``mask`` in the attention functions' signature


def _with_length_mask(args: tuple[Any, ...], kwargs: dict[str, Any], compressed_length: torch.Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments with ``mask`` (over the full-precision tokens) replaced by the full mask of ``compressed_length``."""
    from .layout import length_mask
    from .reference import attention_shapes

    names = ("query", "keys", "values", "full_keys", "full_values")
    parts = [args[i] if i < len(args) else kwargs.get(name) for i, name in enumerate(names)]
    _, _, _, _, n, w, _ = attention_shapes(parts[0], parts[1], parts[2], parts[3], None)
    window = args[_MASK_ARG] if len(args) > _MASK_ARG else kwargs.get("mask")
    full = length_mask(n, compressed_length, window, w)
    if len(args) > _MASK_ARG:
        return (*args[:_MASK_ARG], full, *args[_MASK_ARG + 1 :]), kwargs
    return args, {**kwargs, "mask": full}


def quantize_into(
    x: torch.Tensor,
    config: QuantizerConfig,
    codes: torch.Tensor,
    norms: torch.Tensor,
    start: int,
    backend: Backend | str = Backend.AUTO,
    *,
    norm_correction: bool = False,
    offset: torch.Tensor | None = None,
) -> QuantizedVectors:
    """Quantize ``x [*R, T, d]`` (minus ``offset [*R, d]``, if given) into preallocated ``codes [*R, S_cap,
    code_bytes]`` / ``norms [*R, S_cap]`` at ``start``.

    Dispatches to :func:`~turboquant.kernels.encode.torch_quantize_into`, its fused Triton twin, or
    (``CUDA``, the default on GPUs) :func:`~turboquant.kernels.cuda_encode.cuda_quantize_into`.
    ``norm_correction`` then rescales the written norms to ``‖x‖/‖ŷ‖``
    (:func:`turboquant.codec.reconstruction_norms`), decoding only the written slice. ``offset`` (float32) is
    subtracted in float32; the CUDA encode does it inside the kernel (a bfloat16 ``x`` is then read as it is).

    Returns:
        :class:`QuantizedVectors` views of the written slice, batch shape ``[*R, T]``.
    """
    chosen = resolve_backend(backend, x.device)
    if chosen is Backend.CUDA:
        from .cuda_encode import cuda_quantize_into  # corrects norms in the kernel; else Triton

        return cuda_quantize_into(x, config, codes, norms, start, offset=offset, norm_correction=norm_correction)
    if offset is not None:
        x = x.float() - offset.float().unsqueeze(-2)
    if chosen is Backend.TRITON:
        from .triton_encode import triton_quantize_into  # falls back to torch for unsupported configs

        written = triton_quantize_into(x, config, codes, norms, start)
    else:
        written = torch_quantize_into(x, config, codes, norms, start)
    if norm_correction:
        written.norms.copy_(written.norms.float() / reconstruction_norms(decode_mse(written.codes, config)))
    return written


__all__ = [
    "cpu_quantized_attention",
    "quantize_into",
    "quantized_attention",
    "resolve_backend",
    "torch_quantize_into",
    "torch_quantized_attention",
    "triton_available",
]
