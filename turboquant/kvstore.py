"""Storage of one KV-cache layer, independent of transformers: packed codes and full-precision tokens.

Tensors are ``[B, H, T, ...]`` (transformers' layout); both classes grow along the token axis.
:class:`KVCodes` holds the compressed history (codes + norms in a :class:`~turboquant.buffers.GrowableBuffer`),
:class:`FullPrecisionKV` the sink and window tokens in one preallocated buffer.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch

from .buffers import GrowableBuffer
from .codec import code_bytes, encode
from .config import QuantizerConfig, Variant
from .kernels import quantize_into
from .quantizer import QuantizedVectors

logger = logging.getLogger(__name__)

TOKEN_AXIS = 2  # [B, H, T, ...]


class KVCodes:
    """Packed codes of one tensor (keys or values) of a layer along the token axis.

    Non-finite keys or values are stored as they come (their norms are NaN or Inf): like the
    full-precision cache, they make that sequence's attention output non-finite and leave the
    other sequences of the batch untouched. Norms that would overflow float16 storage promote this
    tensor's norms to float32 (one warning), instead of failing in the middle of a forward.
    """

    def __init__(self, config: QuantizerConfig) -> None:
        self.config = config
        self.buffer = GrowableBuffer(axis=TOKEN_AXIS, min_capacity=256)
        self._view: QuantizedVectors | None = None

    @property
    def length(self) -> int:
        return self.buffer.length

    def encode_append(self, x: torch.Tensor, backend: Any, norm_correction: bool, offset: torch.Tensor | None = None) -> None:
        """Quantize ``x [B, H, T, d]`` (minus ``offset [B, H, d]``) straight into the buffer (fused encode on CUDA).

        MSE codes are written in place by :func:`~turboquant.kernels.quantize_into`; prod codes
        (QJL fields) are encoded by :func:`turboquant.codec.encode` and copied in.
        """
        self._view = None
        if offset is not None and (self.config.variant is not Variant.MSE or (
                self.config.norm_dtype == "float16" and norms_overflow_float16(x, offset))):  # fmt: skip
            x, offset = x.float() - offset.float().unsqueeze(-2), None  # prod codes, or a norm near the float16 limit
        if offset is None:
            self._fit_norms(x)
        norm_dtype = getattr(torch, self.config.norm_dtype)
        if self.config.variant is not Variant.MSE:
            enc = encode(x.float(), self.config)
            parts = {"codes": enc.codes, "norms": enc.norms.to(norm_dtype), "qjl": enc.qjl, "residual_norms": enc.residual_norms}
            self.buffer.append({k: v.to(norm_dtype) if k == "residual_norms" else v for k, v in parts.items() if v is not None})
            return
        b, h, t, _ = x.shape
        self.buffer.reserve(self.length + t, {
            "codes": ((b, h, t, code_bytes(self.config)), torch.uint8, x.device),
            "norms": ((b, h, t), norm_dtype, x.device),
        })  # fmt: skip
        tensors = self.buffer.tensors
        quantize_into(x, self.config, tensors["codes"], tensors["norms"], self.length, backend=backend,
                      norm_correction=norm_correction, offset=offset)
        self.buffer.advance(t)

    def _fit_norms(self, x: torch.Tensor) -> None:
        if self.config.norm_dtype != "float16":
            return
        if not norms_overflow_float16(x):
            return
        logger.warning("turboquant: KV norms above %.0f do not fit float16; storing this layer's norms in float32", FLOAT16_NORM_LIMIT)
        self.config = replace(self.config, norm_dtype="float32")
        self.buffer.apply(lambda t: t.float() if t.is_floating_point() else t)

    def view(self) -> QuantizedVectors:
        if self._view is None:  # rebuilt only when the codes change (decode steps reuse it)
            t = self.buffer.views()
            self._view = QuantizedVectors(self.config, t["codes"], t["norms"], t.get("qjl"), t.get("residual_norms"))
        return self._view

    def apply(self, fn: Any) -> None:
        self._view = None
        self.buffer.apply(fn)

    def truncate(self, length: int) -> None:
        self._view = None
        self.buffer.truncate(length)

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes


class FullPrecisionKV:
    """The full-precision tokens of one tensor (keys or values): ``[sink | window]`` in one buffer.

    New tokens are copied into a preallocated ``[B, H, capacity, d]`` buffer (grown geometrically
    for long prompts); ``tokens`` is a view of the filled part, in chronological order.
    """

    def __init__(self, like: torch.Tensor) -> None:
        self.data = like[:, :, :0]
        self.sink = 0
        self.window = 0

    @property
    def length(self) -> int:
        return self.sink + self.window

    # narrow: the same views as data[:, :, a:b] at a third of the host time (read every layer and step)
    @property
    def tokens(self) -> torch.Tensor:
        return self.data.narrow(2, 0, self.length)

    @property
    def sink_tokens(self) -> torch.Tensor:
        return self.data.narrow(2, 0, self.sink)

    @property
    def window_tokens(self) -> torch.Tensor:
        return self.data.narrow(2, self.sink, self.window)

    def append(self, x: torch.Tensor, to_sink: int, spare: int) -> None:
        """Append ``x [B, H, L, d]``, its first ``to_sink`` tokens to the sink; keep ``spare`` free slots."""
        need = self.length + x.shape[2]
        if need > self.data.shape[2]:
            grown = x.new_empty((*x.shape[:2], max(need + spare, 2 * self.data.shape[2]), x.shape[3]))
            grown[:, :, : self.length] = self.tokens
            self.data = grown
        self.data.narrow(2, self.length, x.shape[2]).copy_(x)
        self.sink += to_sink
        self.window += x.shape[2] - to_sink

    def drop_oldest_window(self, count: int, spare: int = 0) -> None:
        """Forget the ``count`` oldest window tokens (after they were compressed).

        A buffer grown for a long prompt is given back here: when it holds more than twice what
        is left plus ``spare`` free slots, the kept tokens move to a buffer of that size.
        """
        keep = self.window - count
        start = self.sink
        kept = self.data[:, :, start + count : start + self.window]
        if self.data.shape[2] > 2 * (start + keep + spare):
            smaller = self.data.new_empty((*self.data.shape[:2], start + keep + spare, self.data.shape[3]))
            smaller[:, :, :start] = self.data[:, :, :start]
            smaller[:, :, start : start + keep] = kept
            self.data = smaller
        else:  # source and destination overlap: copy through a temporary
            self.data[:, :, start : start + keep] = kept.clone()
        self.window = keep

    def crop(self, remove: int) -> int:
        """Remove up to ``remove`` newest tokens from the window; returns how many were removed."""
        removed = min(remove, self.window)
        self.window -= removed
        return removed

    def crop_sink(self, remove: int) -> None:
        self.sink -= min(remove, self.sink)

    def apply(self, fn: Any) -> None:
        self.data = fn(self.tokens)

    @property
    def nbytes(self) -> int:
        return self.tokens.numel() * self.data.element_size()


# ‖x‖/‖ŷ‖ (norm correction) can exceed ‖x‖ by the reconstruction's shrinkage: float16 norms keep 4x headroom
FLOAT16_NORM_LIMIT = torch.finfo(torch.float16).max / 4


def norms_overflow_float16(x: torch.Tensor, offset: torch.Tensor | None = None) -> bool:
    """Whether a finite row norm of ``x [..., d]`` exceeds :data:`FLOAT16_NORM_LIMIT` (store the norms in float32).

    With ``offset [..., d]`` (one per row of ``x [..., T, d]``): whether ``‖x‖ + ‖offset‖``, a bound on the norm of
    ``x − offset``, may exceed it (True sends the caller to the exact check on the centered vectors).
    """
    norms = torch.linalg.vector_norm(x.float(), dim=-1)
    if offset is not None:
        norms = norms + torch.linalg.vector_norm(offset.float(), dim=-1).unsqueeze(-1)
    return bool((norms[torch.isfinite(norms)] > FLOAT16_NORM_LIMIT).any())


def outlier_scale(keys: torch.Tensor, ratio: float) -> torch.Tensor | None:
    """Per-channel key divisors ``[B, H, d]`` from prompt keys ``[B, H, T, d]`` (see ``KVCacheConfig.key_outlier_ratio``).

    Channels ``j`` and ``j + d/2`` form one RoPE pair (rotate-half convention) and share a divisor,
    so energy that RoPE moves between them later stays scaled. ``s = sqrt(rms / median)`` minimises
    ``‖Dq‖·‖D⁻¹k‖`` (the size of the score error) for queries spread evenly over the channels.
    Returns None when no pair of any head exceeds the ratio.
    """
    d = keys.shape[-1]
    if d % 2 or keys.device.type == "meta":  # meta tensors hold no values to measure
        return None
    pair_rms = (keys[..., : d // 2].square() + keys[..., d // 2 :].square()).mean(dim=-2).div(2).sqrt()  # [B, H, d/2]
    rel = pair_rms / pair_rms.median(dim=-1, keepdim=True).values.clamp_min(torch.finfo(torch.float32).tiny)
    rel = torch.nan_to_num(rel, nan=1.0, posinf=1.0)  # non-finite prompts keep unit scales
    if not bool((rel > ratio).any()):
        return None
    scale = torch.where(rel > ratio, rel.sqrt(), torch.ones_like(rel))
    return torch.cat([scale, scale], dim=-1).contiguous()


__all__ = ["FLOAT16_NORM_LIMIT", "FullPrecisionKV", "KVCodes", "norms_overflow_float16", "outlier_scale"]
