"""``torch.library`` custom ops over TurboQuant codes, for ``torch.compile`` and CUDA graphs.

Dynamo cannot trace the kernel dispatchers (Python objects, ctypes, Triton/CUDA launches,
host-side checks), so the compiled cache path calls them through three opaque ops, each with a
fake (meta) implementation that gives the output shapes without running anything:

* ``turboquant::quantized_attention`` — decode attention from codes, the semantics of
  :func:`turboquant.kernels.reference.torch_quantized_attention` (compressed tokens first, then
  full-precision tokens, optional mask over ``[compressed | full precision]``, key/value
  offsets), run by :func:`turboquant.kernels.quantized_attention`.
* ``turboquant::encode`` — quantize ``x [*R, T, d]`` into new code/norm tensors (functional;
  the static cache writes them with ``index_copy_`` at tensor positions, which the compilers
  handle as any in-place cache write).
* ``turboquant::encode_into`` — the same, written straight into preallocated buffers at
  ``positions`` (a tensor), declared with ``mutates_args``.

Ops take no Python objects: a :class:`~turboquant.config.QuantizerConfig` travels as the JSON
string :func:`config_key` and is resolved back through an ``lru_cache``
(:func:`config_from_key`). QJL ("prod") keys are not covered (MSE codes only).
"""

from __future__ import annotations

import json
from functools import lru_cache

import torch

from ..codec import NORM_EPS, byte_table, code_bytes, layout
from ..config import QuantizerConfig, TurboQuantError, Variant
from ..quantizer import QuantizedVectors


def config_key(config: QuantizerConfig) -> str:
    """The op-argument form of a config: its fields as sorted JSON (inverse: :func:`config_from_key`)."""
    return json.dumps(config.to_dict(), sort_keys=True)


@lru_cache(maxsize=256)
def config_from_key(key: str) -> QuantizerConfig:
    """The :class:`QuantizerConfig` of a :func:`config_key` string (MSE codes only)."""
    config = QuantizerConfig.from_dict(json.loads(key))
    if config.variant is not Variant.MSE:
        raise TurboQuantError(f"turboquant ops take MSE codes only, got variant={config.variant.value!r}")
    return config


def _norm_dtype(config: QuantizerConfig) -> torch.dtype:
    return getattr(torch, config.norm_dtype)


def squared_norm_table(config: QuantizerConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``‖ŷ‖²`` of a code row as one gather and a sum, for the norm correction in a compiled graph.

    Returns ``(table [code_bytes·256] float32, offsets [code_bytes] int64)`` with
    ``‖ŷ‖² = table[offsets + codes].sum(-1)``: entry ``(p, byte)`` is the sum of the squared
    centroids packed in byte ``byte`` at position ``p`` (pad codes past a stream's end excluded).
    None when a stream's width does not divide 8.
    """
    streams = layout(config).streams
    if not streams or any(8 % s.width for s in streams):
        return None
    rows = []
    for s in streams:
        per = 8 // s.width
        sq = byte_table(config.dim, s.width, device).square()  # [256, per]
        rows += [sq[:, : min(per, s.count - b * per)].sum(-1) for b in range(s.nbytes)]
    return torch.stack(rows).reshape(-1).contiguous(), torch.arange(len(rows), device=device) * 256


def corrected_norms(codes: torch.Tensor, norms: torch.Tensor, table: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``norms / max(‖ŷ‖, eps)`` (:func:`turboquant.codec.reconstruction_norms`) from ``codes [..., code_bytes]``,
    in ``norms.dtype``; plain tensor ops, so the compiler fuses them into one kernel."""
    sq = table[codes.long() + offsets].sum(-1)
    return (norms.float() / sq.sqrt().clamp_min(NORM_EPS)).to(norms.dtype)


# ---------------------------------------------------------------------- attention


@torch.library.custom_op("turboquant::quantized_attention", mutates_args=())
def quantized_attention_op(
    query: torch.Tensor,
    key_codes: torch.Tensor,
    key_norms: torch.Tensor,
    value_codes: torch.Tensor,
    value_norms: torch.Tensor,
    full_keys: torch.Tensor | None,
    full_values: torch.Tensor | None,
    mask: torch.Tensor | None,
    key_offset: torch.Tensor | None,
    value_offset: torch.Tensor | None,
    scaling: float,
    key_config: str,
    value_config: str,
    backend: str = "auto",
    chunk: int = 2048,
    compressed_length: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``query [B, Hq, L, d]`` over ``N`` compressed tokens, then ``W`` full-precision ones.

    Args:
        key_codes, value_codes: ``[B, Hkv, N, code_bytes]`` uint8; key_norms, value_norms ``[B, Hkv, N]``.
        full_keys, full_values: ``[B, Hkv, W, d]`` or None.
        mask: boolean or additive, broadcastable to ``[B, Hq, L, N + W]`` (True = attend), or None.
        key_offset, value_offset: ``[B, Hkv, d]`` or None.
        key_config, value_config: :func:`config_key` strings.
        compressed_length: 0-d int tensor or None: attend only the first ``compressed_length`` compressed
            tokens, ``mask`` then covering the ``W`` full-precision tokens only (read on the device).

    Returns:
        ``[B, Hq, L, d]`` in ``query.dtype`` (a new tensor).
    """
    from . import quantized_attention

    kcfg, vcfg = config_from_key(key_config), config_from_key(value_config)
    keys = QuantizedVectors(kcfg, key_codes, key_norms)
    values = QuantizedVectors(vcfg, value_codes, value_norms)
    return quantized_attention(
        query, keys, values, full_keys, full_values, scaling,
        mask=mask, key_offset=key_offset, value_offset=value_offset, chunk=chunk, backend=backend,
        compressed_length=compressed_length,
    )  # fmt: skip


@quantized_attention_op.register_fake
def _(query, key_codes, key_norms, value_codes, value_norms, full_keys, full_values, mask, key_offset,
      value_offset, scaling, key_config, value_config, backend="auto", chunk=2048, compressed_length=None):  # fmt: skip
    if key_codes.dim() != 4 or key_codes.shape[:2] != value_codes.shape[:2]:
        raise TurboQuantError(f"key codes {tuple(key_codes.shape)} / value codes {tuple(value_codes.shape)} must be [B, Hkv, N, bytes]")
    return query.new_empty(query.shape)


# ---------------------------------------------------------------------- encode


def _encode(x: torch.Tensor, config: str, norm_correction: bool, backend: str,
            offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    from . import quantize_into

    cfg = config_from_key(config)
    codes = torch.empty((*x.shape[:-1], code_bytes(cfg)), dtype=torch.uint8, device=x.device)
    norms = torch.empty(x.shape[:-1], dtype=_norm_dtype(cfg), device=x.device)
    quantize_into(x, cfg, codes, norms, 0, backend=backend, norm_correction=norm_correction, offset=offset)
    return codes, norms


@torch.library.custom_op("turboquant::encode", mutates_args=())
def encode_op(x: torch.Tensor, config: str, norm_correction: bool, backend: str = "auto",
              offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Quantize ``x [*R, T, d]`` (minus ``offset [*R, d]`` float32, if given): returns ``(codes [*R, T, code_bytes]
    uint8, norms [*R, T])``.

    ``norm_correction`` stores ``‖x‖/‖ŷ‖`` instead of ``‖x‖`` (:func:`turboquant.codec.reconstruction_norms`).
    """
    return _encode(x, config, norm_correction, backend, offset)


@encode_op.register_fake
def _(x, config, norm_correction, backend="auto", offset=None):
    cfg = config_from_key(config)
    if x.shape[-1] != cfg.dim:
        raise TurboQuantError(f"encode: vectors of dim {x.shape[-1]}, config dim {cfg.dim}")
    return (x.new_empty((*x.shape[:-1], code_bytes(cfg)), dtype=torch.uint8),
            x.new_empty(x.shape[:-1], dtype=_norm_dtype(cfg)))  # fmt: skip


@torch.library.custom_op("turboquant::encode_into", mutates_args=("codes", "norms"))
def encode_into_op(
    x: torch.Tensor,
    codes: torch.Tensor,
    norms: torch.Tensor,
    positions: torch.Tensor,
    config: str,
    norm_correction: bool,
    backend: str = "auto",
) -> None:
    """Quantize ``x [*R, T, d]`` into ``codes [*R, S, code_bytes]`` / ``norms [*R, S]`` at ``positions [T]`` (int64)."""
    c, n = _encode(x, config, norm_correction, backend)
    codes.index_copy_(codes.dim() - 2, positions, c)
    norms.index_copy_(norms.dim() - 1, positions, n.to(norms.dtype))


@encode_into_op.register_fake
def _(x, codes, norms, positions, config, norm_correction, backend="auto"):
    return None


__all__ = ["config_from_key", "config_key", "corrected_norms", "encode_into_op", "encode_op", "quantized_attention_op", "squared_norm_table"]
