"""A static-shaped TurboQuant KV cache for ``torch.compile`` and CUDA graphs (transformers 5.x).

Usage::

    from turboquant.static_cache import TurboQuantStaticCache
    cache = TurboQuantStaticCache(model.config, max_cache_len=4096, key_bits=4, value_bits=4)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64,
                         compile_config=CompileConfig(mode="reduce-overhead"))

Like transformers' ``StaticCache``, every buffer is allocated once, at the first update, for
``max_cache_len`` tokens, and a decode step writes with ``index_copy_`` at the position held by
a tensor (``cumulative_length``), so a decode step has no Python-side allocation, no
data-dependent shape and no Python branch on tensor values; its buffers keep their addresses
(``torch._dynamo.mark_static_address``), so CUDA graphs replay it.

Per layer (``[batch, kv_heads, ·, head_dim]``):

* codes and norms of **every** token, at its position, ``[B, Hkv, max_cache_len, code_bytes]``;
* the first ``sink_tokens`` tokens and the last ``window + 1`` (the current token included) in the
  model's dtype, in ``sink_tokens + window + 1`` fixed slots: sinks at their position, the window as
  a ring (slot ``sink + (p - sink) mod (window + 1)``; attention of a decode query does not depend
  on token order, so the ring is never rotated), with the position held by each slot;
* the per-head key offset, key outlier scale and value offset of
  :class:`~turboquant.cache.TurboQuantCache`, computed from the prompt at prefill and copied into
  fixed buffers.

A decode step attends to the codes of positions ``[sink, p - window)`` (a boolean mask built from
the position by tensor ops, over all ``max_cache_len`` code slots, as ``StaticCache`` attends over
``max_cache_len`` keys) plus the full-precision slots, through the custom op
``turboquant::quantized_attention`` (:mod:`turboquant.kernels.ops`). That is exactly what
:class:`~turboquant.cache.TurboQuantCache` attends to with ``flush_every=0``. Prefill chunks (more
than one token, or the first update) run eagerly (``torch.compiler.disable``: a compiled forward
that also takes the prompt graph-breaks there): the first chunk attends in full precision, later
chunks to the earlier chunks' codes (sinks in full precision) and to themselves in full precision.

The layer reaches the attention function through the same per-thread table as the dynamic
cache (``TurboQuantLayer.update`` → ``turboquant_attention``); Dynamo traces that table's store
and pop without a graph break (``tests/test_static_cache.py`` checks ``fullgraph=True``).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import replace
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, StaticLayer, StaticSlidingWindowLayer

from .cache import (
    _PENDING,
    ATTENTION_NAME,
    _device_scope,
    _sdpa,
    enable_turboquant_attention,
    model_layers,
)
from .codec import bytes_per_vector, code_bytes
from .config import KVCacheConfig, TurboQuantError, Variant, cache_settings
from .kernels import quantized_attention
from .kernels.ops import config_key, corrected_norms, encode_op, quantized_attention_op, squared_norm_table
from .kvstore import FLOAT16_NORM_LIMIT, norms_overflow_float16, outlier_scale
from .quantizer import QuantizedVectors

logger = logging.getLogger(__name__)


def _compiling() -> bool:
    return bool(torch.compiler.is_compiling())


_POSITIONS: weakref.WeakValueDictionary[tuple[int, str], torch.Tensor] = weakref.WeakValueDictionary()


def _positions(capacity: int, device: torch.device) -> torch.Tensor:
    """``arange(capacity)`` shared by the layers of a cache (one int64 per token, not one per token and layer)."""
    key = (capacity, str(device))
    found = _POSITIONS.get(key)
    if found is None:
        found = _POSITIONS[key] = torch.arange(capacity, device=device)
    return found


class TurboQuantStaticLayer(CacheLayerMixin):
    """One decoder layer of :class:`TurboQuantStaticCache` (see the module docstring for the layout).

    ``keys``/``values`` are the ``[B, Hkv, sink + window + 1, d]`` full-precision slots;
    ``slot_positions [sink + window + 1]`` the position each slot holds (-1: empty);
    ``cumulative_length`` a 0-d int64 tensor, the number of tokens written.
    """

    is_compileable = True
    is_sliding = False
    is_croppable = False

    def __init__(self, settings: KVCacheConfig, max_cache_len: int, layer_idx: int, owner: Any = None) -> None:
        super().__init__()
        self.owner = owner  # the TurboQuantStaticCache: its model config says which attention function runs
        self.settings = settings
        self.max_cache_len = max_cache_len
        self.layer_idx = layer_idx
        self.sink = settings.sink_tokens
        self.ring = settings.window + 1
        self.cumulative_length = torch.tensor(0, dtype=torch.int64)
        self.ready = False  # a prompt was written: one-token updates may take the static decode path
        # the prompt's mask had padding: decode steps mask the codes token by token (else the kernel reads a count)
        self.padded = False
        self.key_scaled = False  # some head divides its keys by key_scale (outlier channels found at prefill)

    # ------------------------------------------------------------------ buffers
    @torch.compiler.disable  # allocated eagerly even under a compiled prompt, so the addresses can be marked static
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.shape[-1] != value_states.shape[-1] or key_states.shape[1] != value_states.shape[1]:
            raise TurboQuantError(f"layer {self.layer_idx}: keys {tuple(key_states.shape)} and values {tuple(value_states.shape)} differ in kv_heads or head_dim")
        b, h, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.key_config, self.value_config = self.settings.quantizer_configs(d)
        dev, cap, slots = self.device, self.max_cache_len, self.sink + self.ring
        self.key_codes = torch.zeros(b, h, cap, code_bytes(self.key_config), dtype=torch.uint8, device=dev)
        self.value_codes = torch.zeros(b, h, cap, code_bytes(self.value_config), dtype=torch.uint8, device=dev)
        self.key_norms = torch.zeros(b, h, cap, dtype=getattr(torch, self.key_config.norm_dtype), device=dev)
        self.value_norms = torch.zeros(b, h, cap, dtype=getattr(torch, self.value_config.norm_dtype), device=dev)
        self.keys = torch.zeros(b, h, slots, d, dtype=self.dtype, device=dev)
        self.values = torch.zeros(b, h, slots, d, dtype=self.dtype, device=dev)
        self.slot_positions = torch.full((slots,), -1, dtype=torch.int64, device=dev)
        self.key_offset = torch.zeros(b, h, d, dtype=torch.float32, device=dev)
        self.key_scale = torch.ones(b, h, d, dtype=torch.float32, device=dev)
        self.value_offset = torch.zeros(b, h, d, dtype=torch.float32, device=dev)
        self.positions = _positions(cap, dev)
        # the norm correction as fused tensor ops in the step (None: inside the encode op, for widths not dividing 8)
        self.key_sq = squared_norm_table(self.key_config, dev)
        self.value_sq = squared_norm_table(self.value_config, dev)
        self.cumulative_length = self.cumulative_length.to(dev)
        self._set_config_keys()
        for t in self._buffers():  # fixed addresses: CUDA graphs replay the in-place writes
            torch._dynamo.mark_static_address(t)
        self.is_initialized = True

    def _set_config_keys(self) -> None:
        self.key_key, self.value_key = config_key(self.key_config), config_key(self.value_config)

    def _batch_buffers(self) -> dict[str, torch.Tensor]:
        """The buffers with a batch axis (first), by kind."""
        return {"key_codes": self.key_codes, "value_codes": self.value_codes, "key_norms": self.key_norms,
                "value_norms": self.value_norms, "keys": self.keys, "values": self.values,
                "key_offset": self.key_offset, "key_scale": self.key_scale, "value_offset": self.value_offset}  # fmt: skip

    def _buffers(self) -> list[torch.Tensor]:
        tables = [t for pair in (self.key_sq, self.value_sq) if pair is not None for t in pair]
        return [*self._batch_buffers().values(), self.slot_positions, self.positions, self.cumulative_length, *tables]

    def _check(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        held = (*self.keys.shape[:2], self.keys.shape[3])
        for name, x in (("keys", key_states), ("values", value_states)):
            got = (x.shape[0], x.shape[1], x.shape[3])
            if got != held or x.device != self.device:
                raise TurboQuantError(
                    f"layer {self.layer_idx}: {name} of [batch, kv_heads, head_dim] = {list(got)} on {x.device}, but this "
                    f"static cache layer holds {list(held)} on {self.device}; build a cache for this batch"
                )

    # ------------------------------------------------------------------ transformers API
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``[B, Hkv, L, d]`` keys/values; returns the full-precision tokens the attention reads.

        One token after a prompt: the static decode step (returns the slots ``keys``/``values``).
        Otherwise an eager prefill chunk (returns the earlier sinks, then the chunk's tokens).
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check(key_states, value_states)
        if self.owner is not None and not self.owner.attention_enabled():
            # another attention function would read only the full-precision slots: fail instead of attending wrongly
            raise TurboQuantError(
                f"TurboQuantStaticCache needs the model's attention implementation {ATTENTION_NAME!r} (set when the cache "
                f"is built), found {getattr(self.owner.model_config, '_attn_implementation', None)!r}"
            )
        if self.ready and key_states.shape[-2] == 1:
            keys, values = self._decode_write(key_states, value_states)
        else:
            keys, values = self._prefill_write(key_states, value_states)
        _PENDING.layers[self.layer_idx] = self  # read (and removed) by turboquant_attention
        return keys, values

    def _encode_at(self, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor) -> None:
        """Quantize ``[B, Hkv, T, d]`` keys/values (offsets and key scale applied) into the codes at ``pos [T]``."""
        correct, backend = self.settings.norm_correction, self.settings.backend.value
        # offsets are subtracted inside the encode (on GPUs a bfloat16 input is then read as it is); a key scale
        # (some head has outlier channels, decided at prefill) needs the transformed copy
        koff = self.key_offset if self.settings.center_keys else None
        voff = self.value_offset if self.settings.center_values else None
        if self.key_scaled:
            keys = (keys.float() - self.key_offset.unsqueeze(-2)) / self.key_scale.unsqueeze(-2)
            koff = None
        kc, kn = encode_op(keys, self.key_key, correct.keys and self.key_sq is None, backend, koff)
        vc, vn = encode_op(values, self.value_key, correct.values and self.value_sq is None, backend, voff)
        if correct.keys and self.key_sq is not None:
            kn = corrected_norms(kc, kn, *self.key_sq)
        if correct.values and self.value_sq is not None:
            vn = corrected_norms(vc, vn, *self.value_sq)
        self.key_codes.index_copy_(2, pos, kc)
        self.key_norms.index_copy_(2, pos, kn)
        self.value_codes.index_copy_(2, pos, vc)
        self.value_norms.index_copy_(2, pos, vn)

    def _slots(self, pos: torch.Tensor) -> torch.Tensor:
        return torch.where(pos < self.sink, pos, self.sink + (pos - self.sink).remainder(self.ring))

    def _decode_write(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = self.cumulative_length.reshape(1)
        if not _compiling() and int(pos) >= self.max_cache_len:  # eager only: a compiled step cannot sync
            raise TurboQuantError(f"layer {self.layer_idx}: token {int(pos) + 1} exceeds max_cache_len={self.max_cache_len}")
        self._encode_at(key_states, value_states, pos)
        slot = self._slots(pos)
        self.keys.index_copy_(2, slot, key_states)
        self.values.index_copy_(2, slot, value_states)
        self.slot_positions.index_copy_(0, slot, pos)
        self.cumulative_length.add_(1)
        return self.keys, self.values

    # Prompts have data-dependent bookkeeping: always eager (a graph break when the caller compiled the prompt too).
    @torch.compiler.disable
    def _prefill_write(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, length = int(self.cumulative_length), key_states.shape[-2]
        if start + length > self.max_cache_len:
            raise TurboQuantError(f"layer {self.layer_idx}: {start} cached + {length} new tokens exceed max_cache_len={self.max_cache_len}")
        if start == 0:
            self._init_offsets(key_states, value_states)
        pos = torch.arange(start, start + length, device=self.device)
        with _device_scope(self.device):
            self._encode_at(key_states, value_states, pos)
        # full precision: tokens at sink positions, and the newest `ring` others (no slot written twice)
        keep = (pos < self.sink) | (pos >= max(self.sink, start + length - self.ring))
        idx = keep.nonzero().flatten()
        slot = self._slots(pos[idx])
        self.keys.index_copy_(2, slot, key_states[:, :, idx])
        self.values.index_copy_(2, slot, value_states[:, :, idx])
        self.slot_positions.index_copy_(0, slot, pos[idx])
        self.cumulative_length.add_(length)
        self.ready = True
        self._chunk_start = start
        before = min(start, self.sink)
        return torch.cat([self.keys[:, :, :before], key_states], 2), torch.cat([self.values[:, :, :before], value_states], 2)

    def _init_offsets(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """The dynamic cache's per-head statistics, from the prompt's non-sink tokens (none: no centering)."""
        body_k, body_v = keys[:, :, self.sink :].float(), values[:, :, self.sink :].float()
        self.key_offset.zero_(), self.key_scale.fill_(1.0), self.value_offset.zero_()
        self.key_scaled = False
        if body_k.shape[2] == 0:
            return
        if self.settings.center_keys:
            self.key_offset.copy_(body_k.mean(dim=-2))
        if self.settings.center_values:
            self.value_offset.copy_(body_v.mean(dim=-2))
        if self.settings.key_outlier_ratio:
            scale = outlier_scale(body_k - self.key_offset.unsqueeze(-2), self.settings.key_outlier_ratio)
            if scale is not None:
                self.key_scale.copy_(scale)
                self.key_scaled = True
        self._fit_norms(body_k, body_v)

    def _fit_norms(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        # float16 norms overflow (kvstore.FLOAT16_NORM_LIMIT): promote to float32 once, at prefill
        for name, x in (("key", (keys - self.key_offset.unsqueeze(-2)) / self.key_scale.unsqueeze(-2)), ("value", values)):
            cfg = getattr(self, f"{name}_config")
            if cfg.norm_dtype != "float16" or not norms_overflow_float16(x):
                continue
            logger.warning("turboquant: %s norms above %.0f do not fit float16; layer %s stores them in float32", name,
                           FLOAT16_NORM_LIMIT, self.layer_idx)  # fmt: skip
            setattr(self, f"{name}_config", replace(cfg, norm_dtype="float32"))
            setattr(self, f"{name}_norms", getattr(self, f"{name}_norms").float())
            torch._dynamo.mark_static_address(getattr(self, f"{name}_norms"))
        self._set_config_keys()

    # ------------------------------------------------------------------ attention
    def attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
                  scaling: float) -> tuple[torch.Tensor, None]:  # fmt: skip
        """Attention of ``query [B, Hq, L, d]`` over this layer (called by ``turboquant_attention``).

        ``attention_mask``: boolean ``[B|1, 1, L, max_cache_len]`` over positions (transformers' mask
        for ``get_mask_sizes``), or None (causal, no padding). Returns ``([B, L, Hq, d], None)``.
        """
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            attention_mask = attention_mask == 0  # additive: 0 = attend
        if key is self.keys:
            out = self._decode_attention(query, attention_mask, scaling)
        else:
            out = self._prefill_attention(query, key, value, attention_mask, scaling)
        return out.transpose(1, 2).contiguous(), None

    def _scaled(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        # keys were divided by the outlier scale before quantizing: move it to the query (scores unchanged)
        scale = self.key_scale.unsqueeze(-2)
        q = (query.float() * scale.repeat_interleave(query.shape[1] // key.shape[1], dim=1)).to(query.dtype)
        k = (key.float() / scale).to(key.dtype)
        return q, k, (self.key_offset / self.key_scale) if self.settings.center_keys else None

    def _decode_attention(self, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        length = self.cumulative_length  # the query's own token is already written
        filled = self.slot_positions >= 0
        if attention_mask is not None:
            filled = attention_mask.index_select(-1, self.slot_positions.clamp_min(0)) & filled
        else:
            filled = filled.view(1, 1, 1, -1)
        if not self.padded:  # the codes of positions [sink, length - ring): a count the kernel reads on the device
            first, mask, count = self.sink, filled, (length - self.ring - self.sink).clamp_min(0)
        else:  # padding: every code slot masked by position, ANDed with transformers' mask
            compressed = (self.positions >= self.sink) & (self.positions < length - self.ring)
            compressed = compressed.view(1, 1, 1, -1) if attention_mask is None else attention_mask[..., : self.max_cache_len] & compressed
            mask = torch.cat([compressed.expand(*filled.shape[:-1], -1), filled.expand(*compressed.shape[:-1], -1)], dim=-1)
            first, count = 0, None
        q, k, koff = self._scaled(query, self.keys)
        return quantized_attention_op(
            q, self.key_codes[:, :, first:], self.key_norms[:, :, first:], self.value_codes[:, :, first:],
            self.value_norms[:, :, first:], k, self.values, mask, koff, self.value_offset if self.settings.center_values else None,
            float(scaling), self.key_key, self.value_key, self.settings.backend.value, self.settings.chunk, count,
        )  # fmt: skip

    @torch.compiler.disable
    def _prefill_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
                           scaling: float) -> torch.Tensor:  # fmt: skip
        start, length = self._chunk_start, query.shape[2]
        before = min(start, self.sink)
        rows = torch.arange(start, start + length, device=query.device).unsqueeze(-1)
        causal = (torch.arange(start + length, device=query.device) <= rows)[None, None]  # positions [0, start + length)
        if attention_mask is None:
            attention_mask = causal
        elif not self.padded:  # eager: any visible position hidden (padding) sends decode steps to the token mask
            self.padded = bool((causal & ~attention_mask[..., : start + length]).any())
        full_mask = torch.cat([attention_mask[..., :before], attention_mask[..., start : start + length]], dim=-1)
        if start <= self.sink:  # nothing compressed before this chunk: exact attention
            return _sdpa(None, query, key, value, full_mask, scaling)  # type: ignore[arg-type]
        n = start - self.sink
        keys = QuantizedVectors(self.key_config, self.key_codes[:, :, self.sink : start], self.key_norms[:, :, self.sink : start])
        values = QuantizedVectors(self.value_config, self.value_codes[:, :, self.sink : start], self.value_norms[:, :, self.sink : start])
        mask = torch.cat([attention_mask[..., self.sink : self.sink + n], full_mask], dim=-1)
        q, k, koff = self._scaled(query, key)
        with _device_scope(query.device):
            return quantized_attention(
                q, keys, values, k, value, scaling, mask=mask, key_offset=koff,
                value_offset=self.value_offset if self.settings.center_values else None,
                chunk=self.settings.chunk, backend=self.settings.backend,
            )  # fmt: skip

    # ------------------------------------------------------------------ bookkeeping
    def get_seq_length(self) -> Any:
        return self.cumulative_length if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        """Empty the layer in place (buffers keep their addresses, so compiled steps stay valid)."""
        if self.is_initialized:
            for t in self._batch_buffers().values():
                t.zero_()
            self.key_scale.fill_(1.0)
            self.key_scaled = False
            self.slot_positions.fill_(-1)
            self.cumulative_length.zero_()
        self.ready = False
        self.padded = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            for t in self._batch_buffers().values():
                t.copy_(t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise TurboQuantError("TurboQuantStaticCache has a fixed batch size; build it for the expanded batch")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise TurboQuantError("TurboQuantStaticCache has a fixed batch size; build it for the selected batch")

    def crop(self, tokens_to_remove: int) -> None:
        raise TurboQuantError("TurboQuantStaticCache cannot be cropped")

    def nbytes(self) -> dict[str, int]:
        """Bytes allocated: ``compressed`` (codes, norms, offsets, scales) and ``full_precision`` (the slots)."""
        if not self.is_initialized:
            return {"compressed": 0, "full_precision": 0}
        held = {k: t.numel() * t.element_size() for k, t in self._batch_buffers().items()}
        full = held.pop("keys") + held.pop("values")
        return {"compressed": sum(held.values()), "full_precision": full}

class TurboQuantStaticCache(Cache):
    """A transformers ``Cache`` of :class:`TurboQuantStaticLayer` s, preallocated for ``max_cache_len`` tokens.

    Args:
        config: the model's ``PretrainedConfig``; building the cache sets ``config._attn_implementation = "turboquant"``.
        max_cache_len: tokens per sequence (prompt + generated), as in ``StaticCache``.
        cache_config: a :class:`KVCacheConfig` (``key_variant="mse"`` only); keyword arguments override its
            fields. ``flush_every`` is ignored (a token's codes are written when it arrives).

    Sliding-window layers and ``full_precision_layers`` get transformers' static layers.

    Example:
        >>> cache = TurboQuantStaticCache(model.config, max_cache_len=1024, key_bits=4, value_bits=4)  # doctest: +SKIP
        >>> step = torch.compile(model.forward, mode="reduce-overhead")  # doctest: +SKIP
    """

    def __init__(self, config: Any, max_cache_len: int, cache_config: KVCacheConfig | None = None, **overrides: Any) -> None:
        settings = cache_settings(cache_config, overrides)
        if settings.key_variant is not Variant.MSE:
            raise TurboQuantError("TurboQuantStaticCache stores MSE keys only (key_variant='mse')")
        if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise TurboQuantError(f"max_cache_len must be a positive int, got {max_cache_len!r}")
        _, _, head_dim, layer_types, sliding_window = model_layers(config, settings)
        layers: list[CacheLayerMixin] = []
        for idx, kind in enumerate(layer_types):
            if kind in ("sliding_attention", "chunked_attention") and sliding_window:
                layers.append(StaticSlidingWindowLayer(max_cache_len=max_cache_len, sliding_window=sliding_window))
            elif idx in settings.full_precision_layers:
                layers.append(StaticLayer(max_cache_len=max_cache_len))
            else:
                layers.append(TurboQuantStaticLayer(settings, max_cache_len, idx, owner=self))
        super().__init__(layers=layers)
        self.settings = settings
        self._max_cache_len = max_cache_len
        self.model_config = config
        self.head_dim = head_dim
        enable_turboquant_attention(config)

    @property
    def max_cache_len(self) -> int:
        # a property in some transformers 5.x releases (read-only there), a plain attribute in others
        return self._max_cache_len

    def attention_enabled(self) -> bool:
        return getattr(self.model_config, "_attn_implementation", None) == ATTENTION_NAME

    def nbytes(self) -> dict[str, int]:
        """Bytes allocated by the cache: ``compressed``, ``full_precision`` and ``total``."""
        totals = {"compressed": 0, "full_precision": 0}
        for layer in self.layers:
            if isinstance(layer, TurboQuantStaticLayer):
                part = layer.nbytes()
            elif getattr(layer, "is_initialized", False):
                part = {"compressed": 0, "full_precision": 2 * layer.keys.numel() * layer.keys.element_size()}
            else:
                continue
            for k in totals:
                totals[k] += part[k]
        totals["total"] = totals["compressed"] + totals["full_precision"]
        return totals

    def bytes_per_token(self) -> float:
        """Code bytes per token per layer (K and V, all kv heads, norms included)."""
        key_cfg, value_cfg = self.settings.quantizer_configs(self.head_dim)
        text = self.model_config.get_text_config(decoder=True) if hasattr(self.model_config, "get_text_config") else self.model_config
        return getattr(text, "num_key_value_heads", 1) * (bytes_per_vector(key_cfg) + bytes_per_vector(value_cfg))


__all__ = ["TurboQuantStaticCache", "TurboQuantStaticLayer"]
