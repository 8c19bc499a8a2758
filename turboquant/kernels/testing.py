"""Float64 references and random inputs for checking the attention kernels (tests and benchmarks).

:func:`float64_attention` is the "same quantized attention" computed in float64:
codes are decoded with the float64 Lloyd-Max centroids, rotated back with a
float64 ``Π``, offsets re-added, and softmax attention runs over the
dequantized history followed by the full-precision window. It materialises the
dequantized history on purpose (it is a check, never a code path).
"""

from __future__ import annotations

import torch

from ..codebook import lloyd_max_codebook
from ..codec import code_bytes, layout
from ..config import QuantizerConfig
from ..packing import unpack_codes
from ..quantizer import QuantizedVectors
from ..rotation import make_rotation


def dequantize_float64(qv: QuantizedVectors) -> torch.Tensor:
    """``[*B, d]`` float64 reconstruction ``norm · (ŷ @ Π)`` of MSE codes."""
    cfg = qv.config
    dev = qv.codes.device
    parts = []
    for s in layout(cfg).streams:  # same bit streams, float64 centroids
        cent = torch.tensor(lloyd_max_codebook(cfg.dim, s.width).centroids, dtype=torch.float64, device=dev)
        parts.append(cent[unpack_codes(qv.codes[..., s.offset : s.offset + s.nbytes].contiguous(), s.width, s.count).long()])
    y = torch.cat(parts, dim=-1) * qv.norms.double().unsqueeze(-1)
    pi = make_rotation(cfg.rotation, cfg.dim, cfg.seed).matrix(dev, torch.float64)
    return y @ pi


# Same signature as kernels.reference.torch_quantized_attention (deliberately: a drop-in oracle).
def float64_attention(
    query: torch.Tensor,
    keys: QuantizedVectors | None,
    values: QuantizedVectors | None,
    full_keys: torch.Tensor | None,
    full_values: torch.Tensor | None,
    scaling: float,
    mask: torch.Tensor | None = None,
    key_offset: torch.Tensor | None = None,
    value_offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float64 attention over ``[dequantized compressed | full precision]`` (same arguments as the kernels).

    Returns:
        ``[B, Hq, L, d]`` float64; fully masked rows are 0.
    """
    b, hq, l, d = query.shape
    ks, vs = [], []
    if keys is not None and keys.shape[-1]:
        assert values is not None
        k = dequantize_float64(keys)
        v = dequantize_float64(values)
        if key_offset is not None:
            k = k + key_offset.double().unsqueeze(-2)
        if value_offset is not None:
            v = v + value_offset.double().unsqueeze(-2)
        ks.append(k)
        vs.append(v)
    if full_keys is not None and full_keys.shape[-2]:
        assert full_values is not None
        ks.append(full_keys.double())
        vs.append(full_values.double())
    k_all, v_all = torch.cat(ks, dim=-2), torch.cat(vs, dim=-2)
    hkv = k_all.shape[1]
    g = hq // hkv
    q = query.double().reshape(b, hkv, g * l, d)
    scores = (q @ k_all.transpose(-1, -2)) * scaling
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=torch.float64, device=mask.device).masked_fill(~mask, float("-inf"))
        mask = mask.double().expand(b, hq, l, scores.shape[-1]).reshape(b, hkv, g * l, -1)
        scores = scores + mask
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(scores - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    out = (p @ v_all) / torch.where(denom > 0, denom, torch.ones_like(denom))
    return out.reshape(b, hq, l, d)


def random_codes(config: QuantizerConfig, shape: tuple[int, ...], device: torch.device | str, capacity: int | None = None) -> QuantizedVectors:
    """Uniformly random valid codes and norms with batch shape ``shape = (*lead, N)``.

    With ``capacity > N`` the tensors are views of a larger ``[*lead, capacity, ...]``
    buffer, as the KV cache passes them. Pad bits of a stream are left random: the
    kernels and the torch reference ignore them.
    """
    *lead, n = shape
    cap = capacity or n
    codes = torch.randint(0, 256, (*lead, cap, code_bytes(config)), dtype=torch.uint8, device=device)
    norms = (torch.rand(*lead, cap, device=device) * 2 + 0.5).to(getattr(torch, config.norm_dtype))
    return QuantizedVectors(config, codes[..., :n, :], norms[..., :n])


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖out − ref‖ / ‖ref‖`` in float64 (inf when ``out`` has a NaN)."""
    diff = (out.double() - ref.double()).norm().item()
    return diff / max(ref.double().norm().item(), 1e-300)


__all__ = ["dequantize_float64", "float64_attention", "random_codes", "relative_error"]
