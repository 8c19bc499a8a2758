"""Torch reference of the fused encode: quantize new vectors into a preallocated cache buffer."""

from __future__ import annotations

import torch

from ..codec import code_bytes, encode
from ..config import QuantizerConfig, TurboQuantError
from ..quantizer import QuantizedVectors


def torch_quantize_into(
    x: torch.Tensor, config: QuantizerConfig, codes: torch.Tensor, norms: torch.Tensor, start: int
) -> QuantizedVectors:
    """Quantize ``x`` with ``config`` and write codes and norms at positions ``start : start + T``.

    Args:
        x: ``[*R, T, d]`` new vectors.
        config: quantizer config (MSE; prod codes have extra fields this buffer layout does not hold).
        codes: ``[*R, S_cap, code_bytes(config)]`` uint8 buffer.
        norms: ``[*R, S_cap]`` buffer in ``config.norm_dtype``.
        start: first position written.

    Returns:
        :class:`QuantizedVectors` views of the written slice, batch shape ``[*R, T]``.

    Example:
        >>> cfg = QuantizerConfig(64, 4)
        >>> codes = torch.zeros(2, 100, code_bytes(cfg), dtype=torch.uint8)
        >>> norms = torch.zeros(2, 100)
        >>> torch_quantize_into(torch.randn(2, 5, 64), cfg, codes, norms, start=10).shape
        torch.Size([2, 5])
    """
    t = x.shape[-2]
    if x.shape[-1] != config.dim or codes.shape[-1] != code_bytes(config):
        raise TurboQuantError(f"x {tuple(x.shape)} / codes {tuple(codes.shape)} do not match {config}")
    if start < 0 or start + t > codes.shape[-2]:
        raise TurboQuantError(f"writing {t} tokens at {start} overflows a buffer of {codes.shape[-2]}")
    enc = encode(x.float(), config)  # no input checks: non-finite vectors propagate (cache policy)
    codes[..., start : start + t, :] = enc.codes
    norms[..., start : start + t] = enc.norms
    return QuantizedVectors(config, codes[..., start : start + t, :], norms[..., start : start + t])


__all__ = ["torch_quantize_into"]
