"""Encode/decode throughput on this CPU: turboquant vs FAISS's TurboQuant scalar quantizer.

Both sides include a rotation: turboquant's default randomized Hadamard (and, for reference,
its dense Haar matrix), FAISS's ``RandomRotationMatrix`` in an ``IndexPreTransform`` in front
of ``IndexScalarQuantizer(QT_{b}bit_tqmse)``; FAISS encodes with ``sa_encode`` and decodes
with ``sa_decode``. Inputs are unit vectors (FAISS's ``tqmse`` codebooks assume them; ours
store the norm as well). Every configuration is checked for correctness first (the MSE of
both round trips against the exact Lloyd-Max cost), then timed interleaved — ours, FAISS,
ours, FAISS, ... — so that load from other processes hits both alike; the table reports
medians of ``--runs`` timings.

    python benchmarks/throughput.py                 # d ∈ {128, 1536}, bits ∈ {2, 3, 4}
    python benchmarks/throughput.py --threads 1 2   # one table per thread count
    python benchmarks/throughput.py --quick

Writes ``benchmarks/results/throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from turboquant import QuantizerConfig
from turboquant.codebook import lloyd_max_codebook
from turboquant.quantizer import TurboQuantizer

from _common import RESULTS, machine_info, table, write_json
from _faiss_peers import faiss_available, make_tq_mse


def build_faiss(dim: int, bits: int, seed: int) -> Any:
    """FAISS ``QT_{bits}bit_tqmse`` behind a random rotation, trained once (its codebook needs no
    data, but the index and its rotation must be trained)."""
    index = make_tq_mse(dim, bits, "ip", seed=seed)
    index.train(np.random.default_rng(seed).standard_normal((1, dim)).astype(np.float32))
    return index


def _median_rate(times: list[float], n: int) -> float:
    return n / statistics.median(times)


def bench_config(dim: int, bits: int, n: int, runs: int, seed: int = 0) -> dict[str, Any]:
    """Correctness check, then interleaved timings of encode and decode (vectors/s, medians)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)
    xn = x.numpy()
    ours = TurboQuantizer.from_config(QuantizerConfig(dim=dim, bits=bits))
    ours_haar = TurboQuantizer.from_config(QuantizerConfig(dim=dim, bits=bits, rotation="haar"))
    index = build_faiss(dim, bits, seed + 1)
    exact = lloyd_max_codebook(dim, bits).unit_vector_mse

    # correctness before timing: both round trips must reach the Lloyd-Max cost
    check = min(n, 4096)
    codes = ours.quantize(x[:check])
    mse_ours = float(((ours.dequantize(codes) - x[:check]) ** 2).sum(-1).mean())
    fcodes = index.sa_encode(xn[:check])
    mse_faiss = float(((index.sa_decode(fcodes) - xn[:check]) ** 2).sum(-1).mean())
    for name, mse in (("turboquant", mse_ours), ("faiss", mse_faiss)):
        if abs(mse / exact - 1) > 0.1:
            raise RuntimeError(f"{name} d={dim} b={bits}: MSE {mse:.5f} is not near the Lloyd-Max cost {exact:.5f}")

    codes = ours.quantize(x)
    codes_haar = ours_haar.quantize(x)
    fcodes = index.sa_encode(xn)
    timers: dict[str, Callable[[], Any]] = {
        "encode_ours": lambda: ours.quantize(x),
        "encode_faiss": lambda: index.sa_encode(xn),
        "decode_ours": lambda: ours.dequantize(codes),
        "decode_faiss": lambda: index.sa_decode(fcodes),
        "encode_ours_haar": lambda: ours_haar.quantize(x),
        "decode_ours_haar": lambda: ours_haar.dequantize(codes_haar),
    }
    for fn in timers.values():  # warm-up (codebook tables, work buffers, FAISS's lazy init)
        fn()
    times: dict[str, list[float]] = {k: [] for k in timers}
    for _ in range(runs):
        for key, fn in timers.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    rates = {k: _median_rate(v, n) for k, v in times.items()}
    return {
        "dim": dim,
        "bits": bits,
        "n": n,
        "runs": runs,
        "bytes_per_vector": {"turboquant": int(codes.codes.shape[-1] + codes.norms.element_size()), "faiss": int(index.sa_code_size())},
        "mse": {"turboquant": mse_ours, "faiss": mse_faiss, "lloyd_max": exact},
        "vectors_per_s": rates,
        "times_s": times,
        "encode_ratio": rates["encode_ours"] / rates["encode_faiss"],
        "decode_ratio": rates["decode_ours"] / rates["decode_faiss"],
        "encode_ratio_haar": rates["encode_ours_haar"] / rates["encode_faiss"],
    }


def _table(rows: list[dict[str, Any]]) -> str:
    headers = ["threads", "d", "bits", "encode ours", "encode FAISS", "ratio", "decode ours", "decode FAISS", "ratio", "enc ours (haar)"]
    body = [
        [
            r["threads"], r["dim"], r["bits"],
            f"{r['vectors_per_s']['encode_ours']:,.0f}", f"{r['vectors_per_s']['encode_faiss']:,.0f}", f"{r['encode_ratio']:.2f}x",
            f"{r['vectors_per_s']['decode_ours']:,.0f}", f"{r['vectors_per_s']['decode_faiss']:,.0f}", f"{r['decode_ratio']:.2f}x",
            f"{r['vectors_per_s']['encode_ours_haar']:,.0f}",
        ]
        for r in rows
    ]  # fmt: skip
    return table(body, headers)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=[128, 1536])
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--n", type=int, default=None, help="vectors per timing (default 65536 for d ≤ 256, 8192 above)")
    p.add_argument("--runs", type=int, default=7, help="timed runs per measurement (median reported; ≥ 5)")
    p.add_argument("--threads", type=int, nargs="+", default=None, help="thread counts (default: 1 and all cores)")
    p.add_argument("--quick", action="store_true", help="small n, 5 runs")
    p.add_argument("--out", type=Path, default=RESULTS / "throughput.json")
    args = p.parse_args(argv)
    if not faiss_available():
        print("faiss-cpu is not installed (pip install 'faiss-cpu>=1.15'): nothing to compare with", file=sys.stderr)
        return 1
    cores = torch.get_num_threads()
    threads = args.threads or sorted({1, cores})
    runs = max(5, 5 if args.quick else args.runs)
    rows = []
    import faiss

    info = machine_info()
    print(f"turboquant vs FAISS {faiss.__version__} on {info['cpu']} ({info['cpu_count']} cores), load {info['load_avg_1_5_15']}")
    for t in threads:
        torch.set_num_threads(t)
        faiss.omp_set_num_threads(t)
        for dim in args.dims:
            n = args.n or ((8192 if args.quick else 65536) if dim <= 256 else (1024 if args.quick else 8192))
            for bits in args.bits:
                row = bench_config(dim, bits, n, runs)
                row["threads"] = t
                rows.append(row)
                print(
                    f"  threads={t} d={dim} b={bits}: encode {row['vectors_per_s']['encode_ours']:,.0f} vs "
                    f"{row['vectors_per_s']['encode_faiss']:,.0f} vec/s ({row['encode_ratio']:.2f}x), decode "
                    f"{row['vectors_per_s']['decode_ours']:,.0f} vs {row['vectors_per_s']['decode_faiss']:,.0f} ({row['decode_ratio']:.2f}x)"
                )
    torch.set_num_threads(cores)
    info["load_avg_after"] = machine_info()["load_avg_1_5_15"]
    target = [r for r in rows if r["dim"] == 128 and r["bits"] == 4]
    summary = {
        "target": "turboquant encode >= 2x FAISS at d=128, b=4",
        "encode_ratio_d128_b4": {str(r["threads"]): r["encode_ratio"] for r in target},
        "met": {str(r["threads"]): r["encode_ratio"] >= 2.0 for r in target},
    }
    print()
    print(_table(rows))
    print(f"\nmedians of {runs} interleaved runs; machine: {info['cpu']}, {info['cpu_count']} cores, load {info['load_avg_1_5_15']} -> {info['load_avg_after']}")
    print("target:", json.dumps(summary))
    write_json(args.out.name, {"machine": info, "quick": args.quick, "summary": summary, "rows": rows}, args.out.parent)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
