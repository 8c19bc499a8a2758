"""Decode attention from TurboQuant codes vs bf16 SDPA (flash) on one GPU: check, tune, time.

One script for one lease of the GPU (see docs/kernel_notes.md for what each run measured):

    PYTHONUNBUFFERED=1 python benchmarks/gpu_decode.py --sweep --check --bench --graph --encode --e2e --out $OUT

* ``--check``: full-size correctness of the Triton kernels against float64 references
  (fresh random inputs per case, outputs and partials poisoned with NaN).
* ``--sweep``: a few kernel variants on Llama-3.1-8B shapes (B=8, N=32k, K4/V4); the fastest is used after.
* ``--bench``: decode latency for 32 query / 8 KV heads, head_dim 128, batch {1, 8, 32},
  context {4k, 16k, 64k, 128k}, K/V bits {4/4, 4/3, 3/3, 2/2}, next to torch SDPA in bf16
  (flash backend) on the same card, plus achieved bandwidth as a fraction of a measured copy.
* ``--encode``: fused encode throughput (bytes read + written) against the copy bandwidth.
* ``--e2e``: Llama-architecture model (random weights) decoding at 32k context with
  ``TurboQuantCache`` vs ``DynamicCache``, and the longest context in a fixed memory budget.

* ``--baseline DIR``: also time the previous kernels (``DIR/triton_attention_v3.py`` and
  ``DIR/triton_encode_v3.py``, e.g. from ``git show``) on the same card in the same run.
* ``--hf``: ``TurboQuantCache`` vs ``DynamicCache`` (SDPA) on small random-weight Llama models
  (teacher-forced top-1 agreement and logit differences, greedy tokens).

Writes ``gpu_decode.json`` (card named) and a log under ``--out``; ``--plot FILE.json`` makes the PNG.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from turboquant import QuantizerConfig  # noqa: E402
from turboquant.quantizer import bytes_per_vector, code_bytes  # noqa: E402

RESULTS: dict = {}


def log(*args: object) -> None:
    print(*args, flush=True)


def save(out_dir: Path) -> None:
    (out_dir / "gpu_decode.json").write_text(json.dumps(RESULTS, indent=1, default=str))


def bench(fn, rep_ms: int = 120) -> float:
    """Median milliseconds (Triton do_bench: CUDA events, L2 flushed before every call)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def copy_bandwidth() -> float:
    n = 1 << 30  # 2 GiB in bf16 elements
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    bw = 2 * src.numel() * src.element_size() / (ms * 1e-3)
    del src, dst
    torch.cuda.empty_cache()
    return bw


def kernel_info(fn) -> dict:
    """Registers / spills / shared memory of the most recently compiled variant of a Triton kernel."""
    try:
        kernels = []
        for cache in getattr(fn, "device_caches", {}).values():
            kernels += list((cache[0] if isinstance(cache, tuple) else cache).values())
        if not kernels:
            kernels = list(getattr(fn, "cache", {}).get(0, {}).values())
        k = kernels[-1]
        return {"regs": int(k.n_regs), "spills": int(k.n_spills), "smem": int(k.metadata.shared)}
    except Exception as exc:  # informative only
        return {"error": str(exc)[:100]}


BASELINE: dict = {}  # "attention"/"encode" → modules of the previous kernels (--baseline)


def load_baseline(folder: Path) -> None:
    import importlib.util

    for key, name in (("attention", "triton_attention_v3"), ("encode", "triton_encode_v3")):
        path = folder / f"{name}.py"
        if not path.exists():
            continue
        spec = importlib.util.spec_from_file_location(f"turboquant.kernels.{name}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        BASELINE[key] = mod
    log(f"baseline kernels loaded: {sorted(BASELINE)}")


# --------------------------------------------------------------------------- check


CHECK_CASES = [
    # d, kbits, vbits, G, B, N, W, L, extras
    (128, 4, 4, 4, 1, 131072, 128, 1, "boolmask+koff"),
    (128, 4, 4, 4, 8, 32768, 128, 1, ""),
    (128, 4, 4, 8, 64, 4096, 64, 1, ""),
    (128, 3, 3, 4, 8, 16384, 32, 1, "koff+voff"),
    (128, 2, 2, 1, 4, 65536, 0, 1, ""),
    (128, 4, 3, 8, 2, 1, 17, 1, ""),
    (128, 2.5, 3.5, 4, 4, 20000, 8, 1, ""),
    (128, 8, 8, 4, 1, 10000, 4, 1, ""),
    (128, 4, 4, 4, 2, 8192, 64, 64, "causal"),
    (64, 4, 4, 4, 16, 8192, 128, 1, "f32norms"),
    (64, 3, 2, 1, 1, 131072, 1, 1, ""),
    (256, 4, 4, 2, 4, 8192, 32, 1, ""),
    (80, 4, 3, 4, 2, 5000, 10, 1, ""),
    (96, 3, 4, 4, 2, 3000, 10, 1, ""),
    (128, 2, 4, 8, 32, 16384, 128, 1, "boolmask"),
]


def run_check() -> None:
    from turboquant.kernels import triton_attention as ta
    from turboquant.kernels.testing import float64_attention, random_codes, relative_error

    real_empty = ta._empty

    def poisoned(*shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    rows = []
    ta._empty = poisoned
    try:
        for i, (d, kb, vb, g, b, n, w, l, extra) in enumerate(CHECK_CASES):
            torch.manual_seed(1000 + i)
            hkv = 8
            nd = "float32" if "f32norms" in extra else "float16"
            kc = QuantizerConfig(d, kb, seed=2 * i, norm_dtype=nd)
            vc = QuantizerConfig(d, vb, seed=2 * i + 1, norm_dtype=nd)
            keys = random_codes(kc, (b, hkv, n), "cuda", capacity=n + 256)
            values = random_codes(vc, (b, hkv, n), "cuda", capacity=n + 256)
            q = torch.randn(b, hkv * g, l, d, device="cuda", dtype=torch.bfloat16) * 2
            fk = torch.randn(b, hkv, w, d, device="cuda", dtype=torch.bfloat16) if w else None
            fv = torch.randn(b, hkv, w, d, device="cuda", dtype=torch.bfloat16) if w else None
            mask = ko = vo = None
            if "boolmask" in extra:
                mask = torch.rand(b, 1, l, n + w, device="cuda") > 0.1
            if "causal" in extra:
                t = n + w
                mask = torch.arange(t, device="cuda")[None, :] <= (torch.arange(l, device="cuda")[:, None] + t - l)
                mask = torch.zeros(1, 1, l, t, device="cuda").masked_fill(~mask, float("-inf"))
            if "koff" in extra:
                ko = torch.randn(b, hkv, d, device="cuda")
            if "voff" in extra:
                vo = torch.randn(b, hkv, d, device="cuda")
            scale = d**-0.5
            out = ta.triton_quantized_attention(q.float(), keys, values, fk, fv, scale, mask, ko, vo)
            torch.cuda.synchronize()
            ref = float64_attention(q.float(), keys, values, fk, fv, scale, mask, ko, vo)
            err = relative_error(out, ref) if torch.isfinite(out).all() else float("inf")
            row = dict(d=d, k_bits=kb, v_bits=vb, G=g, B=b, N=n, W=w, L=l, extra=extra, rel_err=err, ok=err <= 1e-3)
            rows.append(row)
            log(f"check d={d:3d} K{kb}/V{vb} G={g} B={b:2d} N={n:6d} W={w:3d} L={l:2d} {extra:14s} rel_err={err:.2e} {'OK' if row['ok'] else 'FAIL'}")
            del keys, values, q, fk, fv, out, ref
            torch.cuda.empty_cache()
    finally:
        ta._empty = real_empty
    RESULTS["check"] = rows


# --------------------------------------------------------------------------- decode benchmark


def make_decode_inputs(b: int, n: int, kb: float, vb: float, hq: int = 32, hkv: int = 8, d: int = 128):
    from turboquant.kernels.testing import random_codes

    kc = QuantizerConfig(d, kb, seed=1, norm_dtype="float16")
    vc = QuantizerConfig(d, vb, seed=2, norm_dtype="float16")
    keys = random_codes(kc, (b, hkv, n), "cuda")
    values = random_codes(vc, (b, hkv, n), "cuda")
    q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
    nbytes = b * hkv * n * (bytes_per_vector(kc) + bytes_per_vector(vc))
    return q, keys, values, nbytes


GRAPH: dict = {}  # CUDA-graph replay times (no Python launch overhead), filled when --graph is on


def bench_graph(fn) -> float:
    """Median ms of CUDA-graph replays (L2 not flushed: only meaningful when the data exceeds L2)."""
    from triton.testing import do_bench_cudagraph

    return float(do_bench_cudagraph(fn, rep=100, return_mode="median"))


def time_ours(b: int, n: int, kb: float, vb: float, graph: bool = False, impl=None, tag: str = "ours") -> tuple[float, int]:
    from turboquant.kernels import triton_attention as ta

    impl = impl or ta
    q, keys, values, nbytes = make_decode_inputs(b, n, kb, vb)
    fn = lambda: impl.triton_quantized_attention(q, keys, values, None, None, 128**-0.5)  # noqa: E731
    fn()
    ms = bench(fn)
    if graph:
        try:
            GRAPH[(tag, b, n, kb, vb)] = bench_graph(fn)
        except Exception as exc:
            log(f"graph capture failed: {str(exc)[:200]}")
    del q, keys, values
    return ms, nbytes


def time_sdpa(b: int, n: int, hq: int = 32, hkv: int = 8, d: int = 128, graph: bool = False) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    k = torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
    res = {"bytes": 2 * k.numel() * k.element_size()}
    f = torch.nn.functional.scaled_dot_product_attention
    # GQA folded into the query length: one pass over each KV head (what decode kernels do)
    qf = q.reshape(b, hkv, hq // hkv, d)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        try:
            res["flash_folded_ms"] = bench(lambda: f(qf, k, v))
        except RuntimeError as exc:
            res["flash_folded_err"] = str(exc)[:200]
        try:
            res["flash_gqa_ms"] = bench(lambda: f(q, k, v, enable_gqa=True))
        except (RuntimeError, TypeError) as exc:
            res["flash_gqa_err"] = str(exc)[:200]
        if graph and "flash_folded_ms" in res:
            try:
                res["graph_ms"] = bench_graph(lambda: f(qf, k, v))
            except Exception as exc:
                log(f"graph capture failed: {str(exc)[:200]}")
    times = [res[k_] for k_ in ("flash_folded_ms", "flash_gqa_ms") if k_ in res]
    res["ms"] = min(times) if times else float("nan")
    del k, v, q, qf
    torch.cuda.empty_cache()
    return res


SWEEP = [  # v4 candidates (docs/kernel_notes.md): dotk = keys decoded into the mma operand layout,
    # num_stages ≥ 2 = cp.async pipelining of the code loads, maxnreg = occupancy. The first is the default.
    {"dotk": 1, "num_stages": 2, "maxnreg": 96},
    {"dotk": 0, "num_stages": 1, "maxnreg": 0},  # v3 structure with v4 loads
    {"dotk": 1, "num_stages": 1, "maxnreg": 0},
    {"dotk": 1, "num_stages": 2, "maxnreg": 0},
    {"dotk": 1, "num_stages": 1, "maxnreg": 96},
    {"dotk": 1, "num_stages": 3, "maxnreg": 96},
    {"dotk": 1, "num_stages": 2, "maxnreg": 96, "programs_per_sm": 5},
    {"dotk": 1, "num_stages": 2, "maxnreg": 96, "programs_per_sm": 10},
]
SWEEP_SETS = {
    "v4": SWEEP,
    # run 2 of v4: CTA shape (fewer warps per program = fewer block-wide barriers per token)
    "warps": [
        {"dotk": 1, "num_stages": 3, "maxnreg": 96},
        {"dotk": 1, "num_stages": 2, "maxnreg": 0, "num_warps": 2, "block_n": 32, "programs_per_sm": 16},
        {"dotk": 1, "num_stages": 3, "maxnreg": 0, "num_warps": 2, "block_n": 32, "programs_per_sm": 16},
        {"dotk": 1, "num_stages": 2, "maxnreg": 0, "num_warps": 2, "block_n": 32, "programs_per_sm": 8},
        {"dotk": 1, "num_stages": 2, "maxnreg": 0, "num_warps": 8, "block_n": 128, "programs_per_sm": 4},
        {"dotk": 1, "num_stages": 2, "maxnreg": 0, "num_warps": 1, "block_n": 16, "programs_per_sm": 32},
    ],
}
SWEEP_SHAPES = ((8, 32768, 4, 4), (32, 32768, 4, 4))
SWEEP_LOW_BITS = ((8, 32768, 2, 2), (8, 32768, 3, 3))  # timed for the first three variants only


def run_sweep(sweep_set: str = "v4") -> None:
    from turboquant.kernels import triton_attention as ta

    SWEEP = SWEEP_SETS[sweep_set]  # noqa: N806

    base = dict(ta.TUNING)
    rows = []
    totals: dict[int, float] = {}  # variant index → summed time over the sweep shapes
    for vi, variant in enumerate(SWEEP):
        ta.TUNING.clear()
        ta.TUNING.update(base, **variant)
        for shape in SWEEP_SHAPES + (SWEEP_LOW_BITS if vi < 3 else ()):
            try:
                ms, nbytes = time_ours(*shape)
            except Exception as exc:  # keep sweeping: a variant may not compile
                log(f"sweep {shape} {variant}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
                totals[vi] = float("inf")
                continue
            info = kernel_info(ta.triton_quantized_attention_kernel)
            rows.append(dict(shape=shape, variant=variant, ms=ms, gbps=nbytes / ms / 1e6, kernel=info))
            log(f"sweep B={shape[0]} N={shape[1]} K{shape[2]}/V{shape[3]} {str(variant):60s} {ms * 1e3:8.1f} us  {nbytes / ms / 1e6:7.0f} GB/s  {info}")
            if shape in SWEEP_SHAPES:
                totals[vi] = totals.get(vi, 0.0) + ms
            torch.cuda.empty_cache()
    if BASELINE.get("attention") is not None:
        for shape in SWEEP_SHAPES + SWEEP_LOW_BITS:
            ms, nbytes = time_ours(*shape, impl=BASELINE["attention"], tag="v3")
            rows.append(dict(shape=shape, variant="v3 (committed)", ms=ms, gbps=nbytes / ms / 1e6))
            log(f"sweep B={shape[0]} N={shape[1]} K{shape[2]}/V{shape[3]} {'v3 (committed kernel)':60s} {ms * 1e3:8.1f} us  {nbytes / ms / 1e6:7.0f} GB/s")
    finite = {k: v for k, v in totals.items() if math.isfinite(v)}
    if finite:
        RESULTS["sweep_best"] = SWEEP[min(finite, key=finite.__getitem__)]
    ta.TUNING.clear()
    ta.TUNING.update(base, **RESULTS.get("sweep_best", {}))
    RESULTS["sweep"] = rows
    RESULTS["tuning"] = dict(ta.TUNING)
    log("tuning used from here:", ta.TUNING)


BENCH_SHAPES = [(8, 32768), (8, 65536), (8, 131072), (32, 16384), (32, 32768), (32, 65536), (32, 131072), (1, 131072)]


def run_bench(copy_bw: float, graph: bool = False) -> None:
    from turboquant.kernels import triton_attention as ta

    rows = []
    for b, n in BENCH_SHAPES:
        if True:
            sd = time_sdpa(b, n, graph=graph)
            for kb, vb in ((4, 4), (4, 3), (3, 3), (2, 2)):
                try:
                    ms, nbytes = time_ours(b, n, kb, vb, graph=graph)
                except Exception as exc:
                    log(f"bench B={b} N={n} K{kb}/V{vb}: FAILED {type(exc).__name__}: {str(exc)[:400]}")
                    continue
                info = kernel_info(ta.triton_quantized_attention_kernel)
                v3_ms = None
                if BASELINE.get("attention") is not None:
                    try:
                        v3_ms = time_ours(b, n, kb, vb, impl=BASELINE["attention"], tag="v3")[0]
                    except Exception as exc:
                        log(f"v3 timing failed: {str(exc)[:200]}")
                row = dict(
                    B=b, N=n, k_bits=kb, v_bits=vb, ms=ms, sdpa_ms=sd["ms"], speedup=sd["ms"] / ms,
                    bytes=nbytes, frac_copy=nbytes / (ms * 1e-3) / copy_bw,
                    sdpa_frac_copy=sd["bytes"] / (sd["ms"] * 1e-3) / copy_bw, sdpa=sd, kernel=info,
                    v3_ms=v3_ms, speedup_vs_v3=(v3_ms / ms) if v3_ms else None,
                )  # fmt: skip
                if ("ours", b, n, kb, vb) in GRAPH and "graph_ms" in sd:
                    g_ours = GRAPH[("ours", b, n, kb, vb)]
                    row.update(graph_ms=g_ours, sdpa_graph_ms=sd["graph_ms"], graph_speedup=sd["graph_ms"] / g_ours,
                               graph_frac_copy=nbytes / (g_ours * 1e-3) / copy_bw)  # fmt: skip
                rows.append(row)
                log(
                    f"bench B={b:2d} N={n:6d} K{kb}/V{vb}: ours {ms * 1e3:8.1f} us ({row['frac_copy']:.0%} of copy)  "
                    f"sdpa bf16 {sd['ms'] * 1e3:8.1f} us ({row['sdpa_frac_copy']:.0%})  speedup {row['speedup']:.2f}x"
                    + (f"  v3 {v3_ms * 1e3:8.1f} us ({v3_ms / ms:.2f}x)" if v3_ms else "")
                    + (f"  graph {GRAPH[('ours', b, n, kb, vb)] * 1e3:.1f} us" if ("ours", b, n, kb, vb) in GRAPH else "")
                )
                torch.cuda.empty_cache()
    RESULTS["bench"] = rows


def run_encode(copy_bw: float) -> None:
    from turboquant.kernels import triton_attention as ta
    from turboquant.kernels.triton_encode import triton_quantize_into
    from turboquant.quantizer import TurboQuantizer, decode_mse

    rows = []
    r, t, d = 64, 32768, 128  # one layer of a 32k prefill at batch 8, 8 KV heads
    x = torch.randn(r, t, d, device="cuda", dtype=torch.bfloat16)
    for bits in (4, 3, 2):
        cfg = QuantizerConfig(d, bits, norm_dtype="float16")
        codes = torch.empty(r, t, code_bytes(cfg), dtype=torch.uint8, device="cuda")
        norms = torch.empty(r, t, dtype=torch.float16, device="cuda")
        # correctness at full size against the torch quantizer (first 4 rows), per variant below
        ref = TurboQuantizer.from_config(cfg).quantize(x[:4])
        nbytes = x.numel() * x.element_size() + codes.numel() + norms.numel() * 2
        best = None
        for bt, warps, mode, per_sm in ((64, 4, 2, 4), (64, 4, 2, 2), (128, 8, 2, 2), (64, 4, 0, 0)):
            ta.TUNING.update(encode_block_t=bt, encode_num_warps=warps, encode_bucket=mode, encode_programs_per_sm=per_sm)
            try:
                out = triton_quantize_into(x, cfg, codes, norms, 0)
                same_v = (decode_mse(out.codes[:4], cfg) == decode_mse(ref.codes, cfg)).float().mean().item()
                ms = bench(lambda: triton_quantize_into(x, cfg, codes, norms, 0))
            except Exception as exc:
                log(f"encode bits={bits} bt={bt} w={warps} mode={mode}: FAILED {str(exc)[:200]}")
                continue
            info = kernel_info(sys.modules["turboquant.kernels.triton_encode"].triton_quantize_kernel)
            log(f"encode bits={bits} bt={bt} warps={warps} bucket={mode} per_sm={per_sm}: {ms * 1e3:8.1f} us  {nbytes / ms / 1e6:7.0f} GB/s ({nbytes / (ms * 1e-3) / copy_bw:.0%} of copy) same={same_v:.6f} {info}")
            if best is None or ms < best[0]:
                best = (ms, bt, warps, mode, per_sm, same_v)
        v3_ms = None
        if BASELINE.get("encode") is not None:
            try:
                v3_ms = bench(lambda: BASELINE["encode"].triton_quantize_into(x, cfg, codes, norms, 0))
                log(f"encode bits={bits} v3 (committed kernel): {v3_ms * 1e3:8.1f} us ({nbytes / (v3_ms * 1e-3) / copy_bw:.0%} of copy)")
            except Exception as exc:
                log(f"encode v3 failed: {str(exc)[:200]}")
        ms_torch = bench(lambda: TurboQuantizer.from_config(cfg).quantize(x), rep_ms=100)
        assert best is not None
        rows.append(dict(bits=bits, rows=r, tokens=t, same_codes=best[5], ms=best[0], block_t=best[1], warps=best[2], bucket=best[3], programs_per_sm=best[4], bytes=nbytes, frac_copy=nbytes / (best[0] * 1e-3) / copy_bw, torch_quantize_ms=ms_torch, v3_ms=v3_ms, v3_frac_copy=(nbytes / (v3_ms * 1e-3) / copy_bw) if v3_ms else None))
        log(f"encode bits={bits}: identical codes {best[5]:.5f}; best {best[0] * 1e3:.1f} us = {rows[-1]['frac_copy']:.0%} of copy; torch quantize {ms_torch * 1e3:.0f} us")
    ta.TUNING.update(encode_block_t=128, encode_num_warps=8, encode_bucket=2, encode_programs_per_sm=2)
    RESULTS["encode"] = rows


# --------------------------------------------------------------------------- end to end


def run_e2e(batch: int, context: int, steps: int, device: str = "cuda", tiny: bool = False) -> None:
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from turboquant.cache import TurboQuantCache

    cfg = LlamaConfig(  # Llama-3.2-3B shapes: 28 layers, 24 query / 8 KV heads, head_dim 128
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
        rope_theta=500000.0, tie_word_embeddings=True,
    )  # fmt: skip
    if tiny:  # CPU smoke test of this function
        cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size = 2, 256, 512, 1000
        cfg.num_attention_heads = 2 * cfg.num_key_value_heads
    cfg._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    hkv, d, layers = 8, 128, cfg.num_hidden_layers

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()
    res: dict = {"model": "Llama-3.2-3B-shaped, random weights, bf16", "batch": batch, "context": context, "steps": steps}

    def fill(cache) -> None:
        # "prefill" by writing random bf16 keys/values straight into the cache (the decode speed is measured)
        gen = torch.Generator(device=device).manual_seed(0)
        for i in range(layers):
            k = torch.randn(batch, hkv, context, d, device=device, dtype=torch.bfloat16, generator=gen)
            v = torch.randn(batch, hkv, context, d, device=device, dtype=torch.bfloat16, generator=gen)
            cache.update(k, v, i)
            del k, v

    def decode(cache, name: str) -> None:
        ids = torch.randint(0, cfg.vocab_size, (batch, 1), device=device)
        with torch.no_grad():
            for _ in range(3):  # warm-up (compiles; first TurboQuant step compresses the filled window)
                ids = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                ids = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
            sync()
            dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
        res[name] = {"tokens_per_s": batch * steps / dt, "ms_per_step": dt / steps * 1e3, "peak_alloc_gib": peak}
        log(f"e2e {name}: {batch * steps / dt:.1f} tokens/s ({dt / steps * 1e3:.2f} ms/step)")

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cache = DynamicCache()
    fill(cache)
    decode(cache, "dynamic_bf16")
    del cache
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cache = TurboQuantCache(model.config, key_bits=4, value_bits=4)
    fill(cache)
    decode(cache, "turboquant_k4v4")
    nbytes = cache.nbytes()
    tokens = cache.get_seq_length()
    res["turboquant_cache_bytes"] = nbytes
    del cache
    model.config._attn_implementation = "sdpa"
    # longest context in a fixed KV budget (per sequence): bytes per token from the cache's own accounting
    from turboquant.cache import KVCacheConfig

    kcfg, vcfg = KVCacheConfig(key_bits=4, value_bits=4).quantizer_configs(d)
    bf16_tok = layers * hkv * 2 * d * 2
    tq_tok = layers * hkv * (bytes_per_vector(kcfg) + bytes_per_vector(vcfg))
    window_tok = 128 + 32  # full-precision window + flush slack
    budget = 16 * 2**30
    ctx_bf16 = budget // bf16_tok
    ctx_tq = (budget - window_tok * bf16_tok) // tq_tok + window_tok
    measured_tok = nbytes["total"] / (tokens * batch)
    res["memory"] = dict(budget_gib=16, bf16_bytes_per_token=bf16_tok, tq_bytes_per_token=tq_tok, measured_tq_bytes_per_token=measured_tok,
                         max_context_bf16=int(ctx_bf16), max_context_tq=int(ctx_tq), ratio=ctx_tq / ctx_bf16)  # fmt: skip
    log(f"e2e memory: {res['memory']}")
    res["speedup"] = res["turboquant_k4v4"]["tokens_per_s"] / res["dynamic_bf16"]["tokens_per_s"]
    RESULTS["e2e"] = res
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


def run_hf_check(prompt: int = 2048, steps: int = 32, device: str = "cuda") -> None:
    """TurboQuantCache vs DynamicCache (SDPA) on small random-weight Llama models, bf16 on CUDA.

    Teacher-forced: both caches get the same prompt and then the same tokens (DynamicCache's greedy
    choices), so per-step top-1 agreement and logit differences compare like with like; greedy
    generation with each cache is compared too.
    """
    import transformers
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from turboquant.cache import TurboQuantCache

    res: dict = {"transformers": transformers.__version__, "prompt": prompt, "steps": steps, "runs": []}
    log(f"hf: transformers {transformers.__version__}, turboquant.cache imported")
    for head_dim, bits in ((64, 4), (128, 4), (128, 3), (128, 2)):
        torch.manual_seed(0)
        cfg = LlamaConfig(
            hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, head_dim=head_dim, vocab_size=4096, max_position_embeddings=8192,
        )  # fmt: skip
        cfg._attn_implementation = "sdpa"
        model = LlamaForCausalLM(cfg).to(device=device, dtype=torch.bfloat16).eval()
        ids = torch.randint(0, cfg.vocab_size, (2, prompt), device=device)

        def forced(cache) -> torch.Tensor:
            logits = []
            with torch.no_grad():
                out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                logits.append(out.logits[:, -1].float())
                for i in range(steps):
                    tok = ref_tokens[:, i : i + 1] if ref_tokens is not None else logits[-1].argmax(-1, keepdim=True)
                    out = model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
                    logits.append(out.logits[:, -1].float())
            return torch.stack(logits, 1)  # [B, steps + 1, V]

        ref_tokens = None
        ref = forced(DynamicCache())
        ref_tokens = ref.argmax(-1)[:, :steps]
        ref = forced(DynamicCache())
        cache = TurboQuantCache(model.config, key_bits=bits, value_bits=bits)
        tq = forced(cache)
        tq_torch = forced(TurboQuantCache(model.config, key_bits=bits, value_bits=bits, backend="torch"))
        compressed = getattr(cache.layers[0], "compressed_length", None)
        compressed = compressed() if callable(compressed) else compressed
        agree = (tq.argmax(-1) == ref.argmax(-1)).float().mean().item()
        diff = (tq - ref).abs()
        scale = ref.abs().max().item()
        with torch.no_grad():
            g_ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False, past_key_values=DynamicCache())[:, prompt:]
            g_tq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False, past_key_values=TurboQuantCache(model.config, key_bits=bits, value_bits=bits))[:, prompt:]
        row = dict(head_dim=head_dim, bits=bits, top1_agreement=agree, max_logit_diff=diff.max().item(), mean_logit_diff=diff.mean().item(),
                   max_abs_logit=scale, greedy_match=(g_ref == g_tq).float().mean().item(),
                   greedy_prefix=int((g_ref == g_tq).all(0).long().cumprod(0).sum().item()), compressed_tokens=compressed,
                   triton_vs_torch_max_logit_diff=(tq - tq_torch).abs().max().item(),
                   triton_vs_torch_top1=(tq.argmax(-1) == tq_torch.argmax(-1)).float().mean().item())  # fmt: skip
        res["runs"].append(row)
        log(f"hf d={head_dim} K{bits}/V{bits}: {row}")
        del model, cache
        if device == "cuda":
            torch.cuda.empty_cache()
    RESULTS["hf_check"] = res


# --------------------------------------------------------------------------- plot


def plot(json_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(json_path.read_text())
    rows = data["bench"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), sharey=False)
    for ax, b in zip(axes, (1, 8, 32)):
        sub = [r for r in rows if r["B"] == b]
        ns = sorted({r["N"] for r in sub})
        sd = [next(r["sdpa_ms"] for r in sub if r["N"] == n) * 1e3 for n in ns]
        ax.plot(ns, sd, "k-o", label="SDPA flash bf16")
        for kb, vb in ((4, 4), (4, 3), (3, 3), (2, 2)):
            ys = [next(r["ms"] for r in sub if r["N"] == n and r["k_bits"] == kb and r["v_bits"] == vb) * 1e3 for n in ns]
            ax.plot(ns, ys, "-o", label=f"TurboQuant K{kb}/V{vb}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("decode attention latency (µs)")
        ax.set_title(f"batch {b}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Decode attention, Llama-3.1-8B shapes (32 q / 8 kv heads, d=128) on {data['device']}")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--encode", action="store_true")
    ap.add_argument("--e2e", action="store_true")
    ap.add_argument("--graph", action="store_true", help="also time both methods as CUDA-graph replays")
    ap.add_argument("--baseline", type=Path, help="folder with the previous kernels (triton_attention_v3.py, triton_encode_v3.py)")
    ap.add_argument("--hf", action="store_true", help="TurboQuantCache vs DynamicCache on small random Llama models")
    ap.add_argument("--sweep-set", default="v4", choices=sorted(SWEEP_SETS))
    ap.add_argument("--e2e-batch", type=int, default=4)
    ap.add_argument("--e2e-context", type=int, default=32768)
    ap.add_argument("--e2e-steps", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    ap.add_argument("--plot", type=Path, help="make the PNG from an existing JSON and exit")
    args = ap.parse_args()
    if args.plot:
        plot(args.plot, args.plot.with_suffix(".png"))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    import triton

    props = torch.cuda.get_device_properties(0)
    RESULTS.update(device=props.name, sms=props.multi_processor_count, torch=torch.__version__, triton=triton.__version__)
    log(f"device {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}")
    t0 = time.time()
    if args.baseline:
        try:
            load_baseline(args.baseline)
        except Exception:
            log(traceback.format_exc())
    sections = [("sweep", args.sweep, lambda: run_sweep(args.sweep_set)), ("check", args.check, run_check)]
    for name, on, fn in sections:
        if on:
            try:
                fn()
            except Exception:
                RESULTS[f"{name}_error"] = traceback.format_exc()
                log(traceback.format_exc())
            log(f"[{name} done at {time.time() - t0:.0f} s]")
            save(args.out)
    if args.bench or args.encode:
        RESULTS["copy_bw_gbps"] = copy_bandwidth() / 1e9
        log(f"device-to-device copy: {RESULTS['copy_bw_gbps']:.0f} GB/s (read + write)")
    for name, on, fn in (
        ("bench", args.bench, lambda: run_bench(RESULTS["copy_bw_gbps"] * 1e9, args.graph)),
        ("encode", args.encode, lambda: run_encode(RESULTS["copy_bw_gbps"] * 1e9)),
        ("e2e", args.e2e, lambda: run_e2e(args.e2e_batch, args.e2e_context, args.e2e_steps)),
        ("hf", args.hf, run_hf_check),
    ):
        if on:
            try:
                fn()
            except Exception:
                RESULTS[f"{name}_error"] = traceback.format_exc()
                log(traceback.format_exc())
            log(f"[{name} done at {time.time() - t0:.0f} s]")
            save(args.out)
    if "bench" in RESULTS:
        log("\nB     N      K/V   ours_us  sdpa_us  speedup  frac_copy | graph: ours_us sdpa_us speedup frac_copy")
        for r in RESULTS["bench"]:
            g = ""
            if "graph_ms" in r:
                g = f"| {r['graph_ms'] * 1e3:8.1f} {r['sdpa_graph_ms'] * 1e3:8.1f} {r['graph_speedup']:6.2f} {r['graph_frac_copy']:6.0%}"
            v3 = f" | v3 {r['v3_ms'] * 1e3:8.1f} ({r['speedup_vs_v3']:.2f}x)" if r.get("v3_ms") else ""
            log(f"{r['B']:2d} {r['N']:7d}  {r['k_bits']}/{r['v_bits']}  {r['ms'] * 1e3:8.1f} {r['sdpa_ms'] * 1e3:8.1f}  {r['speedup']:6.2f}  {r['frac_copy']:6.0%} {g}{v3}")
    save(args.out)


if __name__ == "__main__":
    main()
