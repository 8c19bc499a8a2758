"""TurboQuantStaticCache and the custom ops: eager vs compiled vs the dynamic cache, on a tiny random Llama (CPU)."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("transformers")

from turboquant import KVCacheConfig, TurboQuantError  # noqa: E402
from turboquant.cache import TurboQuantCache  # noqa: E402
from turboquant.config import QuantizerConfig  # noqa: E402
from turboquant.kernels import ops  # noqa: E402
from turboquant.kernels.reference import torch_quantized_attention  # noqa: E402
from turboquant.quantizer import QuantizedVectors, TurboQuantizer  # noqa: E402
from turboquant.static_cache import TurboQuantStaticCache, TurboQuantStaticLayer  # noqa: E402

SETTINGS = dict(key_bits=4, value_bits=3, window=8, sink_tokens=4)
PROMPT, STEPS, CAP = 24, 14, 64  # 14 steps wrap the 9-slot window ring more than once


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=64, vocab_size=300, max_position_embeddings=512)  # fmt: skip
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 300, (2, PROMPT), generator=torch.Generator().manual_seed(1))


def _greedy(model, ids, cache, forward=None, steps=STEPS, chunks=(PROMPT,)):
    """Prefill (in ``chunks``), then ``steps`` greedy one-token steps through ``forward``; (tokens, logits)."""
    forward = forward or model
    tokens, logits = [], []
    with torch.no_grad():
        start = 0
        for size in chunks:
            out = model(input_ids=ids[:, start : start + size], past_key_values=cache, use_cache=True)
            start += size
        tok = out.logits[:, -1:].argmax(-1)
        for i in range(steps):
            pos = torch.full((ids.shape[0], 1), ids.shape[1] + i, device=ids.device)
            out = forward(input_ids=tok, past_key_values=cache, use_cache=True, position_ids=pos)
            logits.append(out.logits[:, -1].float().clone())
            tok = out.logits[:, -1:].argmax(-1)
            tokens.append(tok)
    return torch.cat(tokens, 1), torch.stack(logits)


# ---------------------------------------------------------------------- ops


def _codes(cfg: QuantizerConfig, shape: tuple[int, ...]) -> QuantizedVectors:
    return TurboQuantizer.from_config(cfg).quantize(torch.randn(*shape, cfg.dim, generator=torch.Generator().manual_seed(2)))


def test_ops_opcheck_and_match_reference() -> None:
    kcfg, vcfg = QuantizerConfig(64, 4, norm_dtype="float16"), QuantizerConfig(64, 3, seed=1, norm_dtype="float16")
    kk, vk = ops.config_key(kcfg), ops.config_key(vcfg)
    assert ops.config_from_key(kk) == kcfg
    keys, values = _codes(kcfg, (2, 2, 11)), _codes(vcfg, (2, 2, 11))
    g = torch.Generator().manual_seed(3)
    q, fk, fv = (torch.randn(2, 2, 3, 64, generator=g) for _ in range(3))
    q = torch.randn(2, 4, 1, 64, generator=g)
    mask = torch.rand(2, 1, 1, 14, generator=g) > 0.3
    koff = torch.randn(2, 2, 64, generator=g)
    args = (q, keys.codes, keys.norms, values.codes, values.norms, fk, fv, mask, koff, None, 0.125, kk, vk)
    got = ops.quantized_attention_op(*args)
    ref = torch_quantized_attention(q, keys, values, fk, fv, 0.125, mask, koff)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.library.opcheck(ops.quantized_attention_op, args)

    x = torch.randn(2, 2, 5, 64, generator=g)
    codes, norms = ops.encode_op(x, kk, False)
    enc = TurboQuantizer.from_config(kcfg).quantize(x)
    assert torch.equal(codes, enc.codes) and torch.equal(norms, enc.norms.half())
    torch.library.opcheck(ops.encode_op, (x, kk, True))
    buf_c, buf_n = torch.zeros(2, 2, 9, codes.shape[-1], dtype=torch.uint8), torch.zeros(2, 2, 9, dtype=torch.float16)
    pos = torch.tensor([7, 1, 3, 0, 8])
    ops.encode_into_op(x, buf_c, buf_n, pos, kk, False)
    assert torch.equal(buf_c[:, :, pos], codes) and torch.equal(buf_n[:, :, pos], norms)
    assert not buf_c[:, :, [2, 4, 5, 6]].any()
    torch.library.opcheck(ops.encode_into_op, (x, buf_c, buf_n, pos, kk, True))


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 1.5, 2.5, 3])
def test_norm_correction_from_a_byte_table(bits: float) -> None:
    """‖ŷ‖ from the per-byte table equals the norm of the decoded codes (widths dividing 8; else None)."""
    from turboquant.codec import decode_mse, reconstruction_norms

    cfg = QuantizerConfig(96, bits)
    pair = ops.squared_norm_table(cfg, torch.device("cpu"))
    if bits in (2.5, 3):  # a 3-bit stream: the encode op corrects the norms itself
        assert pair is None
        return
    codes = _codes(cfg, (3, 50)).codes
    norms = torch.rand(3, 50) + 0.5
    want = norms / reconstruction_norms(decode_mse(codes, cfg))
    torch.testing.assert_close(ops.corrected_norms(codes, norms, *pair), want, rtol=1e-6, atol=0)


def test_ops_compile_fullgraph() -> None:
    kcfg = QuantizerConfig(64, 4, norm_dtype="float16")
    kk = ops.config_key(kcfg)
    keys = _codes(kcfg, (1, 2, 9))
    q, fk = torch.randn(1, 2, 1, 64), torch.randn(1, 2, 2, 64)

    def step(q, x, codes, norms, pos):
        c, n = ops.encode_op(x, kk, True)
        codes.index_copy_(2, pos, c)
        norms.index_copy_(2, pos, n)
        return ops.quantized_attention_op(q, codes, norms, codes, norms, fk, fk, None, None, None, 0.125, kk, kk)

    codes_e, norms_e = keys.codes.clone(), keys.norms.clone()
    x, pos = torch.randn(1, 2, 1, 64), torch.tensor([4])
    eager = step(q, x, codes_e, norms_e, pos)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(q, x, keys.codes, keys.norms, pos)
    assert torch.equal(eager, compiled) and torch.equal(codes_e, keys.codes)


@pytest.mark.parametrize("window_mask", ["none", "bool", "additive"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_compressed_length_equals_the_full_mask(window_mask: str, backend: str) -> None:
    """``compressed_length`` (a device count, the static decode step) = the explicit mask over [codes | window]."""
    from turboquant.kernels import quantized_attention

    cfg_k, cfg_v = QuantizerConfig(64, 4, seed=1), QuantizerConfig(64, 3, seed=2)
    keys, values = _codes(cfg_k, (2, 2, 40)), _codes(cfg_v, (2, 2, 40))
    q, fk, fv = torch.randn(2, 4, 1, 64), torch.randn(2, 2, 5, 64), torch.randn(2, 2, 5, 64)
    wm = None
    if window_mask != "none":
        wm = torch.tensor([True, False, True, True, False]).expand(2, 1, 1, 5).clone()
        wm[1, ..., 1] = True
        if window_mask == "additive":
            wm = torch.zeros(wm.shape).masked_fill(~wm, float("-inf"))
    for count in (0, 17, 40):
        n_t = torch.tensor(count)
        got = quantized_attention(q, keys, values, fk, fv, 0.125, mask=wm, compressed_length=n_t, backend=backend)
        visible = torch.arange(40) < count
        full_w = torch.ones(2, 1, 1, 5, dtype=torch.bool) if wm is None else (wm == 0 if wm.dtype != torch.bool else wm)
        full = torch.cat([visible.expand(2, 1, 1, 40), full_w], dim=-1)
        want = torch_quantized_attention(q, keys, values, fk, fv, 0.125, full)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_config_key_rejects_prod() -> None:
    with pytest.raises(TurboQuantError, match="MSE"):
        ops.config_from_key(ops.config_key(QuantizerConfig(64, 3, variant="prod")))


# ---------------------------------------------------------------------- cache vs dynamic cache


@pytest.mark.parametrize("extra", [{}, {"center_values": True, "key_outlier_ratio": 1.05}], ids=["default", "offsets+scale"])
def test_static_matches_dynamic_cache(model, ids, extra) -> None:
    """Same codes, same window: the dynamic cache with flush_every=0 attends to exactly the same tokens."""
    dyn_tokens, dyn_logits = _greedy(model, ids, TurboQuantCache(model.config, flush_every=0, **SETTINGS, **extra))
    cache = TurboQuantStaticCache(model.config, max_cache_len=CAP, **SETTINGS, **extra)
    tokens, logits = _greedy(model, ids, cache)
    layer = cache.layers[0]
    assert isinstance(layer, TurboQuantStaticLayer) and int(layer.cumulative_length) == PROMPT + STEPS
    if extra:
        assert (layer.key_scale != 1).any() and layer.value_offset.abs().sum() > 0  # the options are exercised
    assert torch.equal(tokens, dyn_tokens)
    torch.testing.assert_close(logits, dyn_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "head_dim,heads,kv_heads,key_bits,value_bits",
    [(80, 4, 4, 2.5, 2), (96, 8, 1, 3, 3), (256, 2, 2, 1, 8), (64, 8, 2, 1.5, 5)],
    ids=["d80-gqa1-frac", "d96-gqa8", "d256-w1w8", "d64-gqa4-frac-w5"],
)
def test_static_matches_dynamic_cache_other_shapes(head_dim, heads, kv_heads, key_bits, value_bits) -> None:
    """Head dims, GQA groups 1..8, fractional and generic widths: the static cache attends exactly as the dynamic one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    cfg = LlamaConfig(hidden_size=heads * head_dim, intermediate_size=256, num_hidden_layers=2, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=300, max_position_embeddings=512)  # fmt: skip
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 300, (2, PROMPT), generator=torch.Generator().manual_seed(4))
    settings = dict(SETTINGS, key_bits=key_bits, value_bits=value_bits)
    dyn_tokens, dyn_logits = _greedy(model, ids, TurboQuantCache(model.config, flush_every=0, **settings), steps=6)
    tokens, logits = _greedy(model, ids, TurboQuantStaticCache(model.config, max_cache_len=CAP, **settings), steps=6)
    assert torch.equal(tokens, dyn_tokens)
    torch.testing.assert_close(logits, dyn_logits, rtol=1e-4, atol=1e-4)


def test_chunked_prefill_leaves_the_same_decode_state() -> None:
    """Without prompt statistics (no centering/scale), chunked and one-shot prefill of the same
    keys/values write the same codes and window slots; decode steps then keep the ring right."""
    from turboquant.cache import _PENDING

    settings = KVCacheConfig(**SETTINGS, center_keys=False, key_outlier_ratio=0)
    g = torch.Generator().manual_seed(4)
    k, v = torch.randn(2, 2, PROMPT + 5, 64, generator=g), torch.randn(2, 2, PROMPT + 5, 64, generator=g)
    one, chunked = TurboQuantStaticLayer(settings, CAP, 0), TurboQuantStaticLayer(settings, CAP, 0)
    one.update(k[:, :, :PROMPT], v[:, :, :PROMPT])
    for a, b in ((0, 3), (3, 13), (13, PROMPT)):
        chunked.update(k[:, :, a:b], v[:, :, a:b])
    for layer in (one, chunked):
        for t in range(PROMPT, PROMPT + 5):
            keys, _ = layer.update(k[:, :, t : t + 1], v[:, :, t : t + 1])
            assert keys is layer.keys  # the static decode path
    _PENDING.layers.clear()
    for name in ("key_codes", "key_norms", "value_codes", "value_norms", "keys", "values", "slot_positions"):
        assert torch.equal(getattr(one, name), getattr(chunked, name)), name
    last = PROMPT + 5
    assert sorted(one.slot_positions.tolist()) == list(range(4)) + list(range(last - 9, last))
    for slot, p in enumerate(one.slot_positions.tolist()):  # every slot holds the token of its position
        assert torch.equal(one.keys[:, :, slot], k[:, :, p])
    enc = TurboQuantizer.from_config(one.key_config).quantize(k)
    assert torch.equal(one.key_codes[:, :, :last], enc.codes)


def test_chunked_prefill_through_the_model(model, ids) -> None:
    """Later chunks attend to the earlier chunks' codes: close to the one-shot prefill, not equal."""
    _, logits = _greedy(model, ids, TurboQuantStaticCache(model.config, max_cache_len=CAP, **SETTINGS), steps=3)
    _, logits_c = _greedy(model, ids, TurboQuantStaticCache(model.config, max_cache_len=CAP, **SETTINGS), steps=3, chunks=(3, 10, 11))
    assert (logits_c - logits).abs().max() < 0.1 * logits.abs().max()


def test_compiled_decode_equals_eager(model, ids) -> None:
    eager_tokens, eager_logits = _greedy(model, ids, TurboQuantStaticCache(model.config, max_cache_len=CAP, **SETTINGS))
    torch._dynamo.reset()
    forward = torch.compile(model.forward, backend="aot_eager", fullgraph=True)  # fullgraph: any graph break fails
    cache = TurboQuantStaticCache(model.config, max_cache_len=CAP, **SETTINGS)
    tokens, logits = _greedy(model, ids, cache, forward=forward)
    assert torch.equal(tokens, eager_tokens)
    torch.testing.assert_close(logits, eager_logits, rtol=0, atol=1e-5)
    # the same compiled step serves a reset cache (buffers keep their addresses)
    cache.reset()
    tokens2, _ = _greedy(model, ids, cache, forward=forward, steps=4)
    assert torch.equal(tokens2, eager_tokens[:, :4])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("bits", [(4, 4), (4, 3)], ids=["cuda-kernel", "triton-kernel"])
def test_cuda_graph_decode_equals_eager(model, ids, bits) -> None:
    """``mode="reduce-overhead"`` records the decode step as CUDA graphs; tokens equal the eager run.

    Runs first in a fresh kernel-table state: the tables, rotations and counters the kernels cache
    are then made during the graphs' warm-up, which fails unless they are made outside the pool.
    """
    import copy

    from turboquant.kernels import cuda_attention, cuda_encode, layout, triton_encode

    for fn in (cuda_attention._rotation_t, cuda_attention._rotation, triton_encode._rotation_columns, triton_encode._boundaries,
               cuda_encode._fragments, layout.lookup_table, layout.unrotation_blocks, layout.query_rotation):  # fmt: skip
        fn.cache_clear()
    cuda_attention._COUNTERS.clear()
    gpu, gids = copy.deepcopy(model).cuda(), ids.cuda()
    settings = dict(SETTINGS, key_bits=bits[0], value_bits=bits[1])
    torch._dynamo.reset()
    forward = torch.compile(gpu.forward, mode="reduce-overhead", fullgraph=True)
    tokens, logits = _greedy(gpu, gids, TurboQuantStaticCache(gpu.config, max_cache_len=CAP, **settings), forward=forward)
    eager_tokens, eager_logits = _greedy(gpu, gids, TurboQuantStaticCache(gpu.config, max_cache_len=CAP, **settings))
    torch._dynamo.reset()
    assert torch.equal(tokens, eager_tokens)
    torch.testing.assert_close(logits, eager_logits, rtol=0, atol=1e-4)


def test_prompt_through_the_compiled_forward_runs_eagerly(model, ids) -> None:
    """Compiling the forward that also takes the prompt: the prompt's bookkeeping is a graph break, not an error."""
    eager_tokens, _ = _greedy(model, ids, TurboQuantStaticCache(model.config, max_cache_len=CAP, **SETTINGS), steps=4)
    torch._dynamo.reset()
    forward = torch.compile(model.forward, backend="aot_eager")
    cache = TurboQuantStaticCache(model.config, max_cache_len=CAP, **SETTINGS)
    with torch.no_grad():
        tok = forward(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        tokens = []
        for i in range(4):
            pos = torch.full((ids.shape[0], 1), ids.shape[1] + i, device=ids.device)
            tok = forward(input_ids=tok, past_key_values=cache, use_cache=True, position_ids=pos).logits[:, -1:].argmax(-1)
            tokens.append(tok)
    assert torch.equal(torch.cat(tokens, 1), eager_tokens)


def test_decode_step_has_no_graph_break(model, ids) -> None:
    cache = TurboQuantStaticCache(model.config, max_cache_len=CAP, **SETTINGS)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model.forward)(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_generate_with_compile_config(model, ids) -> None:
    from transformers.generation import CompileConfig

    eager = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                           past_key_values=TurboQuantStaticCache(model.config, max_cache_len=CAP, **SETTINGS))  # fmt: skip
    config = CompileConfig(backend="aot_eager", fullgraph=True)
    config._compile_all_devices = True  # transformers compiles on CUDA only unless told
    torch._dynamo.reset()
    compiled = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6, compile_config=config,
                              past_key_values=TurboQuantStaticCache(model.config, max_cache_len=CAP, **SETTINGS))  # fmt: skip
    assert torch.equal(eager, compiled)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1


def test_left_padding_matches_dynamic_cache(model, ids) -> None:
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # second sequence left-padded
    kwargs = dict(attention_mask=mask, do_sample=False, max_new_tokens=8, output_scores=True, return_dict_in_generate=True)
    dyn = model.generate(ids, past_key_values=TurboQuantCache(model.config, flush_every=0, **SETTINGS), **kwargs)
    sta = model.generate(ids, past_key_values=TurboQuantStaticCache(model.config, max_cache_len=CAP, **SETTINGS), **kwargs)
    assert torch.equal(dyn.sequences, sta.sequences)
    torch.testing.assert_close(torch.stack(sta.scores), torch.stack(dyn.scores), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------- bookkeeping and bad input


def test_memory_is_preallocated_and_counted(model, ids) -> None:
    cache = TurboQuantStaticCache(model.config, max_cache_len=CAP, **SETTINGS)
    with torch.no_grad():
        model(input_ids=ids[:, :5], past_key_values=cache, use_cache=True)
    layer = cache.layers[0]
    kcfg, _ = KVCacheConfig(**SETTINGS).quantizer_configs(64)
    assert layer.key_codes.shape == (2, 2, CAP, kcfg.dim * 4 // 8) and layer.keys.shape == (2, 2, 4 + 9, 64)
    per_token = 2 * 2 * (layer.key_codes.shape[-1] + layer.value_codes.shape[-1] + 2 + 2)  # batch, heads, codes + fp16 norms
    n = cache.nbytes()
    assert n["compressed"] == 2 * (CAP * per_token + 3 * 2 * 2 * 64 * 4)
    assert n["full_precision"] == 2 * 2 * (2 * 2 * 13 * 64 * 4)  # float32 model
    assert cache.get_seq_length() == 5


def test_bad_inputs_raise(model, ids) -> None:
    with pytest.raises(TurboQuantError, match="max_cache_len"):
        TurboQuantStaticCache(model.config, max_cache_len=0)
    with pytest.raises(TurboQuantError, match="key_variant"):
        TurboQuantStaticCache(model.config, max_cache_len=8, key_variant="prod")
    with pytest.raises(TurboQuantError, match="windw"):
        TurboQuantStaticCache(model.config, max_cache_len=8, windw=3)
    small = TurboQuantStaticCache(model.config, max_cache_len=PROMPT + 1, **SETTINGS)
    with torch.no_grad(), pytest.raises(TurboQuantError, match="exceed max_cache_len"):
        model(input_ids=torch.cat([ids, ids], 1), past_key_values=small, use_cache=True)
    small.reset()
    with torch.no_grad():
        model(input_ids=ids, past_key_values=small, use_cache=True)
        model(input_ids=ids[:, :1], past_key_values=small, use_cache=True)  # the last free position
        with pytest.raises(TurboQuantError, match="exceeds max_cache_len"):
            model(input_ids=ids[:, :1], past_key_values=small, use_cache=True)
    cache = TurboQuantStaticCache(model.config, max_cache_len=CAP, **SETTINGS)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        with pytest.raises(TurboQuantError, match="batch"):
            model(input_ids=ids[:1, :1], past_key_values=cache, use_cache=True)
    with pytest.raises(TurboQuantError, match="fixed batch"):
        cache.batch_repeat_interleave(2)
    model.config._attn_implementation = "sdpa"  # another attention function would read only the slots
    try:
        with torch.no_grad(), pytest.raises(TurboQuantError, match="attention implementation 'turboquant'"):
            model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)
    finally:
        model.config._attn_implementation = "turboquant"


def test_benchmark_baseline_attention_equals_transformers_sdpa() -> None:
    """The bf16 side of benchmarks/gpu_e2e_static.py (grouped queries, no K/V repeat) computes transformers' SDPA."""
    from types import SimpleNamespace

    from conftest import load_benchmark
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bench = load_benchmark("gpu_e2e_static")
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(2, 8, 1, 16, generator=g), torch.randn(2, 2, 40, 16, generator=g), torch.randn(2, 2, 40, 16, generator=g)
    mask = torch.rand(2, 1, 1, 40, generator=g) > 0.4
    module = SimpleNamespace(num_key_value_groups=4, is_causal=True, training=False)
    got, _ = bench.grouped_sdpa(module, q, k, v, mask, scaling=0.25)
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_triton_backend_matches_dynamic_cache(model, ids) -> None:
    """The GPU code path (Triton encode and decode wrappers on the static buffers), run by the interpreter on CPU."""
    from turboquant.kernels import triton_available

    if not triton_available() or (not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"):
        pytest.skip("needs Triton (CUDA or TRITON_INTERPRET=1)")
    settings = dict(SETTINGS, backend="triton")
    dyn_tokens, dyn_logits = _greedy(model, ids, TurboQuantCache(model.config, flush_every=0, **settings), steps=3)
    tokens, logits = _greedy(model, ids, TurboQuantStaticCache(model.config, max_cache_len=CAP, **settings), steps=3)
    assert torch.equal(tokens, dyn_tokens)
    torch.testing.assert_close(logits, dyn_logits, rtol=1e-4, atol=1e-4)
