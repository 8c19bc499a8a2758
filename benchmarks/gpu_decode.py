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


def bench(fn, rep_ms: int = 200) -> float:
    """Median milliseconds (Triton do_bench: CUDA events, L2 flushed before every call)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=50, rep=rep_ms, return_mode="median"))


def copy_bandwidth() -> float:
    n = 1 << 30  # 2 GiB in bf16 elements
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    bw = 2 * src.numel() * src.element_size() / (ms * 1e-3)
    del src, dst
    torch.cuda.empty_cache()
    return bw


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
            log(f"check[{ta.TUNING['lut']},{ta.TUNING['precise']},{ta.TUNING['prefetch']}] d={d:3d} K{kb}/V{vb} G={g} B={b:2d} N={n:6d} W={w:3d} L={l:2d} {extra:14s} rel_err={err:.2e} {'OK' if row['ok'] else 'FAIL'}")
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


def time_ours(b: int, n: int, kb: float, vb: float, graph: bool = False) -> tuple[float, int]:
    from turboquant.kernels.triton_attention import triton_quantized_attention

    q, keys, values, nbytes = make_decode_inputs(b, n, kb, vb)
    fn = lambda: triton_quantized_attention(q, keys, values, None, None, 128**-0.5)  # noqa: E731
    fn()
    ms = bench(fn)
    if graph:
        try:
            GRAPH[("ours", b, n, kb, vb)] = bench_graph(fn)
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


SWEEP = [  # around run 2's best (precise=0)
    {"precise": 0},
    {"precise": 0, "prefetch": 0},
    {"precise": 0, "num_stages": 2},
    {"precise": 0, "num_stages": 2, "prefetch": 0},
    {"precise": 0, "block_n": 32},
    {"precise": 0, "programs_per_sm": 4},
    {"precise": 0, "programs_per_sm": 12},
    {"precise": 0, "block_n": 32, "num_stages": 2, "prefetch": 0},
    {"precise": 1},
    {"precise": 1, "num_stages": 2, "prefetch": 0},
]


def run_sweep() -> None:
    from turboquant.kernels import triton_attention as ta

    base = dict(ta.TUNING)
    rows = []
    totals: dict[int, float] = {}  # variant index → summed time over the K4/V4 shapes
    for shape in ((8, 32768, 4, 4), (1, 131072, 4, 4), (32, 32768, 4, 4), (32, 16384, 2, 2)):
        for vi, variant in enumerate(SWEEP):
            ta.TUNING.clear()
            ta.TUNING.update(base, **variant)
            try:
                ms, nbytes = time_ours(*shape)
            except Exception as exc:  # keep sweeping: a variant may not compile
                log(f"sweep {shape} {variant}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
                totals[vi] = float("inf")
                continue
            rows.append(dict(shape=shape, variant=variant, ms=ms, gbps=nbytes / ms / 1e6))
            log(f"sweep B={shape[0]} N={shape[1]} K{shape[2]}/V{shape[3]} {str(variant):60s} {ms * 1e3:8.1f} us  {nbytes / ms / 1e6:7.0f} GB/s")
            if shape[2] == 4:
                totals[vi] = totals.get(vi, 0.0) + ms
            torch.cuda.empty_cache()
    if totals:
        RESULTS["sweep_best"] = SWEEP[min(totals, key=totals.__getitem__)]
    ta.TUNING.clear()
    ta.TUNING.update(base, **RESULTS.get("sweep_best", {}))
    RESULTS["sweep"] = rows
    RESULTS["tuning"] = dict(ta.TUNING)
    log("tuning used from here:", ta.TUNING)


def run_bench(copy_bw: float, graph: bool = False) -> None:
    rows = []
    for b in (1, 8, 32):
        for n in (4096, 16384, 65536, 131072):
            sd = time_sdpa(b, n, graph=graph)
            for kb, vb in ((4, 4), (4, 3), (3, 3), (2, 2)):
                ms, nbytes = time_ours(b, n, kb, vb, graph=graph)
                row = dict(
                    B=b, N=n, k_bits=kb, v_bits=vb, ms=ms, sdpa_ms=sd["ms"], speedup=sd["ms"] / ms,
                    bytes=nbytes, frac_copy=nbytes / (ms * 1e-3) / copy_bw,
                    sdpa_frac_copy=sd["bytes"] / (sd["ms"] * 1e-3) / copy_bw, sdpa=sd,
                )  # fmt: skip
                if ("ours", b, n, kb, vb) in GRAPH and "graph_ms" in sd:
                    g_ours = GRAPH[("ours", b, n, kb, vb)]
                    row.update(graph_ms=g_ours, sdpa_graph_ms=sd["graph_ms"], graph_speedup=sd["graph_ms"] / g_ours,
                               graph_frac_copy=nbytes / (g_ours * 1e-3) / copy_bw)  # fmt: skip
                rows.append(row)
                log(
                    f"bench B={b:2d} N={n:6d} K{kb}/V{vb}: ours {ms * 1e3:8.1f} us ({row['frac_copy']:.0%} of copy)  "
                    f"sdpa bf16 {sd['ms'] * 1e3:8.1f} us ({row['sdpa_frac_copy']:.0%})  speedup {row['speedup']:.2f}x"
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
        # correctness at full size against the torch quantizer (first 4 rows)
        out = triton_quantize_into(x, cfg, codes, norms, 0)
        ref = TurboQuantizer.from_config(cfg).quantize(x[:4])
        same = (decode_mse(out.codes[:4], cfg) == decode_mse(ref.codes, cfg)).float().mean().item()
        nbytes = x.numel() * x.element_size() + codes.numel() + norms.numel() * 2
        best = None
        for bt, warps, mode in ((64, 4, 0), (128, 8, 0), (64, 8, 0)):
            ta.TUNING.update(encode_block_t=bt, encode_num_warps=warps, encode_bucket=mode)
            try:
                ms = bench(lambda: triton_quantize_into(x, cfg, codes, norms, 0))
            except Exception as exc:
                log(f"encode bits={bits} bt={bt} w={warps} mode={mode}: FAILED {str(exc)[:200]}")
                continue
            log(f"encode bits={bits} bt={bt} warps={warps} bucket={mode}: {ms * 1e3:8.1f} us  {nbytes / ms / 1e6:7.0f} GB/s ({nbytes / (ms * 1e-3) / copy_bw:.0%} of copy)")
            if best is None or ms < best[0]:
                best = (ms, bt, warps, mode)
        ms_torch = bench(lambda: TurboQuantizer.from_config(cfg).quantize(x), rep_ms=100)
        assert best is not None
        rows.append(dict(bits=bits, rows=r, tokens=t, same_codes=same, ms=best[0], block_t=best[1], warps=best[2], bucket=best[3], bytes=nbytes, frac_copy=nbytes / (best[0] * 1e-3) / copy_bw, torch_quantize_ms=ms_torch))
        log(f"encode bits={bits}: identical codes {same:.5f}; best {best[0] * 1e3:.1f} us = {rows[-1]['frac_copy']:.0%} of copy; torch quantize {ms_torch * 1e3:.0f} us")
    ta.TUNING.update(encode_block_t=64, encode_num_warps=4, encode_bucket=0)
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
    sections = [("sweep", args.sweep, run_sweep), ("check", args.check, run_check)]  # check the tuning in use
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
            log(f"{r['B']:2d} {r['N']:7d}  {r['k_bits']}/{r['v_bits']}  {r['ms'] * 1e3:8.1f} {r['sdpa_ms'] * 1e3:8.1f}  {r['speedup']:6.2f}  {r['frac_copy']:6.0%} {g}")
    save(args.out)


if __name__ == "__main__":
    main()
