"""PyTorch reference of attention computed straight from TurboQuant codes.

This is the specification the Triton kernels must match, and the CPU path of
the KV cache. It never materialises a full-precision copy of the compressed
history: stored tokens are decoded ``chunk`` at a time in the *rotated* domain,
scored against the query rotated once, and values are accumulated in the rotated
domain and rotated back once at the end (online softmax, as in flash-decoding).

Scores of compressed token ``i`` for a query ``q`` (paper Alg. 1/2 estimators):

    <q, k_i> ≈ ‖k_i‖ <Π_k q, ŷ_i>  [+ γ_i √(π/2)/d <S Π_k q, sign_i>  for prod keys]
             + <q, μ_k>            (when keys were centred by μ_k before quantization)

Output:

    o = Σ_i p_i v_i ≈ Π_vᵀ (Σ_{i∈compressed} p_i ‖v_i‖ ŷ^v_i) + μ_v Σ_{i∈compressed} p_i
        + Σ_{j∈full precision} p_j v_j.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..codec import decode_mse, qjl_scores
from ..config import TurboQuantError, Variant
from ..quantizer import QuantizedVectors
from ..rotation import make_rotation, qjl_matrix

DEFAULT_CHUNK = 2048


def _group_heads(t: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[B, Hq, L, X] -> [B, Hkv, G·L, X]`` (query head ``h`` uses kv head ``h // G``)."""
    b, hq, l, x = t.shape
    return t.reshape(b, kv_heads, (hq // kv_heads) * l, x)


def _group_mask(mask: torch.Tensor, batch: int, q_heads: int, kv_heads: int, q_len: int) -> torch.Tensor:
    """Broadcast a ``[B|1, 1|Hq, L, T]`` mask to ``[B, Hkv, G·L, T]`` (additive float)."""
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, float("-inf"))
    mask = mask.float().expand(batch, q_heads, q_len, mask.shape[-1])
    return mask.reshape(batch, kv_heads, (q_heads // kv_heads) * q_len, mask.shape[-1])


class AttentionShapes(NamedTuple):
    """Sizes of one attention call: batch, query heads, query length, head dim, compressed and
    full-precision tokens, key/value heads."""

    b: int
    hq: int
    l: int
    d: int
    n: int
    w: int
    hkv: int


def attention_shapes(
    query: torch.Tensor,
    keys: QuantizedVectors | None,
    values: QuantizedVectors | None,
    full_keys: torch.Tensor | None,
    mask: torch.Tensor | None,
) -> AttentionShapes:
    """Validate the arguments every attention implementation takes; return their sizes."""
    b, hq, l, d = query.shape
    n = 0 if keys is None else keys.shape[-1]
    w = 0 if full_keys is None else full_keys.shape[-2]
    if n == 0 and w == 0:
        raise TurboQuantError("attention over an empty cache")
    if n and (values is None or values.shape[-1] != n):
        raise TurboQuantError(f"{n} compressed keys but {0 if values is None else values.shape[-1]} compressed values")
    hkv = keys.shape[1] if keys is not None and n else full_keys.shape[1]  # type: ignore[union-attr]
    if hq % hkv:
        raise TurboQuantError(f"query heads {hq} are not a multiple of key/value heads {hkv}")
    if mask is not None and mask.shape[-1] != n + w:
        raise TurboQuantError(f"mask covers {mask.shape[-1]} keys, the cache holds {n + w}")
    return AttentionShapes(b, hq, l, d, n, w, hkv)


def key_scores(q_rot: torch.Tensor, keys: QuantizedVectors, q_proj: torch.Tensor | None) -> torch.Tensor:
    """Estimated ``<q, k>`` for rotated queries against a chunk of key codes.

    Args:
        q_rot: ``[B, H, M, d]`` float32, ``Π_k q``.
        keys: codes with batch shape ``[B, H, n]``.
        q_proj: ``[B, H, M, d]`` ``S Π_k q`` for prod keys, else None.

    Returns:
        ``[B, H, M, n]`` float32.
    """
    y = decode_mse(keys.codes, keys.config)
    scores = (q_rot @ y.transpose(-1, -2)) * keys.norms.float().unsqueeze(-2)
    if keys.config.variant is Variant.PROD:
        assert q_proj is not None and keys.qjl is not None and keys.residual_norms is not None
        scores = scores + qjl_scores(q_proj, keys.qjl, keys.residual_norms, keys.config)
    return scores


# The specification: kernels.testing.float64_attention and every kernel wrapper take this same signature.
def torch_quantized_attention(
    query: torch.Tensor,
    keys: QuantizedVectors | None,
    values: QuantizedVectors | None,
    full_keys: torch.Tensor | None,
    full_values: torch.Tensor | None,
    scaling: float,
    mask: torch.Tensor | None = None,
    key_offset: torch.Tensor | None = None,
    value_offset: torch.Tensor | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Attention of ``query`` over compressed tokens followed by full-precision tokens.

    Args:
        query: ``[B, Hq, L, d]`` (any float dtype; computed in float32).
        keys, values: compressed history, batch shape ``[B, Hkv, N]`` (or None when N = 0).
        full_keys, full_values: ``[B, Hkv, W, d]`` full-precision tokens (or None).
        scaling: softmax scale (usually ``d**-0.5``).
        mask: additive float or boolean (True = attend) mask broadcastable to
            ``[B, Hq, L, N + W]``; columns are the N compressed tokens, then the W
            full-precision tokens.
        key_offset, value_offset: ``[B, Hkv, d]`` offsets subtracted before quantization.
        chunk: compressed tokens decoded at a time.

    Returns:
        ``[B, Hq, L, d]`` in ``query.dtype``. Rows whose every column is masked are 0.
    """
    b, hq, l, d, n, w, hkv = attention_shapes(query, keys, values, full_keys, mask)
    q = _group_heads(query.float(), hkv)  # [B, Hkv, M, d], M = G·L
    m_rows = q.shape[2]
    full_mask = None if mask is None else _group_mask(mask, b, hq, hkv, l)

    row_max = torch.full((b, hkv, m_rows, 1), float("-inf"), device=query.device)
    denom = torch.zeros((b, hkv, m_rows, 1), device=query.device)
    acc_rot = torch.zeros((b, hkv, m_rows, d), device=query.device)
    acc_full = torch.zeros((b, hkv, m_rows, d), device=query.device)
    mass_compressed = torch.zeros((b, hkv, m_rows, 1), device=query.device)

    def online_update(scores: torch.Tensor) -> torch.Tensor:
        nonlocal row_max, denom, acc_rot, acc_full, mass_compressed
        new_max = torch.maximum(row_max, scores.amax(dim=-1, keepdim=True))
        safe_max = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
        correction = torch.exp(row_max - safe_max)
        p = torch.exp(scores - safe_max)
        denom = denom * correction + p.sum(dim=-1, keepdim=True)
        acc_rot = acc_rot * correction
        acc_full = acc_full * correction
        mass_compressed = mass_compressed * correction
        row_max = new_max
        return p

    if n:
        assert keys is not None and values is not None
        rot_k = make_rotation(keys.config.rotation, keys.config.dim, keys.config.seed)
        q_rot = rot_k.rotate(q)
        q_proj = None
        if keys.config.variant is Variant.PROD:
            q_proj = q_rot @ qjl_matrix(d, keys.config.seed, q.device).T
        q_offset = None if key_offset is None else (q @ key_offset.float().unsqueeze(-1))  # [B, Hkv, M, 1]
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            scores = key_scores(q_rot, keys[:, :, start:stop], q_proj)
            if q_offset is not None:
                scores = scores + q_offset
            scores = scores * scaling
            if full_mask is not None:
                scores = scores + full_mask[..., start:stop]
            p = online_update(scores)
            part = values[:, :, start:stop]
            v_rot = decode_mse(part.codes, part.config) * part.norms.float().unsqueeze(-1)
            acc_rot = acc_rot + p @ v_rot
            mass_compressed = mass_compressed + p.sum(dim=-1, keepdim=True)
    if w:
        assert full_keys is not None and full_values is not None
        scores = (q @ full_keys.float().transpose(-1, -2)) * scaling
        if full_mask is not None:
            scores = scores + full_mask[..., n:]
        p = online_update(scores)
        acc_full = acc_full + p @ full_values.float()

    out = acc_full
    if n:
        assert values is not None
        rot_v = make_rotation(values.config.rotation, values.config.dim, values.config.seed)
        out = out + rot_v.unrotate(acc_rot)
        if value_offset is not None:
            out = out + mass_compressed * value_offset.float().unsqueeze(-2)
    out = out / torch.where(denom > 0, denom, torch.ones_like(denom))
    return out.reshape(b, hq, l, d).to(query.dtype)
