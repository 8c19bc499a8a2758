"""Drop-in TurboQuant KV cache for Hugging Face transformers (5.x Cache API).

Usage::

    from turboquant.cache import TurboQuantCache
    cache = TurboQuantCache(model.config, key_bits=4, value_bits=3)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)

Layout per layer (tensors are ``[batch, kv_heads, seq, head_dim]`` as in transformers):

* ``sink_tokens`` first tokens and a window of the most recent tokens stay in the
  model's dtype (like ``residual_length`` in HF's ``QuantizedCache``);
* everything in between is stored only as packed TurboQuant codes plus per-token
  norms, in preallocated buffers that grow geometrically.

Attention is computed straight from the codes (``turboquant.kernels``): the query
is rotated once, scored against packed keys, values are accumulated in the
rotated domain and rotated back once. No full-precision copy of the compressed
history is materialised. Building the cache switches the model to the
``"turboquant"`` attention implementation registered below; that function runs
plain SDPA for layers that are not compressed (e.g. sliding-window layers, which
are kept in full precision), so other caches keep working.

New tokens are written to the full-precision window first and compressed on the
*next* update once the window overflows, so the prefill itself attends in full
precision and every later step reads the compressed history.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

import torch

from .codec import bytes_per_vector
from .config import KVCacheConfig, TurboQuantError, Variant, cache_settings
from .kernels import quantized_attention
from .kvstore import FullPrecisionKV, KVCodes, outlier_scale
from .quantizer import QuantizedVectors, TurboQuantizer

try:
    from transformers import AttentionInterface
    from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError("turboquant.cache needs transformers>=5: pip install 'turboquant[hf]'") from exc

logger = logging.getLogger(__name__)

# Supported transformers versions, [oldest, first unsupported): 5.4 changed sdpa_mask from
# ``cache_position`` to ``q_length``/``q_offset``, which the mask hook and get_mask_sizes rely on
# (5.0-5.3 fail in the mask code). Tested on CPU: 5.4.0, 5.5.0, 5.10.1, 5.23.0 (5.2, 5.3 fail).
# pyproject.toml states the same range; tests/test_transformers_compat.py checks both.
TRANSFORMERS_RANGE = ("5.4", "6")


def transformers_supported(version: str | None = None) -> bool:
    """Whether ``version`` (default: the installed transformers) lies in :data:`TRANSFORMERS_RANGE`."""
    import transformers
    from packaging.version import Version

    v = Version(version or transformers.__version__)
    return Version(TRANSFORMERS_RANGE[0]) <= Version(v.base_version) < Version(TRANSFORMERS_RANGE[1])


if not transformers_supported():  # pragma: no cover - depends on the installed version
    import transformers as _tf

    logger.warning("turboquant.cache supports transformers>=%s,<%s; found %s", *TRANSFORMERS_RANGE, _tf.__version__)

ATTENTION_NAME = "turboquant"


class _PendingLayers(threading.local):
    """The cache ↔ attention contract: ``update`` registers its layer under the layer index, the
    attention function of the same decoder layer (``module.layer_idx``) takes it out again.

    Per thread, so concurrent forwards in different threads do not see each other's layers; taken
    out on use, so a later forward with another cache never sees a stale layer.
    """

    def __init__(self) -> None:
        self.layers: dict[int, TurboQuantLayer] = {}


_PENDING = _PendingLayers()


class TurboQuantLayer(DynamicLayer):
    """One decoder layer's cache: full-precision sink + window, packed codes in between.

    ``update`` returns the full-precision tokens (sink then window, a view of one preallocated
    buffer) and registers the layer for the ``"turboquant"`` attention function, which combines
    them with the codes. ``keys``/``values`` are the window tokens, ``sink_keys``/``sink_values``
    the sink tokens (views).
    """

    is_sliding = False
    is_croppable = True

    def __init__(self, settings: KVCacheConfig, owner: TurboQuantCache | None = None, layer_idx: int | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.owner = owner
        self.layer_idx = layer_idx
        self.key_codes: KVCodes | None = None
        self.value_codes: KVCodes | None = None
        self.key_offset: torch.Tensor | None = None
        self.value_offset: torch.Tensor | None = None
        # [B, Hkv, d] float32 per-channel divisor of the keys (key_outlier_ratio), None when no channel needs it
        self.key_scale: torch.Tensor | None = None
        self._fk: FullPrecisionKV | None = None
        self._fv: FullPrecisionKV | None = None

    # views kept as attributes of the transformers layer API
    @property  # type: ignore[override]
    def keys(self) -> torch.Tensor | None:
        return None if self._fk is None else self._fk.window_tokens

    @keys.setter
    def keys(self, value: Any) -> None:  # DynamicLayer.__init__/reset assign None
        if value is not None:
            raise TurboQuantError("TurboQuantLayer.keys is a view of the layer's buffers; use update()")

    @property  # type: ignore[override]
    def values(self) -> torch.Tensor | None:
        return None if self._fv is None else self._fv.window_tokens

    @values.setter
    def values(self, value: Any) -> None:
        if value is not None:
            raise TurboQuantError("TurboQuantLayer.values is a view of the layer's buffers; use update()")

    @property
    def sink_keys(self) -> torch.Tensor | None:
        return None if self._fk is None else self._fk.sink_tokens

    @property
    def sink_values(self) -> torch.Tensor | None:
        return None if self._fv is None else self._fv.sink_tokens

    @property
    def full_length(self) -> int:
        """Tokens held in full precision (sink + window)."""
        return 0 if self._fk is None else self._fk.length

    # ------------------------------------------------------------------ transformers API
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.shape[-1] != value_states.shape[-1]:
            raise TurboQuantError(f"keys and values must share head_dim, got {key_states.shape[-1]} and {value_states.shape[-1]}")
        if key_states.shape[1] != value_states.shape[1]:
            raise TurboQuantError(f"keys and values must have the same kv_heads, got {key_states.shape[1]} and {value_states.shape[1]}")
        expected = self.owner.kv_heads(self.layer_idx) if self.owner is not None and self.layer_idx is not None else None
        if expected is not None and expected % key_states.shape[1]:
            # Tensor parallelism hands each rank kv_heads / tp_size whole heads: any other count means
            # heads were split mid-head or the cache was built from another model's config.
            raise TurboQuantError(
                f"layer {self.layer_idx}: got {key_states.shape[1]} kv heads, which does not divide the config's "
                f"num_key_value_heads={expected}; tensor parallelism must shard whole KV heads evenly across ranks"
            )
        self.dtype, self.device = key_states.dtype, key_states.device
        key_cfg, value_cfg = self.settings.quantizer_configs(key_states.shape[-1])
        self.key_codes = KVCodes(key_cfg)
        self.value_codes = KVCodes(value_cfg)
        self._fk, self._fv = FullPrecisionKV(key_states), FullPrecisionKV(value_states)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``[B, H, L, d]`` keys/values; returns every full-precision token (sink, then window)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self._fk is not None and self._fv is not None
        self._check_layout(key_states, value_states)
        with _device_scope(self._fk.data.device):
            self._flush()
        sink_room = self.settings.sink_tokens - self._fk.sink
        to_sink = min(sink_room, key_states.shape[-2]) if sink_room > 0 and self.compressed_length == 0 and self._fk.window == 0 else 0
        spare = self.settings.window + self.settings.flush_every + 1
        self._fk.append(key_states, to_sink, spare)
        self._fv.append(value_states, to_sink, spare)
        keys, values = self._fk.tokens, self._fv.tokens
        if self.owner is not None and not self.owner.attention_enabled():
            # Someone else's attention function will read these: give it everything (slow path).
            return self.dequantized_history(keys, values)
        if self.layer_idx is not None:
            _PENDING.layers[self.layer_idx] = self
        return keys, values

    def _check_layout(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # The buffers were sized by the first tensors this layer saw (under tensor parallelism: this
        # rank's slice of the KV heads). Anything else is another rank's or another model's layout.
        assert self._fk is not None
        held = (*self._fk.data.shape[:2], self._fk.data.shape[3])
        for name, x in (("keys", key_states), ("values", value_states)):
            got = (x.shape[0], x.shape[1], x.shape[3])
            if got != held or x.device != self._fk.data.device:
                raise TurboQuantError(
                    f"layer {self.layer_idx}: {name} of [batch, kv_heads, head_dim] = {list(got)} on {x.device}, but this "
                    f"cache layer holds {list(held)} on {self._fk.data.device}; one cache serves one rank's heads on one "
                    "device (build a cache per tensor-parallel rank, reset it before changing the batch)"
                )

    def get_seq_length(self) -> int:
        return self.full_length + self.compressed_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def reset(self) -> None:
        self.key_codes = self.value_codes = None
        self.key_offset = self.value_offset = self.key_scale = None
        self._fk = self._fv = None
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._apply_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._apply_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            idx = torch.as_tensor(indices, device=self.device)
            if idx.dtype == torch.bool:
                idx = idx.nonzero().flatten()
            self._apply_batch(lambda t: t.index_select(0, idx.to(t.device)))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop expects a negative number of tokens to remove, got {tokens_to_remove}")
        remove = -tokens_to_remove
        if remove == 0 or not self.is_initialized:
            return
        assert self._fk is not None and self._fv is not None
        removed = self._fk.crop(remove)
        self._fv.crop(remove)
        remove -= removed
        if remove:
            assert self.key_codes is not None and self.value_codes is not None
            keep = max(0, self.compressed_length - remove)
            remove -= self.compressed_length - keep
            self.key_codes.truncate(keep)
            self.value_codes.truncate(keep)
        if remove:
            self._fk.crop_sink(remove)
            self._fv.crop_sink(remove)

    # ------------------------------------------------------------------ compressed storage
    @property
    def compressed_length(self) -> int:
        return 0 if self.key_codes is None else self.key_codes.length

    def compressed_keys(self) -> QuantizedVectors | None:
        return None if not self.compressed_length else self.key_codes.view()  # type: ignore[union-attr]

    def compressed_values(self) -> QuantizedVectors | None:
        return None if not self.compressed_length else self.value_codes.view()  # type: ignore[union-attr]

    def nbytes(self) -> dict[str, int]:
        """Bytes held: ``compressed`` (codes + every scalar + offsets) and ``full_precision``."""
        if not self.is_initialized:
            return {"compressed": 0, "full_precision": 0}
        assert self.key_codes is not None and self.value_codes is not None and self._fk is not None and self._fv is not None
        compressed = self.key_codes.nbytes + self.value_codes.nbytes
        for offset in (self.key_offset, self.value_offset, self.key_scale):
            if offset is not None:
                compressed += offset.numel() * offset.element_size()
        return {"compressed": compressed, "full_precision": self._fk.nbytes + self._fv.nbytes}

    def _flush(self) -> None:
        """Compress the oldest window tokens once the window overflows (before adding new ones)."""
        assert self._fk is not None and self._fv is not None
        if self._fk.window <= self.settings.window + self.settings.flush_every:
            return
        excess = self._fk.window - self.settings.window
        window_k, window_v = self._fk.window_tokens, self._fv.window_tokens
        if self.compressed_length == 0:
            self._init_offsets(window_k, window_v)
        assert self.key_codes is not None and self.value_codes is not None
        old_k, old_v = window_k[:, :, :excess], window_v[:, :, :excess]
        # the offsets are subtracted inside the encode (on GPUs a bfloat16 window is then read as it is)
        k, k_off = old_k, self.key_offset
        if self.key_scale is not None:
            k = (k.float() - k_off.unsqueeze(-2) if k_off is not None else k.float()) / self.key_scale.unsqueeze(-2)
            k_off = None
        correct = self.settings.norm_correction
        self.key_codes.encode_append(k, self.settings.backend, correct.keys and self.key_codes.config.variant is Variant.MSE, k_off)
        self.value_codes.encode_append(old_v, self.settings.backend, correct.values, self.value_offset)
        spare = self.settings.window + self.settings.flush_every + 1  # as in update
        self._fk.drop_oldest_window(excess, spare)
        self._fv.drop_oldest_window(excess, spare)

    def _init_offsets(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        # Calibration-free: the per-head mean of the tokens seen so far (the prompt), fixed afterwards.
        if self.settings.center_keys:
            self.key_offset = keys.float().mean(dim=-2)
        if self.settings.center_values:
            self.value_offset = values.float().mean(dim=-2)
        if self.settings.key_outlier_ratio:
            self.key_scale = outlier_scale(keys.float() - self.key_offset.unsqueeze(-2) if self.key_offset is not None else keys.float(),
                                            self.settings.key_outlier_ratio)  # fmt: skip

    def _apply_batch(self, fn: Any) -> None:
        assert self._fk is not None and self._fv is not None
        self._fk.apply(fn)
        self._fv.apply(fn)
        if self.key_offset is not None:
            self.key_offset = fn(self.key_offset)
        if self.key_scale is not None:
            self.key_scale = fn(self.key_scale)
        if self.value_offset is not None:
            self.value_offset = fn(self.value_offset)
        if self.key_codes is not None and self.value_codes is not None and self.key_codes.buffer.tensors:
            self.key_codes.apply(fn)
            self.value_codes.apply(fn)

    def dequantized_history(self, full_keys: torch.Tensor, full_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All tokens in chronological order with the compressed part dequantized (fallback/debug only)."""
        ck, cv = self.compressed_keys(), self.compressed_values()
        if ck is None or cv is None:
            return full_keys, full_values
        dk = TurboQuantizer.from_config(ck.config).dequantize(ck)
        dv = TurboQuantizer.from_config(cv.config).dequantize(cv)
        if self.key_scale is not None:
            dk = dk * self.key_scale.unsqueeze(-2)
        if self.key_offset is not None:
            dk = dk + self.key_offset.unsqueeze(-2)
        if self.value_offset is not None:
            dv = dv + self.value_offset.unsqueeze(-2)
        s = self.sink_keys.shape[-2]
        keys = torch.cat([full_keys[:, :, :s], dk.to(full_keys.dtype), full_keys[:, :, s:]], dim=-2)
        values = torch.cat([full_values[:, :, :s], dv.to(full_values.dtype), full_values[:, :, s:]], dim=-2)
        return keys, values


class TurboQuantCache(Cache):
    """A transformers ``Cache`` whose layers store TurboQuant codes.

    Args:
        config: the model's ``PretrainedConfig`` (its text config is used for layer
            types, sliding windows and head counts). Building the cache sets
            ``config._attn_implementation = "turboquant"``.
        cache_config: a :class:`KVCacheConfig`; keyword arguments override its fields.

    Example:
        >>> cache = TurboQuantCache(model.config, key_bits=4, value_bits=2)  # doctest: +SKIP
        >>> model.generate(**inputs, past_key_values=cache, max_new_tokens=32)  # doctest: +SKIP
        >>> cache.memory_report()  # doctest: +SKIP
    """

    def __init__(self, config: Any, cache_config: KVCacheConfig | None = None, **overrides: Any) -> None:
        settings = cache_settings(cache_config, overrides)
        text_config, n_layers, head_dim, layer_types, sliding_window = model_layers(config, settings)
        layers: list[CacheLayerMixin] = []
        for idx, kind in enumerate(layer_types):
            if kind in ("sliding_attention", "chunked_attention") and sliding_window:
                # Sliding-window layers hold at most `sliding_window` tokens: keep them exact.
                layers.append(DynamicSlidingWindowLayer(sliding_window=sliding_window))
            elif idx in settings.full_precision_layers:
                layers.append(DynamicLayer())
            else:
                layers.append(TurboQuantLayer(settings, owner=self, layer_idx=idx))
        super().__init__(layers=layers)
        self.settings = settings
        self.model_config = config
        self.head_dim = head_dim
        self._kv_heads = _config_kv_heads(text_config, n_layers)
        enable_turboquant_attention(config)

    def kv_heads(self, layer_idx: int) -> int | None:
        """The config's (global) KV head count of a layer, ``None`` when the config does not say.

        Under tensor parallelism each rank's tensors hold ``kv_heads / tp_size`` of them; the cache
        sizes its buffers from the tensors, never from this number.
        """
        return self._kv_heads[layer_idx] if self._kv_heads is not None and 0 <= layer_idx < len(self._kv_heads) else None

    def attention_enabled(self) -> bool:
        impl = getattr(self.model_config, "_attn_implementation", None)
        return impl == ATTENTION_NAME

    def nbytes(self) -> dict[str, int]:
        """Bytes held by the cache: ``compressed``, ``full_precision`` and ``total``."""
        totals = {"compressed": 0, "full_precision": 0}
        for layer in self.layers:
            if isinstance(layer, TurboQuantLayer):
                part = layer.nbytes()
            elif getattr(layer, "is_initialized", False) and layer.keys is not None:
                part = {"compressed": 0, "full_precision": layer.keys.numel() * layer.keys.element_size() * 2}
            else:
                part = {"compressed": 0, "full_precision": 0}
            for k in totals:
                totals[k] += part[k]
        totals["total"] = totals["compressed"] + totals["full_precision"]
        return totals

    def memory_report(self) -> dict[str, float]:
        """Cache bytes next to an fp16 cache of the same tokens, and the compression ratios."""
        total_tokens = 0
        compressed_tokens = 0
        heads = 0
        for layer in self.layers:
            if getattr(layer, "is_initialized", False) and layer.keys is not None:
                heads = layer.keys.shape[0] * layer.keys.shape[1]
                total_tokens += layer.get_seq_length() * heads
                if isinstance(layer, TurboQuantLayer):
                    compressed_tokens += layer.compressed_length * heads
        fp16_per_token = 2 * 2 * self.head_dim  # K and V, 2 bytes per coordinate
        nbytes = self.nbytes()
        return {
            "turboquant_bytes": nbytes["total"],
            "compressed_bytes": nbytes["compressed"],
            "fp16_bytes": total_tokens * fp16_per_token,
            "ratio_total": total_tokens * fp16_per_token / max(nbytes["total"], 1),
            "ratio_compressed": compressed_tokens * fp16_per_token / max(nbytes["compressed"], 1),
        }

    def bytes_per_token(self) -> float:
        """Compressed bytes per token per layer (K and V, all kv heads), every scalar counted.

        Counts the config's (global) ``num_key_value_heads``: under tensor parallelism with ``tp``
        ranks each rank holds ``1/tp`` of this (``nbytes``/``memory_report`` count what a rank holds).
        """
        key_cfg, value_cfg = self.settings.quantizer_configs(self.head_dim)
        heads = getattr(self.model_config.get_text_config(decoder=True) if hasattr(self.model_config, "get_text_config") else self.model_config, "num_key_value_heads", 1)
        return heads * (bytes_per_vector(key_cfg) + bytes_per_vector(value_cfg))


# ---------------------------------------------------------------------- attention hook


def _sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scaling: float | None) -> torch.Tensor:
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(query.dtype)
    is_causal = mask is None and query.shape[2] > 1 and query.shape[2] == key.shape[2]
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=is_causal, scale=scaling)


def turboquant_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function (``attn_implementation="turboquant"``).

    Args:
        query: ``[B, Hq, L, d]``; key/value: ``[B, Hkv, T_full, d]`` as returned by the
            cache layer's ``update`` (full-precision tokens only for TurboQuant layers).
        attention_mask: boolean ``[B, 1, L, T_total]`` over every cached token.

    Returns:
        ``([B, L, Hq, d], None)``.
    """
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if query.shape[1] % key.shape[1]:
        raise TurboQuantError(
            f"{query.shape[1]} query heads are not a multiple of {key.shape[1]} kv heads; under tensor parallelism "
            "q_proj and k_proj/v_proj must be sharded by the same number of ranks"
        )
    layer_idx = getattr(module, "layer_idx", None)
    layer = _PENDING.layers.pop(layer_idx, None) if layer_idx is not None else None
    if layer is not None and not isinstance(layer, TurboQuantLayer):  # a layer with its own attention (static cache)
        return layer.attention(query, key, value, attention_mask, scaling)
    if layer is not None and key.shape[-2] != layer.full_length:
        raise TurboQuantError(
            f"layer {layer_idx}: attention got {key.shape[-2]} full-precision keys, the cache layer holds "
            f"{layer.full_length}; was the cache updated without attending?"
        )
    if layer is None or layer.compressed_length == 0:
        if attention_mask is not None and attention_mask.shape[-1] != key.shape[-2]:
            attention_mask = attention_mask[..., -key.shape[-2] :]
        out = _sdpa(module, query, key, value, attention_mask, scaling)
        return out.transpose(1, 2).contiguous(), None
    key_offset = layer.key_offset
    if layer.key_scale is not None:  # keys were divided by the scale before quantizing: move it to the query
        scale = layer.key_scale.unsqueeze(-2)  # [B, Hkv, 1, d]
        query = (query.float() * scale.repeat_interleave(query.shape[1] // key.shape[1], dim=1)).to(query.dtype)
        key = (key.float() / scale).to(key.dtype)
        key_offset = None if key_offset is None else key_offset / layer.key_scale
    n = layer.compressed_length
    s = layer._fk.sink  # an int: a view's shape costs a few µs per layer and step
    mask = attention_mask
    if mask is None and query.shape[2] > 1:
        mask = _causal_mask(query.shape[2], n + key.shape[-2], query.device)
    if mask is not None:  # None: one query token that sees every cached token (no padding)
        mask = mask.to(query.device)  # no-op unless a layer split left the mask on another device
        if mask.shape[-1] != n + key.shape[-2]:
            raise TurboQuantError(f"attention mask covers {mask.shape[-1]} tokens, the cache holds {n + key.shape[-2]}")
        # reorder columns to [compressed | sink | window] as the kernels expect
        mask = torch.cat([mask[..., s : s + n], mask[..., :s], mask[..., s + n :]], dim=-1)
    with _device_scope(query.device):
        out = quantized_attention(
            query,
            layer.compressed_keys(),
            layer.compressed_values(),
            key,
            value,
            scaling,
            mask=mask,
            key_offset=key_offset,
            value_offset=layer.value_offset,
            chunk=layer.settings.chunk,
            backend=layer.settings.backend,
        )
    return out.transpose(1, 2).contiguous(), None


def _device_scope(device: torch.device) -> Any:
    """Make ``device`` the current CUDA device (no-op elsewhere).

    Triton launches on the *current* device, not the tensors' one: with ``device_map="auto"`` a
    layer's cache and query can sit on ``cuda:1`` while ``cuda:0`` is current.
    """
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def model_layers(config: Any, settings: KVCacheConfig) -> tuple[Any, int, int, list[str], int | None]:
    """``(text_config, layers, head_dim, layer_types, sliding_window)`` of a model config, checked against ``settings``."""
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    n_layers = getattr(text_config, "num_hidden_layers", None)
    if not n_layers:
        raise TurboQuantError("the model config has no num_hidden_layers; cannot build a per-layer cache")
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    settings.quantizer_configs(head_dim)  # validate bits/rotation for this head_dim now, not mid-generation
    bad = [i for i in settings.full_precision_layers if not 0 <= i < n_layers]
    if bad:
        raise TurboQuantError(f"full_precision_layers {bad} out of range for {n_layers} layers")
    layer_types = getattr(text_config, "layer_types", None) or ["full_attention"] * n_layers
    for idx, kind in enumerate(layer_types):
        if kind not in ("full_attention", "sliding_attention", "chunked_attention"):
            raise TurboQuantError(f"layer {idx} has type {kind!r}, which the TurboQuant caches do not support")
    return text_config, n_layers, head_dim, list(layer_types), getattr(text_config, "sliding_window", None)


def _config_kv_heads(text_config: Any, n_layers: int) -> list[int] | None:
    """Per-layer global KV head counts from a transformers text config, ``None`` if it has none."""
    try:  # transformers >= 5.x: a view with one config per layer (layers may differ in head counts)
        configs = list(text_config.per_layer_config)
    except (AttributeError, TypeError):
        configs = []
    if len(configs) != n_layers:
        configs = [text_config] * n_layers
    heads = []
    for cfg in configs:
        count = getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_attention_heads", None)
        if not isinstance(count, int) or count < 1:
            return None
        heads.append(count)
    return heads


def _causal_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    rows = torch.arange(q_len, device=device).unsqueeze(-1) + (kv_len - q_len)
    return (torch.arange(kv_len, device=device).unsqueeze(0) <= rows)[None, None]


def _turboquant_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    # sdpa_mask returns None only for a mask without padding where every query sees every earlier
    # token and itself (one query token, or no cache yet): the attention function handles both.
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(ATTENTION_NAME, turboquant_attention)
AttentionMaskInterface.register(ATTENTION_NAME, _turboquant_mask)


def enable_turboquant_attention(config_or_model: Any) -> None:
    """Route a model's attention through :func:`turboquant_attention` (idempotent)."""
    setter = getattr(config_or_model, "set_attn_implementation", None)
    if setter is not None and hasattr(config_or_model, "config"):
        setter(ATTENTION_NAME)
        return
    configs = [config_or_model]
    if hasattr(config_or_model, "get_text_config"):
        text = config_or_model.get_text_config(decoder=True)
        if text is not config_or_model:
            configs.append(text)
    for cfg in configs:
        if getattr(cfg, "_attn_implementation", None) != ATTENTION_NAME:
            cfg._attn_implementation = ATTENTION_NAME
