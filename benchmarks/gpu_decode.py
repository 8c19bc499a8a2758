"""How fast is decode attention from TurboQuant codes next to bf16 SDPA (flash) on the same GPU?

Llama-3.1-8B shapes (32 query / 8 KV heads, head_dim 128), batch {1, 8, 32}, context 16k-128k,
K/V bits {4/4, 4/3, 3/3, 2/2}, one query token: ``triton_quantized_attention`` on random codes
next to ``scaled_dot_product_attention`` in bf16 with the flash backend (GQA folded into the query
length, and ``enable_gqa``; the faster is kept), plus the achieved bandwidth as a fraction of a
measured device-to-device copy (see docs/kernel_notes.md for what each run measured).

* ``--sweep SET``: first time a set of :class:`~turboquant.kernels.tuning.TritonTuning` variants on
  B=8/32, N=32k, K4/V4 and use the fastest for the timings (each variant is a
  ``dataclasses.replace`` of the tuning given by ``--tuning``).
* ``--graph``: also time both methods as CUDA-graph replays (no launch overhead).
* ``--baseline FILE``: also time a previous kernel file (e.g. from ``git show``) in the same run.
* ``--plot FILE.json``: only draw the PNG of an earlier result.

    PYTHONUNBUFFERED=1 python benchmarks/gpu_decode.py --sweep v4 --graph --out $OUT

Writes ``gpu_decode.json`` and ``gpu_decode.png`` into ``--out`` (the committed H200 results are
``results/gpu_decode_h200*.json``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from turboquant import QuantizerConfig
from turboquant.codec import bytes_per_vector

from _common import log, pyplot, save_figure, table
from _gpu import (
    Sections, TritonTuning, gpu_parser, bench, bench_graph, copy_bandwidth, device_info, kernel_info,
    load_baseline, tuning_from,
)  # fmt: skip

HQ, HKV, D = 32, 8, 128
BIT_PAIRS = ((4, 4), (4, 3), (3, 3), (2, 2))
SHAPES = [(8, 32768), (8, 65536), (8, 131072), (32, 16384), (32, 32768), (32, 65536), (32, 131072), (1, 131072)]
SWEEPS: dict[str, list[dict[str, Any]]] = {
    # v4 candidates (docs/kernel_notes.md): dotk = keys decoded into the mma operand layout,
    # num_stages ≥ 2 = cp.async pipelining of the code loads, maxnreg = occupancy.
    "v4": [
        {"dotk": True, "num_stages": 2, "maxnreg": 96},
        {"dotk": False, "num_stages": 1, "maxnreg": 0},  # v3 structure with v4 loads
        {"dotk": True, "num_stages": 1, "maxnreg": 0},
        {"dotk": True, "num_stages": 2, "maxnreg": 0},
        {"dotk": True, "num_stages": 1, "maxnreg": 96},
        {"dotk": True, "num_stages": 3, "maxnreg": 96},
        {"dotk": True, "num_stages": 2, "maxnreg": 96, "programs_per_sm": 5},
        {"dotk": True, "num_stages": 2, "maxnreg": 96, "programs_per_sm": 10},
    ],
    # run 2 of v4: CTA shape (fewer warps per program = fewer block-wide barriers per token)
    "warps": [
        {"dotk": True, "num_stages": 3, "maxnreg": 96},
        {"dotk": True, "num_stages": 2, "maxnreg": 0, "num_warps": 2, "block_n": 32, "programs_per_sm": 16},
        {"dotk": True, "num_stages": 3, "maxnreg": 0, "num_warps": 2, "block_n": 32, "programs_per_sm": 16},
        {"dotk": True, "num_stages": 2, "maxnreg": 0, "num_warps": 2, "block_n": 32, "programs_per_sm": 8},
        {"dotk": True, "num_stages": 2, "maxnreg": 0, "num_warps": 8, "block_n": 128, "programs_per_sm": 4},
        {"dotk": True, "num_stages": 2, "maxnreg": 0, "num_warps": 1, "block_n": 16, "programs_per_sm": 32},
    ],
}
SWEEP_SHAPES = ((8, 32768, 4, 4), (32, 32768, 4, 4))
SWEEP_LOW_BITS = ((8, 32768, 2, 2), (8, 32768, 3, 3))  # timed for the first three variants only


def decode_inputs(b: int, n: int, kb: float, vb: float) -> tuple[torch.Tensor, Any, Any, int]:
    """One decode step's query ``[B, 32, 1, 128]`` bf16, random key/value codes ``[B, 8, N]`` and their bytes."""
    from turboquant.kernels.testing import random_codes

    kc = QuantizerConfig(D, kb, seed=1, norm_dtype="float16")
    vc = QuantizerConfig(D, vb, seed=2, norm_dtype="float16")
    keys = random_codes(kc, (b, HKV, n), "cuda")
    values = random_codes(vc, (b, HKV, n), "cuda")
    q = torch.randn(b, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
    return q, keys, values, b * HKV * n * (bytes_per_vector(kc) + bytes_per_vector(vc))


def time_ours(b: int, n: int, kb: float, vb: float, tuning: TritonTuning | None, graph: bool = False,
              impl: ModuleType | None = None) -> dict[str, Any]:  # fmt: skip
    """ms (and graph ms) of one decode step; ``impl`` = a baseline kernel module (its own tuning)."""
    q, keys, values, nbytes = decode_inputs(b, n, kb, vb)
    if impl is None:
        from turboquant.kernels.triton_attention import triton_quantized_attention

        fn = functools.partial(triton_quantized_attention, q, keys, values, None, None, D**-0.5, tuning=tuning)
    else:
        fn = functools.partial(impl.triton_quantized_attention, q, keys, values, None, None, D**-0.5)

    fn()
    res = {"ms": bench(fn), "bytes": nbytes}
    if graph:
        try:
            res["graph_ms"] = bench_graph(fn)
        except Exception as exc:
            log(f"graph capture failed: {str(exc)[:200]}")
    del q, keys, values
    torch.cuda.empty_cache()
    return res


def time_sdpa(b: int, n: int, graph: bool = False) -> dict[str, Any]:
    """bf16 flash SDPA over ``N`` tokens: GQA folded into the query length (one pass per KV head,
    what decode kernels do) and ``enable_gqa``; ``ms`` is the faster."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    k = torch.randn(b, HKV, n, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, HKV, n, D, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(b, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
    qf = q.reshape(b, HKV, HQ // HKV, D)
    f = torch.nn.functional.scaled_dot_product_attention
    res: dict[str, Any] = {"bytes": 2 * k.numel() * k.element_size()}
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        for key, fn in (("flash_folded", functools.partial(f, qf, k, v)), ("flash_gqa", functools.partial(f, q, k, v, enable_gqa=True))):
            try:
                res[f"{key}_ms"] = bench(fn)
            except (RuntimeError, TypeError) as exc:
                res[f"{key}_err"] = str(exc)[:200]
        if graph and "flash_folded_ms" in res:
            try:
                res["graph_ms"] = bench_graph(functools.partial(f, qf, k, v))
            except Exception as exc:
                log(f"graph capture failed: {str(exc)[:200]}")
    times = [res[key] for key in ("flash_folded_ms", "flash_gqa_ms") if key in res]
    res["ms"] = min(times) if times else float("nan")
    del k, v, q, qf
    torch.cuda.empty_cache()
    return res


def run_sweep(variants: list[dict[str, Any]], base: TritonTuning, baseline: ModuleType | None) -> dict[str, Any]:
    """Time each variant (``replace(base, **variant)``) on the sweep shapes; the fastest total wins."""
    from turboquant.kernels.triton_attention import triton_quantized_attention_kernel

    rows = []
    totals: dict[int, float] = {}
    for vi, variant in enumerate(variants):
        tuning = dataclasses.replace(base, **variant)
        for shape in SWEEP_SHAPES + (SWEEP_LOW_BITS if vi < 3 else ()):
            try:
                res = time_ours(*shape, tuning)
            except Exception as exc:  # keep sweeping: a variant may not compile
                log(f"sweep {shape} {variant}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
                totals[vi] = float("inf")
                continue
            info = kernel_info(triton_quantized_attention_kernel)
            gbps = res["bytes"] / res["ms"] / 1e6
            rows.append(dict(shape=shape, variant=variant, ms=res["ms"], gbps=gbps, kernel=info))
            log(f"sweep B={shape[0]} N={shape[1]} K{shape[2]}/V{shape[3]} {str(variant):60s} {res['ms'] * 1e3:8.1f} us  {gbps:7.0f} GB/s  {info}")
            if shape in SWEEP_SHAPES:
                totals[vi] = totals.get(vi, 0.0) + res["ms"]
    if baseline is not None:
        for shape in SWEEP_SHAPES + SWEEP_LOW_BITS:
            res = time_ours(*shape, None, impl=baseline)
            rows.append(dict(shape=shape, variant="baseline", ms=res["ms"], gbps=res["bytes"] / res["ms"] / 1e6))
    finite = {k: v for k, v in totals.items() if math.isfinite(v)}
    best = variants[min(finite, key=finite.__getitem__)] if finite else {}
    return {"rows": rows, "best": best}


def run_bench(tuning: TritonTuning, copy_bw: float, graph: bool, baseline: ModuleType | None) -> list[dict[str, Any]]:
    from turboquant.kernels.triton_attention import triton_quantized_attention_kernel

    rows = []
    for b, n in SHAPES:
        sd = time_sdpa(b, n, graph)
        for kb, vb in BIT_PAIRS:
            try:
                ours = time_ours(b, n, kb, vb, tuning, graph)
            except Exception as exc:
                log(f"bench B={b} N={n} K{kb}/V{vb}: FAILED {type(exc).__name__}: {str(exc)[:400]}")
                continue
            ms, nbytes = ours["ms"], ours["bytes"]
            row = dict(
                B=b, N=n, k_bits=kb, v_bits=vb, ms=ms, sdpa_ms=sd["ms"], speedup=sd["ms"] / ms,
                bytes=nbytes, frac_copy=nbytes / (ms * 1e-3) / copy_bw,
                sdpa_frac_copy=sd["bytes"] / (sd["ms"] * 1e-3) / copy_bw, sdpa=sd,
                kernel=kernel_info(triton_quantized_attention_kernel),
            )  # fmt: skip
            if baseline is not None:
                try:
                    row["baseline_ms"] = time_ours(b, n, kb, vb, None, impl=baseline)["ms"]
                    row["speedup_vs_baseline"] = row["baseline_ms"] / ms
                except Exception as exc:
                    log(f"baseline timing failed: {str(exc)[:200]}")
            if "graph_ms" in ours and "graph_ms" in sd:
                g = ours["graph_ms"]
                row.update(graph_ms=g, sdpa_graph_ms=sd["graph_ms"], graph_speedup=sd["graph_ms"] / g,
                           graph_frac_copy=nbytes / (g * 1e-3) / copy_bw)  # fmt: skip
            rows.append(row)
            log(f"bench B={b:2d} N={n:6d} K{kb}/V{vb}: ours {ms * 1e3:8.1f} us ({row['frac_copy']:.0%} of copy)  "
                f"sdpa bf16 {sd['ms'] * 1e3:8.1f} us ({row['sdpa_frac_copy']:.0%})  speedup {row['speedup']:.2f}x")  # fmt: skip
    return rows


def plot(data: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        log("matplotlib not installed: no plot")
        return
    rows = data["bench"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, b in zip(axes, (1, 8, 32)):
        sub = [r for r in rows if r["B"] == b]
        ns = sorted({r["N"] for r in sub})
        ax.plot(ns, [next(r["sdpa_ms"] for r in sub if r["N"] == n) * 1e3 for n in ns], "k-o", label="SDPA flash bf16")
        for kb, vb in BIT_PAIRS:
            ys = [next(r["ms"] for r in sub if r["N"] == n and r["k_bits"] == kb and r["v_bits"] == vb) * 1e3 for n in ns]
            ax.plot(ns, ys, "-o", label=f"TurboQuant K{kb}/V{vb}")
        ax.set(yscale="log", xlabel="context (tokens)", ylabel="decode attention latency (µs)", title=f"batch {b}")
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Decode attention, Llama-3.1-8B shapes (32 q / 8 kv heads, d=128) on {data['device']}")
    log(f"wrote {save_figure(fig, path)}")


def summary(rows: list[dict[str, Any]]) -> str:
    cols = ["B", "N", "k_bits", "v_bits", "ms", "sdpa_ms", "speedup", "frac_copy", "graph_speedup", "speedup_vs_baseline"]
    return table([[r.get(c, "-") for c in cols] for r in rows], cols)


def main(argv: list[str] | None = None) -> int:
    p = gpu_parser(__doc__)
    p.add_argument("--sweep", choices=sorted(SWEEPS), help="time these tuning variants first and use the fastest")
    p.add_argument("--graph", action="store_true", help="also time both methods as CUDA-graph replays")
    p.add_argument("--baseline", type=Path, help="a previous triton_attention.py to time side by side")
    p.add_argument("--plot", type=Path, help="only draw the PNG of an earlier JSON result")
    args = p.parse_args(argv)
    if args.plot:
        plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png"))
        return 0
    tuning = tuning_from(args.tuning)
    baseline = load_baseline(args.baseline) if args.baseline else None
    results: dict[str, Any] = device_info()
    sections = Sections(results, "gpu_decode.json", args.out)
    if args.sweep:
        sweep = sections.run("sweep", lambda: run_sweep(SWEEPS[args.sweep], tuning, baseline))
        if sweep and sweep["best"]:
            tuning = dataclasses.replace(tuning, **sweep["best"])
    results["tuning"] = dataclasses.asdict(tuning)
    log("tuning used:", tuning)
    results["copy_bw_gbps"] = copy_bandwidth() / 1e9
    rows = sections.run("bench", lambda: run_bench(tuning, results["copy_bw_gbps"] * 1e9, args.graph, baseline))
    if rows:
        print(summary(rows))
        plot(results, args.out / "gpu_decode.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
