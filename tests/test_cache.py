"""TurboQuantCache on the real SmolLM2-135M model (CPU, short) plus bookkeeping on synthetic tensors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")

from turboquant import TurboQuantError  # noqa: E402
from turboquant import KVCacheConfig  # noqa: E402
from turboquant.cache import TurboQuantCache, TurboQuantLayer  # noqa: E402
from turboquant.codec import bytes_per_vector  # noqa: E402
from turboquant.quantizer import TurboQuantizer  # noqa: E402


@pytest.fixture(scope="module")
def smollm2():
    from turboquant.demo.models import find_smollm2_gguf, load_smollm2

    try:
        find_smollm2_gguf()
    except (ImportError, FileNotFoundError) as exc:
        pytest.skip(f"SmolLM2 package not available: {exc}")
    torch.manual_seed(0)
    model, tok = load_smollm2(dtype=torch.float32)
    return model, tok


@pytest.fixture(scope="module")
def prompt_ids(smollm2):
    from turboquant.demo.models import pydoc_text

    _, tok = smollm2
    return tok(pydoc_text()[:4000], return_tensors="pt").input_ids[:, :192]


def _teacher_forced_logits(model, ids: torch.Tensor, prefix: int, cache) -> torch.Tensor:
    """Prefill ``prefix`` tokens, then feed the rest one token at a time; logits of the fed tokens."""
    with torch.no_grad():
        model(ids[:, :prefix], past_key_values=cache, use_cache=True)
        steps = [model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(prefix, ids.shape[1])]
    return torch.cat(steps, dim=1)


@pytest.mark.slow
def test_k4v4_tracks_full_precision(smollm2, prompt_ids) -> None:
    """Criterion: with ≥ 96 compressed tokens feeding 40 decode steps, K4/V4 agrees with the
    full-precision cache on ≥ 90% of next-token argmaxes and the mean KL is < 0.05 nats."""
    from transformers import DynamicCache

    model, _ = smollm2
    ids = prompt_ids[:, :136]
    ref = _teacher_forced_logits(model, ids, 96, DynamicCache(config=model.config))
    cache = TurboQuantCache(model.config, key_bits=4, value_bits=4, window=16, flush_every=8)
    got = _teacher_forced_logits(model, ids, 96, cache)
    assert cache.layers[0].compressed_length >= 96
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean().item()
    assert agree >= 0.9, f"top-1 agreement {agree:.3f}"
    assert kl < 0.05, f"KL {kl:.4f}"


@pytest.mark.slow
def test_greedy_generate_with_cache(smollm2, prompt_ids) -> None:
    """Criterion: greedy K4/V4 decoding reproduces the first 6 full-precision tokens."""
    model, _ = smollm2
    ids = prompt_ids[:, :128]
    ref = model.generate(ids, max_new_tokens=6, do_sample=False)
    cache = TurboQuantCache(model.config, key_bits=4, value_bits=4, window=32, flush_every=8)
    out = model.generate(ids, max_new_tokens=6, do_sample=False, past_key_values=cache)
    assert cache.layers[0].compressed_length > 0
    assert torch.equal(out, ref)


@pytest.mark.slow
def test_codes_path_equals_dequantized_sdpa(smollm2, prompt_ids) -> None:
    """The attention hook (scores from codes) must equal SDPA over the dequantized history."""
    model, _ = smollm2
    ids = prompt_ids[:, :80]
    outs = []
    for use_hook in (True, False):
        cache = TurboQuantCache(model.config, key_bits=3, value_bits=2.5, window=8, flush_every=4, key_variant="prod")
        if not use_hook:
            cache.attention_enabled = lambda: False  # type: ignore[method-assign]
            model.config._attn_implementation = "sdpa"
        outs.append(_teacher_forced_logits(model, ids, 64, cache))
    torch.testing.assert_close(outs[0], outs[1], atol=2e-3, rtol=2e-3)


@pytest.mark.slow
def test_batch_left_padding_matches_single(smollm2, prompt_ids) -> None:
    model, tok = smollm2
    tok.padding_side = "left"
    texts = [tok.decode(prompt_ids[0, :80]), tok.decode(prompt_ids[0, 20:140])]
    batch = tok(texts, return_tensors="pt", padding=True)
    cache = TurboQuantCache(model.config, key_bits=4, value_bits=4, window=16, flush_every=8, center_keys=False)
    out = model.generate(**batch, max_new_tokens=5, do_sample=False, past_key_values=cache)
    assert cache.get_seq_length() == batch.input_ids.shape[1] + 4
    for row, text in enumerate(texts):
        single = tok(text, return_tensors="pt")
        single_cache = TurboQuantCache(model.config, key_bits=4, value_bits=4, window=16, flush_every=8, center_keys=False)
        ref = model.generate(**single, max_new_tokens=5, do_sample=False, past_key_values=single_cache)
        assert out[row, -5:].tolist()[:3] == ref[0, -5:].tolist()[:3]


@pytest.mark.slow
def test_beam_search_runs_and_reorders(smollm2, prompt_ids) -> None:
    model, _ = smollm2
    ids = prompt_ids[:, :64]
    cache = TurboQuantCache(model.config, key_bits=4, value_bits=4, window=8, flush_every=4)
    out = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False, past_key_values=cache)
    ref = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False)
    assert out.shape == ref.shape
    assert out[0, 64:66].tolist() == ref[0, 64:66].tolist()


# ---------------------------------------------------------------------- synthetic bookkeeping


class _Cfg:
    num_hidden_layers = 2
    hidden_size = 128
    num_attention_heads = 4
    num_key_value_heads = 2
    head_dim = 64
    layer_types = ["full_attention", "sliding_attention"]
    sliding_window = 16
    _attn_implementation = "sdpa"


def _kv(b: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 2, n, 64, generator=g), torch.randn(b, 2, n, 64, generator=g)


def test_layers_storage_and_nbytes() -> None:
    cache = TurboQuantCache(_Cfg(), key_bits=4, value_bits=2.5, window=8, flush_every=4, sink_tokens=0)
    assert _Cfg._attn_implementation == "sdpa"  # class attribute untouched; the instance was switched
    layer = cache.layers[0]
    assert isinstance(layer, TurboQuantLayer) and not isinstance(cache.layers[1], TurboQuantLayer)
    k, v = _kv(3, 40)
    layer.update(k, v)
    assert layer.compressed_length == 0  # prefill stays full precision until the next update
    k2, v2 = _kv(3, 1, seed=1)
    keys, values = layer.update(k2, v2)
    assert layer.compressed_length == 32 and keys.shape[-2] == 9 and layer.get_seq_length() == 41
    key_cfg, value_cfg = cache.settings.quantizer_configs(64)
    per_token = bytes_per_vector(key_cfg) + bytes_per_vector(value_cfg)
    offsets = 3 * 2 * 64 * 4  # the key means, fp32
    assert layer.nbytes()["compressed"] == 3 * 2 * 32 * per_token + offsets
    assert per_token == (32 + 2) + (20 + 2)


def test_long_prompt_buffer_is_given_back() -> None:
    """After a long prompt is compressed, the full-precision buffer shrinks to the window (memory = what nbytes reports)."""
    cache = TurboQuantCache(_Cfg(), key_bits=4, value_bits=4, window=8, flush_every=4, sink_tokens=2)
    layer = cache.layers[0]
    k, v = _kv(2, 500)
    layer.update(k, v)
    assert layer._fk.data.shape[2] >= 500
    window_before = k[:, :, -8:]
    layer.update(*_kv(2, 1, seed=3))
    spare = 8 + 4 + 1
    assert layer._fk.data.shape[2] <= 2 + 8 + spare and layer._fv.data.shape[2] <= 2 + 8 + spare
    assert layer.full_length == 2 + 9 and layer.get_seq_length() == 501
    held = layer._fk.tokens  # [sink | window]
    torch.testing.assert_close(held[:, :, 2:-1], window_before)  # the kept window moved intact
    torch.testing.assert_close(held[:, :, :2], k[:, :, :2])  # the sink too
    keys = layer.dequantized_history(layer._fk.tokens, layer._fv.tokens)[0]
    assert keys.shape[-2] == 501 and torch.equal(keys[:, :, -9:-1], window_before)
    for step in range(30):  # steady decoding stays within the small buffer
        layer.update(*_kv(2, 1, seed=10 + step))
    assert layer._fk.data.shape[2] <= 2 + 8 + spare and layer.get_seq_length() == 531


def test_reorder_and_select_keep_rows_consistent() -> None:
    cache = TurboQuantCache(_Cfg(), key_bits=4, value_bits=4, window=4, flush_every=2, sink_tokens=2)
    layer = cache.layers[0]
    k, v = _kv(3, 20)
    layer.update(k, v)
    layer.update(*_kv(3, 1, seed=2))
    before = layer.dequantized_history(layer.keys, layer.values)[0]
    layer.reorder_cache(torch.tensor([2, 0, 1]))
    after = layer.dequantized_history(layer.keys, layer.values)[0]
    torch.testing.assert_close(after, before[[2, 0, 1]])
    layer.batch_select_indices(torch.tensor([1]))
    torch.testing.assert_close(layer.dequantized_history(layer.keys, layer.values)[0], before[[0]])
    layer.crop(-3)
    assert layer.get_seq_length() == 18


@pytest.mark.parametrize("bits", [2, 3.5])
def test_norm_correction_restores_norms(bits: float) -> None:
    """``norm_correction="kv"`` stores ``‖x‖/‖ŷ‖``: decoded tokens keep their norm (fp16 storage),
    while plain Lloyd-Max reconstructions are shorter by about ``sqrt(1 - D_mse)``."""
    k, v = _kv(2, 60)
    got = {}
    for correction in ("", "kv"):
        cache = TurboQuantCache(_Cfg(), key_bits=bits, value_bits=bits, window=8, flush_every=4, sink_tokens=3,
                                center_keys=False, norm_correction=correction)  # fmt: skip
        layer = cache.layers[0]
        layer.update(k, v)
        layer.update(*_kv(2, 1, seed=3))
        n = layer.compressed_length
        assert n == 60 - 3 - 8
        dk, dv = _dequantized(layer)
        got[correction] = (dk.norm(dim=-1) / k[:, :, 3 : 3 + n].norm(dim=-1), dv.norm(dim=-1) / v[:, :, 3 : 3 + n].norm(dim=-1))
    for ratio in got["kv"]:
        torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=2e-3, rtol=0)
    for ratio in got[""]:
        assert ratio.mean() < 0.995  # Lloyd-Max shrinks: E‖ŷ‖² = 1 − D_mse
    with pytest.raises(TurboQuantError, match="norm_correction"):
        KVCacheConfig(norm_correction="q")


def _dequantized(layer: TurboQuantLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """The compressed part of a layer, decoded (offsets re-added)."""
    ck, cv = layer.compressed_keys(), layer.compressed_values()
    dk = TurboQuantizer.from_config(ck.config).dequantize(ck)
    dv = TurboQuantizer.from_config(cv.config).dequantize(cv)
    if layer.key_offset is not None:
        dk = dk + layer.key_offset.unsqueeze(-2)
    return dk, dv


def test_bad_configurations() -> None:
    with pytest.raises(TurboQuantError, match="bits=9"):
        TurboQuantCache(_Cfg(), key_bits=9)
    with pytest.raises(TurboQuantError, match="unknown KVCacheConfig fields"):
        TurboQuantCache(_Cfg(), keybits=4)
    with pytest.raises(TurboQuantError, match="window"):
        KVCacheConfig(window=-1)
    with pytest.raises(TurboQuantError, match="out of range"):
        TurboQuantCache(_Cfg(), full_precision_layers=(5,))
    with pytest.raises(ValueError):
        TurboQuantCache(_Cfg(), key_variant="qjl")

    class Mamba(_Cfg):
        layer_types = ["full_attention", "mamba"]

    with pytest.raises(TurboQuantError, match="mamba"):
        TurboQuantCache(Mamba())


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("key_variant", ["mse", "prod"])
def test_hook_matches_sdpa_over_dequantized_history(head_dim: int, dtype: torch.dtype, key_variant: str) -> None:
    """GQA (4 query heads on 2 kv heads), padding mask, every head_dim and dtype."""
    from turboquant.cache import _sdpa, turboquant_attention

    class Cfg(_Cfg):
        layer_types = ["full_attention", "full_attention"]

    Cfg.head_dim = head_dim
    cache = TurboQuantCache(Cfg(), key_bits=3.5, value_bits=2, window=6, flush_every=2, key_variant=key_variant, sink_tokens=2, center_values=True)
    layer = cache.layers[0]
    g = torch.Generator().manual_seed(head_dim)
    k, v = (torch.randn(2, 2, 30, head_dim, generator=g).to(dtype) for _ in range(2))
    layer.update(k, v)
    k1, v1 = (torch.randn(2, 2, 3, head_dim, generator=g).to(dtype) for _ in range(2))
    keys, values = layer.update(k1, v1)
    assert layer.compressed_length == 22 and layer.get_seq_length() == 33
    q = torch.randn(2, 4, 3, head_dim, generator=g).to(dtype)
    mask = torch.ones(2, 1, 3, 33, dtype=torch.bool).tril(diagonal=30)
    mask[1, :, :, :5] = False  # left padding of row 1
    module = SimpleNamespace(layer_idx=0)  # what the model's attention module passes: its layer index
    got, _ = turboquant_attention(module, q, keys, values, mask, scaling=head_dim**-0.5)
    full_k, full_v = layer.dequantized_history(keys, values)
    ref = _sdpa(None, q.double(), full_k.double(), full_v.double(), mask, head_dim**-0.5).transpose(1, 2)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), ref, atol=tol, rtol=tol)


def _attend(layer: TurboQuantLayer, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    from turboquant.cache import turboquant_attention

    out, _ = turboquant_attention(SimpleNamespace(layer_idx=layer.layer_idx), q, keys, values, None, scaling=q.shape[-1] ** -0.5)
    return out


@pytest.mark.parametrize("scale", [1e5, 1e-30])
def test_extreme_key_norms_neither_fail_nor_poison(scale: float) -> None:
    """Keys scaled by 1e5 (norms far above float16's 65,504) or 1e-30 (below its subnormals):
    no error in the middle of a forward, no NaN, and attention still matches the dequantized history."""
    from turboquant.cache import _sdpa

    cache = TurboQuantCache(_Cfg(), window=4, flush_every=2, sink_tokens=2)
    layer = cache.layers[0]
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, 2, 40, 64, generator=g) * scale, torch.randn(2, 2, 40, 64, generator=g)
    layer.update(k[:, :, :30], v[:, :, :30])
    keys, values = layer.update(k[:, :, 30:], v[:, :, 30:])
    assert layer.compressed_length > 0
    q = torch.randn(2, 4, 10, 64, generator=g) / max(scale, 1.0)  # keep the scores O(1) for scale 1e5
    out = _attend(layer, q, keys, values)
    assert torch.isfinite(out).all()
    if scale > 1:
        assert layer.key_codes.config.norm_dtype == "float32"  # promoted instead of overflowing float16
    full_k, full_v = layer.dequantized_history(keys, values)
    mask = torch.ones(1, 1, 10, 40, dtype=torch.bool).tril(diagonal=30)
    ref = _sdpa(None, q.double(), full_k.double(), full_v.double(), mask, 64**-0.5).transpose(1, 2)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


def test_keys_far_from_the_origin_keep_float16_norms() -> None:
    """Keys near a large common mean (norms ~24,000, above the float16 limit; centred ~8): the flush subtracts the
    mean inside the encode, the ‖x‖ + ‖μ‖ bound sends it to the exact check on the centred keys, and the layer
    keeps float16 norms; the keys still decode to within the 4-bit error of the centred ones."""
    cache = TurboQuantCache(_Cfg(), window=4, flush_every=2, sink_tokens=2)
    layer = cache.layers[0]
    g = torch.Generator().manual_seed(3)
    k = 3000.0 + torch.randn(2, 2, 40, 64, generator=g)
    v = torch.randn(2, 2, 40, 64, generator=g)
    layer.update(k[:, :, :30], v[:, :, :30])
    keys, values = layer.update(k[:, :, 30:], v[:, :, 30:])
    assert layer.compressed_length > 0 and layer.key_scale is None
    assert layer.key_codes.config.norm_dtype == "float16"
    full_k, _ = layer.dequantized_history(keys, values)
    centred = k - layer.key_offset.unsqueeze(-2)
    rel = (full_k - k).norm(dim=-1) / centred.norm(dim=-1)
    assert rel.max() < 0.25 and rel.mean() < 0.1  # measured 0.15 and 0.06 (4-bit codes; sinks and window exact)


def test_nan_in_one_sequence_stays_in_that_sequence() -> None:
    """Non-finite K/V propagate like the full-precision cache: only the sequence that had them is affected."""
    clean, dirty = (TurboQuantCache(_Cfg(), window=4, flush_every=2, sink_tokens=2) for _ in range(2))
    g = torch.Generator().manual_seed(2)
    k, v = torch.randn(3, 2, 24, 64, generator=g), torch.randn(3, 2, 24, 64, generator=g)
    k_bad = k.clone()
    k_bad[1, 0, 9, 5] = float("nan")  # a token that ends up compressed
    outs = []
    for cache, keys_in in ((clean, k), (dirty, k_bad)):
        layer = cache.layers[0]
        layer.update(keys_in[:, :, :20], v[:, :, :20])
        keys, values = layer.update(keys_in[:, :, 20:21], v[:, :, 20:21])
        assert layer.compressed_length > 0
        outs.append(_attend(layer, torch.randn(3, 4, 1, 64, generator=torch.Generator().manual_seed(3)), keys, values))
    assert torch.equal(outs[0][[0, 2]], outs[1][[0, 2]])
    assert torch.isnan(outs[1][1]).any()


def test_flush_subtracts_the_offsets_inside_the_encode() -> None:
    """quantize_into(x, offset=μ) writes the codes of x − μ; the norm check bounds ‖x − μ‖ without the centered copy."""
    from turboquant import QuantizerConfig
    from turboquant.codec import code_bytes
    from turboquant.kernels import quantize_into
    from turboquant.kvstore import FLOAT16_NORM_LIMIT, norms_overflow_float16

    cfg = QuantizerConfig(64, 3, seed=2)
    x = torch.randn(2, 3, 7, 64, dtype=torch.bfloat16) * 4 + 1
    off = x.float().mean(2)
    want = TurboQuantizer.from_config(cfg).quantize(x.float() - off.unsqueeze(2))
    codes = torch.zeros(2, 3, 9, code_bytes(cfg), dtype=torch.uint8)
    norms = torch.zeros(2, 3, 9)
    quantize_into(x, cfg, codes, norms, 2, backend="torch", offset=off)
    assert torch.equal(codes[:, :, 2:], want.codes) and torch.equal(norms[:, :, 2:], want.norms)
    # a large common offset: ‖x‖ overflows float16, ‖x − μ‖ does not; the bound says "check", the exact check says no
    big = torch.full((1, 1, 64), FLOAT16_NORM_LIMIT / 4.0)
    xb = big.unsqueeze(2) + torch.randn(1, 1, 5, 64)
    assert norms_overflow_float16(xb, big) and not norms_overflow_float16(xb - big.unsqueeze(2))
    assert not norms_overflow_float16(torch.randn(1, 1, 5, 64), torch.randn(1, 1, 64))
