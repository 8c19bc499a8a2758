"""TurboQuantCache on Qwen2-style and Gemma-3-style models (random weights, real structure; issue 11).

The models come from ``benchmarks/_families.py``: Qwen2.5-7B attention geometry (head_dim 128, GQA,
q/k/v biases with Qwen2.5-like large key biases), Gemma-3-1B attention geometry (head_dim 256, one KV
head, QK-norm, sliding-window layers between full layers). Weights are scaled so attention is peaked
(entropy ≈ SmolLM2's) and logits depend on it, so the thresholds below are tight enough that a cache
that mishandles centering or the biases fails them: ``test_qwen2_thresholds_catch_uncentered_keys``
checks that directly. Thresholds are the values measured by these tests (prefix 448 → 337 compressed
tokens, 32 teacher-forced steps) with margin; ``benchmarks/kv_families.py`` has longer runs.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402
from transformers.cache_utils import DynamicSlidingWindowLayer  # noqa: E402

from _families import compare, gemma3_style, qwen2_style, teacher_forced, text_ids  # noqa: E402
from turboquant.cache import TurboQuantCache, TurboQuantLayer  # noqa: E402

PREFIX, STEPS = 448, 32


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return text_ids(PREFIX + STEPS)


def _run(model, ids: torch.Tensor, **settings) -> tuple[dict, TurboQuantCache]:
    """Teacher-forced comparison of TurboQuantCache(**settings) against the model's DynamicCache run."""
    if not hasattr(model, "_reference"):
        model._reference = teacher_forced(model, ids, PREFIX, DynamicCache(config=model.config))
    cache = TurboQuantCache(model.config, **settings)
    got = teacher_forced(model, ids, PREFIX, cache)
    model.config._attn_implementation = "sdpa"  # the next reference run must not go through the hook
    result = compare(model._reference, got)
    print(settings, {k: v if not isinstance(v, list) else [round(x, 3) for x in v] for k, v in result.items()})
    return result, cache


@pytest.fixture(scope="module")
def qwen2():
    return qwen2_style(layers=2)


@pytest.fixture(scope="module")
def gemma3():
    return gemma3_style(layers=6)


def test_qwen2_k4v4_k3v3(qwen2, ids) -> None:
    """Measured (2 layers): K4/V4 top-1 0.88, logit rel. err 0.107, layer-0 attention err 0.13;
    K3/V3 0.69 / 0.21 / 0.26."""
    k4, cache = _run(qwen2, ids, key_bits=4, value_bits=4)
    assert all(isinstance(layer, TurboQuantLayer) and layer.compressed_length >= 300 for layer in cache.layers)
    assert all(layer.key_offset is not None for layer in cache.layers)
    assert k4["top1"] >= 0.7 and k4["logit_rel_err"] < 0.16 and k4["attn_rel_err"][0] < 0.18, k4
    k3, _ = _run(qwen2, ids, key_bits=3, value_bits=3)
    assert k3["top1"] >= 0.5 and k3["logit_rel_err"] < 0.3 and k3["attn_rel_err"][0] < 0.35, k3
    assert k3["logit_rel_err"] > k4["logit_rel_err"]


def test_qwen2_thresholds_catch_uncentered_keys(qwen2, ids) -> None:
    """The K4/V4 thresholds above fail when the large key biases are quantized with the keys
    (no centering, no smoothing): measured logit rel. err 0.39, layer-0 attention err 0.54."""
    broken, _ = _run(qwen2, ids, key_bits=4, value_bits=4, center_keys=False, key_outlier_ratio=0)
    assert broken["logit_rel_err"] > 0.3 and broken["attn_rel_err"][0] > 0.3, broken


def test_qwen2_rotating_key_biases_are_smoothed(ids) -> None:
    """Large biases on high-frequency RoPE channels rotate with position, so centering cannot remove
    them; ``key_outlier_ratio`` finds them in the prompt and moves a sqrt scale to the query.
    Measured (2 layers): logit rel. err 0.47 without smoothing, 0.23 with it; layer-0 attention
    err 0.45 and 0.20."""
    model = qwen2_style(layers=2, bias_band=(0, 32))
    off, _ = _run(model, ids, key_bits=4, value_bits=4, key_outlier_ratio=0)
    on, cache = _run(model, ids, key_bits=4, value_bits=4)
    assert all(layer.key_scale is not None for layer in cache.layers)
    assert on["logit_rel_err"] < 0.7 * off["logit_rel_err"], (on, off)
    assert on["attn_rel_err"][0] < 0.6 * off["attn_rel_err"][0], (on, off)


def test_gemma3_k4v4_k3v3(gemma3, ids) -> None:
    """Sliding layers stay exact ``DynamicSlidingWindowLayer``s, full layers are compressed.
    Measured: K4/V4 top-1 0.94, logit rel. err 0.114; K3/V3 0.69 / 0.216."""
    k4, cache = _run(gemma3, ids, key_bits=4, value_bits=4)
    kinds = gemma3.config.layer_types
    for layer, kind in zip(cache.layers, kinds):
        if kind == "sliding_attention":
            assert type(layer) is DynamicSlidingWindowLayer
            assert layer.get_seq_length() == PREFIX + STEPS and layer.keys.shape[-2] < gemma3.config.sliding_window
        else:
            assert isinstance(layer, TurboQuantLayer) and layer.compressed_length >= 300
            assert layer.key_scale is None  # QK-norm keys have no outlier channel pairs
    # layers before the first compressed one see identical inputs: exact
    assert max(k4["attn_rel_err"][:2]) < 1e-5, k4
    assert k4["top1"] >= 0.75 and k4["logit_rel_err"] < 0.16, k4
    assert max(k4["attn_rel_err"]) < 0.3, k4
    k3, _ = _run(gemma3, ids, key_bits=3, value_bits=3)
    assert k3["top1"] >= 0.5 and k3["logit_rel_err"] < 0.3, k3


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_generate_matches_manual_greedy_loop(family, request, ids) -> None:
    """``generate`` with TurboQuantCache equals a manual greedy loop over the same cache settings,
    and its first token (prefill attends in full precision) equals the full-precision one."""
    model = request.getfixturevalue(family)
    prompt = ids[:, :PREFIX]
    settings = dict(key_bits=4, value_bits=4, window=64, flush_every=8)
    with torch.no_grad():
        ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                             past_key_values=DynamicCache(config=model.config))  # fmt: skip
        model.config._attn_implementation = "sdpa"
        cache = TurboQuantCache(model.config, **settings)
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False, past_key_values=cache)
        assert any(getattr(layer, "compressed_length", 0) > 0 for layer in cache.layers)
        manual_cache = TurboQuantCache(model.config, **settings)
        seq = prompt
        step = prompt
        for _ in range(6):
            nxt = model(step, past_key_values=manual_cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
            seq, step = torch.cat([seq, nxt], dim=1), nxt
        model.config._attn_implementation = "sdpa"
    assert out.shape == ref.shape == (1, PREFIX + 6)
    assert torch.equal(out[:, : PREFIX + 1], ref[:, : PREFIX + 1])
    assert torch.equal(out, seq)
