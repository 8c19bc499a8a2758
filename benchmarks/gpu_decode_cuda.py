"""Decode attention on a GPU: the warp-level CUDA kernel vs bf16 SDPA (flash and cuDNN), side by side.

Llama-3.1-8B shapes (32 query / 8 kv heads, head_dim 128), one query token per sequence.
Every time is a CUDA-graph replay median (``triton.testing.do_bench_cudagraph``) of the
whole call (ours: query rotation + decode kernel + combine kernel; bf16: one SDPA call),
and ours again with the cache's full-precision tokens (``WINDOW``: sinks + window) in the same launch,
after an eager median (``do_bench``, L2 flushed) for reference. Bytes read: codes + fp16
norms of every compressed key and value (ours), K + V in bf16 (SDPA). "% of copy" divides
bytes read per second by the measured device-to-device copy rate (read + write).

    PYTHONUNBUFFERED=1 python benchmarks/gpu_decode_cuda.py --check --bench --sweep --out $OUT
    PYTHONUNBUFFERED=1 python benchmarks/gpu_decode_cuda.py --waves --out $OUT   # splits per head (CudaTuning.waves)

Writes ``gpu_decode_cuda_<card>.json`` to ``--out`` (and benchmarks/results/ unless --out is given).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from turboquant import QuantizerConfig  # noqa: E402
from turboquant.kernels import cuda_attention as ca  # noqa: E402
from turboquant.kernels.testing import float64_attention, random_codes, relative_error  # noqa: E402
from turboquant.codec import bytes_per_vector  # noqa: E402
from turboquant.kernels.tuning import CudaTuning  # noqa: E402

RESULTS: dict = {"rows": [], "sweep": [], "check": []}
HQ, HKV, D = 32, 8, 128
WINDOW = 145  # KVCacheConfig defaults: 16 sinks + 128 window + the new token


def log(*a: object) -> None:
    print(*a, flush=True)


def eager_ms(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def graph_ms(fn) -> float:
    from triton.testing import do_bench_cudagraph

    return float(do_bench_cudagraph(fn, rep=100, return_mode="median"))


def copy_bandwidth() -> float:
    src = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = eager_ms(lambda: dst.copy_(src))
    del src, dst
    torch.cuda.empty_cache()
    return 2 * (1 << 30) * 2 / (ms * 1e-3)


_INPUTS: dict = {}


def inputs(b: int, n: int, bits: int):
    """Random codes of one shape, kept while the same shape is asked for (the sweep reuses them)."""
    key = (b, n, bits)
    if key not in _INPUTS:
        _INPUTS.clear()
        torch.cuda.empty_cache()
        _INPUTS[key] = _make_inputs(b, n, bits)
    return _INPUTS[key]


def _make_inputs(b: int, n: int, bits: int):
    kc = QuantizerConfig(D, bits, seed=1, norm_dtype="float16")
    vc = QuantizerConfig(D, bits, seed=2, norm_dtype="float16")
    keys = random_codes(kc, (b, HKV, n), "cuda")
    values = random_codes(vc, (b, HKV, n), "cuda")
    q = torch.randn(b, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
    nbytes = b * HKV * n * (bytes_per_vector(kc) + bytes_per_vector(vc))
    return q, keys, values, nbytes


def sdpa(b: int, n: int) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    k = torch.randn(b, HKV, n, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(b, HKV, HQ // HKV, D, device="cuda", dtype=torch.bfloat16)  # GQA folded into the query length
    f = torch.nn.functional.scaled_dot_product_attention
    res: dict = {"bytes": 2 * k.numel() * 2}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                f(q, k, v)
                res[f"{name}_eager_ms"] = eager_ms(lambda: f(q, k, v))
                res[f"{name}_graph_ms"] = graph_ms(lambda: f(q, k, v))
        except Exception as exc:  # backend unavailable for this shape
            res[f"{name}_err"] = str(exc)[:160]
    g = [res[f"{x}_graph_ms"] for x in ("flash", "cudnn") if f"{x}_graph_ms" in res]
    e = [res[f"{x}_eager_ms"] for x in ("flash", "cudnn") if f"{x}_eager_ms" in res]
    res["graph_ms"] = min(g) if g else float("nan")
    res["eager_ms"] = min(e) if e else float("nan")
    res["best"] = min((x for x in ("flash", "cudnn") if f"{x}_graph_ms" in res), key=lambda x: res[f"{x}_graph_ms"], default=None)
    del k, v, q
    torch.cuda.empty_cache()
    return res


def ours(b: int, n: int, bits: int, variant=None, parts: bool = False, fused: bool = True) -> dict:
    tuning = CudaTuning(variant=variant, fused=fused)
    q, keys, values, nbytes = inputs(b, n, bits)
    fn = lambda: ca.cuda_quantized_attention(q, keys, values, None, None, D**-0.5, tuning=tuning)  # noqa: E731
    fn()
    v = ca._resolve_variant(bits, bits, tuning)
    regs, spill, ctas, smem = ca.variant_info(bits, bits, D, v, False, q.device, variant is not None)
    res = {"bytes": nbytes, "variant": list(v), "fused": fused, "regs": regs, "spill_bytes": spill, "ctas_per_sm": ctas, "smem": smem,
           "graph_ms": graph_ms(fn)}  # fmt: skip
    if parts:  # time of the decode kernel alone (same launch as inside the wrapper), the rest = rotation + combine
        res["eager_ms"] = eager_ms(fn)
        captured = {}
        orig = ca._module(q.device, variant is not None)

        class Spy:
            def __getattr__(self, name):
                return getattr(orig, name)

            def decode(self, *a):
                captured["args"] = a
                return orig.decode(*a)

        ca._MODULES[variant is not None] = Spy()
        try:
            fn()
        finally:
            ca._MODULES[variant is not None] = orig
        a = captured["args"]
        res["kernel_graph_ms"] = graph_ms(lambda: orig.decode(*a))
        res["splits"] = a[9][24]
    from turboquant.kernels import triton_attention as ta

    if parts:
        # as the cache calls it: + the full-precision sinks and window (16 + 128 + 1 bf16 tokens)
        fk = torch.randn(b, HKV, WINDOW, D, device="cuda", dtype=torch.bfloat16)
        fv = torch.randn_like(fk)
        res["window_graph_ms"] = graph_ms(lambda: ca.cuda_quantized_attention(q, keys, values, fk, fv, D**-0.5, tuning=tuning))
        res["triton_v4_graph_ms"] = graph_ms(lambda: ta.triton_quantized_attention(q, keys, values, None, None, D**-0.5))
        # ablation: the same decode kernel with the Triton combine instead of the fused finish
        unfused = CudaTuning(variant=variant, fused=False)
        res["unfused_graph_ms"] = graph_ms(lambda: ca.cuda_quantized_attention(q, keys, values, None, None, D**-0.5, tuning=unfused))
    return res


VARIANTS = [  # (warps, tiles, prefetch 0 none / 3 next iteration in registers, decoder (cuda_attention.cu key_table), CTAs/SM cap)
    (8, 2, 0, 1, 0), (8, 2, 3, 1, 2), (8, 1, 3, 1, 2), (8, 4, 0, 1, 0), (8, 2, 0, 3, 0), (8, 2, 0, 5, 0),
]  # fmt: skip
# 2 bits, decoder: 0 registers, 1 the 8-byte-entry table, 2 keys registers + values table, 3 even key words by
# table + values table, 4 keys table + values registers
VARIANTS2 = [
    (8, 2, 0, 0, 0), (4, 4, 0, 0, 0), (8, 2, 0, 1, 0), (8, 2, 0, 2, 0), (8, 2, 0, 3, 0), (8, 2, 0, 4, 0), (4, 4, 0, 1, 0),
]  # fmt: skip


def run_check(widths: tuple[int, ...] = (4, 3, 2)) -> None:
    """Every timed variant against float64 (fresh random inputs, B=2, N=5000, window of 4)."""
    for bits in widths:
        for v in VARIANTS2 if bits == 2 else VARIANTS:
            tuning = CudaTuning(variant=v)
            torch.manual_seed(hash((bits, v)) % 1000)
            kc = QuantizerConfig(D, bits, seed=3, norm_dtype="float16")
            vc = QuantizerConfig(D, bits, seed=4, norm_dtype="float16")
            keys, values = random_codes(kc, (2, HKV, 5003), "cuda"), random_codes(vc, (2, HKV, 5003), "cuda")
            q = torch.randn(2, HQ, 1, D, device="cuda") * 3
            fk, fv = torch.randn(2, HKV, 4, D, device="cuda"), torch.randn(2, HKV, 4, D, device="cuda")
            out = ca.cuda_quantized_attention(q, keys, values, fk, fv, D**-0.5, tuning=tuning)
            err = relative_error(out, float64_attention(q, keys, values, fk, fv, D**-0.5))
            RESULTS["check"].append({"bits": bits, "variant": list(v), "rel_err": err})
            log(f"check K{bits}V{bits} variant {v}: rel err {err:.2e} {'OK' if err < 3e-3 else 'FAIL'}")


def run_sweep(copy_bw: float, widths: tuple[int, ...] = (4, 3, 2)) -> None:
    for b, n, bits in ((8, 65536, 4), (1, 131072, 4), (32, 65536, 4), (8, 65536, 3), (8, 65536, 2)):
        if bits not in widths:
            continue
        for v in VARIANTS2 if bits == 2 else (VARIANTS if b != 32 else VARIANTS[:4]):
            try:
                r = ours(b, n, bits, variant=v)
            except Exception as exc:
                log(f"sweep B={b} N={n} K{bits} {v}: {str(exc)[:200]}")
                continue
            r.update(B=b, N=n, bits=bits, frac_copy=r["bytes"] / (r["graph_ms"] * 1e-3) / copy_bw)
            r.pop("eager_ms", None)
            RESULTS["sweep"].append(r)
            log(f"sweep B={b:2d} N={n:6d} K{bits}V{bits} {v}: {r['graph_ms'] * 1e3:7.1f} us  {r['frac_copy']:5.0%} of copy"
                f"  regs {r['regs']} spill {r['spill_bytes']} ctas/SM {r['ctas_per_sm']}")  # fmt: skip


def run_waves(copy_bw: float) -> None:
    """CTAs launched per resident slot (CudaTuning.waves: more splits of each head), default variant."""
    RESULTS.setdefault("waves", [])
    for b, n in ((8, 32768), (8, 65536), (1, 32768), (1, 131072)):
        s = sdpa(b, n)
        q, keys, values, nbytes = inputs(b, n, 4)
        for w in (1, 2, 3):
            fn = partial(ca.cuda_quantized_attention, q, keys, values, None, None, D**-0.5, tuning=CudaTuning(waves=w))
            fn()
            ms = graph_ms(fn)
            RESULTS["waves"].append({"B": b, "N": n, "waves": w, "graph_ms": ms, "bf16_graph_ms": s["graph_ms"],
                                     "speedup": s["graph_ms"] / ms, "frac_copy": nbytes / (ms * 1e-3) / copy_bw})  # fmt: skip
            log(f"waves B={b:2d} N={n:6d} waves {w}: {ms * 1e3:7.1f} us ({RESULTS['waves'][-1]['frac_copy']:4.0%} of copy) | "
                f"bf16 {s['graph_ms'] * 1e3:7.1f} us | {s['graph_ms'] / ms:.2f}x")  # fmt: skip


def run_bench(copy_bw: float) -> None:
    shapes = [(b, n, 4) for b in (1, 8, 32) for n in (32768, 65536, 131072)] + [(8, 65536, 3), (8, 65536, 2)]
    base: dict = {}
    for b, n, bits in shapes:
        if (b, n) not in base:
            base[(b, n)] = sdpa(b, n)
        s = base[(b, n)]
        r = ours(b, n, bits, parts=True)
        row = {
            "B": b, "N": n, "k_bits": bits, "v_bits": bits, **{f"ours_{k}": v for k, v in r.items()},
            "sdpa": s, "speedup_graph": s["graph_ms"] / r["graph_ms"], "speedup_eager": s["eager_ms"] / r["eager_ms"],
            "frac_copy": r["bytes"] / (r["graph_ms"] * 1e-3) / copy_bw,
            "kernel_frac_copy": r["bytes"] / (r["kernel_graph_ms"] * 1e-3) / copy_bw,
            "sdpa_frac_copy": s["bytes"] / (s["graph_ms"] * 1e-3) / copy_bw,
        }  # fmt: skip
        RESULTS["rows"].append(row)
        log(f"B={b:2d} N={n:6d} K{bits}V{bits}: ours {r['graph_ms'] * 1e3:7.1f} us (kernel {r['kernel_graph_ms'] * 1e3:6.1f}, "
            f"{row['frac_copy']:4.0%} / {row['kernel_frac_copy']:4.0%} of copy) | bf16 {s['best']} {s['graph_ms'] * 1e3:7.1f} us "
            f"({row['sdpa_frac_copy']:4.0%}) | {row['speedup_graph']:.2f}x graph, {row['speedup_eager']:.2f}x eager | "
            f"with window {r['window_graph_ms'] * 1e3:7.1f} us | triton v4 {r['triton_v4_graph_ms'] * 1e3:7.1f} us")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--waves", action="store_true", help="time CudaTuning.waves 1-3 (splits per head) at small B")
    ap.add_argument("--bits", default="4,3,2", help="widths that --check and --sweep cover (comma-separated)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    widths = tuple(int(x) for x in args.bits.split(","))
    props = torch.cuda.get_device_properties(0)
    card = props.name.replace("NVIDIA ", "").replace(" ", "_").lower()
    RESULTS["machine"] = {
        "card": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(), "threads": torch.get_num_threads(),
    }  # fmt: skip
    import triton

    RESULTS["machine"]["triton"] = triton.__version__
    t0 = time.time()
    if args.check or args.sweep:
        ca.load_extension(tune=True)
    ca.load_extension(tune=False)
    RESULTS["build_s"] = time.time() - t0
    log(f"{props.name}: extensions built/loaded in {RESULTS['build_s']:.1f} s")
    copy_bw = copy_bandwidth()
    RESULTS["copy_bw_gbps"] = copy_bw / 1e9
    log(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write)")
    out_dir = args.out or ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"gpu_decode_cuda_{card}.json"
    for flag, fn in (("check", lambda: run_check(widths)), ("sweep", lambda: run_sweep(copy_bw, widths)), ("waves", lambda: run_waves(copy_bw)),
                     ("bench", lambda: run_bench(copy_bw))):  # fmt: skip
        if getattr(args, flag):
            fn()
            _INPUTS.clear()
            path.write_text(json.dumps(RESULTS, indent=1, default=str))
    log("\nB  N       K/V  ours_us  kernel_us  %copy  bf16_us (best)  %copy  speedup(graph)  regs spill")
    for r in RESULTS["rows"]:
        log(f"{r['B']:2d} {r['N']:6d}  {r['k_bits']}/{r['v_bits']}  {r['ours_graph_ms'] * 1e3:7.1f}  {r['ours_kernel_graph_ms'] * 1e3:8.1f}"
            f"  {r['frac_copy']:5.0%}  {r['sdpa']['graph_ms'] * 1e3:7.1f} ({r['sdpa']['best']})  {r['sdpa_frac_copy']:5.0%}"
            f"  {r['speedup_graph']:5.2f}x  {r['ours_regs']} {r['ours_spill_bytes']}")  # fmt: skip
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
