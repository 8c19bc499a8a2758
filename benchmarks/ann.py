"""Vector search: TurboQuantIndex next to FAISS on real and synthetic embeddings, in one run.

    python benchmarks/ann.py                      # the grid: Brown + synthetic d in 96..1536, bits 2 and 4,
                                                  # default threads and 1 thread (long: ~1 h on 2 cores)
    python benchmarks/ann.py --sets brown --bits 4 --single 200
    python benchmarks/ann.py --sets synthetic --dims 576 --bits 4 --threads 2 --quick

Data: ``../shared/data`` (Brown corpus sentences × all-MiniLM-L6-v2, 53,992 base vectors,
1,000 queries, exact inner-product ground truth; see its README) and synthetic sets at every
``--dims`` in the spirit of the paper's DBpedia × OpenAI-3 embeddings (clustered, anisotropic
power-law spectrum; norms log-normal with ``--norm-sigma``, as unnormalised real embeddings;
exact ground truth computed here). Every setting runs at each ``--threads`` value (default: all
cores, then 1), torch and FAISS set alike; rows carry their thread count. The summary lists, per
set, bits and threads, TurboQuant's batch and single QPS over the faster FAISS peer at ≤ its
bytes (RaBitQ, RaBitQ fast-scan, PQ fast-scan) and its recall 10@10 minus RaBitQ's.

For every rate it measures recall 1@1, 1@10 and 10@10, queries per second for one batch of
all queries and for single queries issued one by one, build time (training included for FAISS
PQ) and stored bytes per vector (codes + per-vector scalars, ids excluded), for:

* ``tq``            TurboQuantIndex (auto engine: C fast-scan shortlist + exact corrected re-rank)
* ``tq-plain``      the same codes scored with the uncorrected ``‖x‖·<Πq, ŷ>`` (ablation)
* ``tq-1thread``    ``search_threads=1``: the C scan on one thread while ``tq`` uses torch's thread
  count (only in rows with more than one thread)
* ``tq-torch``      the same index with the exact block-decode + matmul engine
* ``faiss-flat``    IndexFlatIP, fp32
* ``faiss-tq-mse``  random rotation + ScalarQuantizer ``QT_{b}bit_tqmse``
* ``faiss-rabitq``  IndexRaBitQ with ``b`` bits (queries quantized to 4 bits, FAISS's default)
* ``faiss-rabitq-fs`` IndexRaBitQFastScan with ``b`` bits
* ``faiss-pq``      IndexPQ (8-bit sub-quantizers), the largest code ≤ the bytes of ``tq``
  that divides d (integer rates, d ≤ 512: its k-means takes minutes here)
* ``faiss-pq-fs``   IndexPQFastScan (4-bit), likewise ≤ the bytes of ``tq``

FAISS builders come from ``benchmarks/_faiss_peers.py``. Timings are the best of
``--repeat`` interleaved rounds (the machine may be shared; load averages are recorded;
``--threads 1 --clock cpu`` measures one core's CPU time instead, which other tenants barely
disturb). Writes
``benchmarks/results/ann.json`` and, with matplotlib, ``ann.png`` (recall 10@10 vs bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _common import RESULTS, SHARED_DATA, machine_info, pyplot

from turboquant.index import TurboQuantIndex

DATA = SHARED_DATA
DIMS = [96, 128, 256, 300, 384, 576, 768, 1024, 1536]


# --------------------------------------------------------------------------- data


def brown() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not (DATA / "brown_minilm_base.npy").exists():
        raise SystemExit(f"Brown/MiniLM set not found under {DATA.resolve()}")
    base = np.load(DATA / "brown_minilm_base.npy").astype(np.float32)
    queries = np.load(DATA / "brown_minilm_queries.npy").astype(np.float32)
    gt = np.load(DATA / "brown_minilm_gt_ip_ids.npy").astype(np.int64)
    return base, queries, gt


def synthetic(
    n: int, nq: int, dim: int = 1536, seed: int = 0, norm_sigma: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clustered, anisotropic vectors (power-law spectrum), log-normal norms, queries from the same law."""
    rng = np.random.default_rng(seed)
    spectrum = (1.0 + np.arange(dim)) ** -0.6
    basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
    centers = (rng.standard_normal((max(64, n // 50), dim)) * spectrum).astype(np.float32)

    def draw(m: int) -> np.ndarray:
        pick = centers[rng.integers(0, len(centers), m)]
        x = pick + 0.6 * (rng.standard_normal((m, dim)) * spectrum).astype(np.float32)
        x = x @ basis
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    base, queries = draw(n), draw(nq)
    if norm_sigma:
        base *= rng.lognormal(0.0, norm_sigma, (n, 1)).astype(np.float32)
    scores = torch.from_numpy(queries) @ torch.from_numpy(base).T
    gt = torch.topk(scores, 100, dim=1).indices.numpy()
    return base, queries, gt


# --------------------------------------------------------------------------- measuring


def recalls(ids: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    ids = np.asarray(ids)
    return {
        "R1@1": float(np.mean(ids[:, 0] == gt[:, 0])),
        "R1@10": float(np.mean((ids[:, :10] == gt[:, :1]).any(1))),
        "R10@10": float(np.mean([len(np.intersect1d(a[:10], b[:10])) / 10 for a, b in zip(ids, gt)])),
    }


@dataclass
class Method:
    """One index to compare: how to build it, search it and size it."""

    name: str
    bits: float
    build: Callable[[], Any]
    search: Callable[[Any, np.ndarray, int], Any]
    nbytes: Callable[[Any], float]
    slow: bool = False  # exhaustive float scans: timed once, on fewer single queries
    index: Any = None
    row: dict[str, Any] = field(default_factory=dict)


def run_group(methods: list[Method], queries: np.ndarray, gt: np.ndarray, args: argparse.Namespace) -> list[dict]:
    """Build every method, then time them in interleaved rounds (best of ``--repeat``).

    The machine may be shared: interleaving exposes every method to the same load, and the
    best round is the least disturbed one.
    """
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    for m in methods:
        t = clock()
        m.index = m.build()
        build_s = clock() - t
        _, ids = m.search(m.index, queries, 10)
        m.row = {"method": m.name, "bits": m.bits, **recalls(ids, gt), "QPS_batch": 0.0, "QPS_single": 0.0,
                 "build_s": build_s, "bytes_per_vector": float(m.nbytes(m.index))}  # fmt: skip
    for rnd in range(args.repeat):
        for m in methods:
            if m.slow and rnd:
                continue
            t = clock()
            m.search(m.index, queries, 10)
            m.row["QPS_batch"] = max(m.row["QPS_batch"], len(queries) / (clock() - t))
            single = queries[: 30 if m.slow else args.single]
            t = clock()
            for i in range(len(single)):
                m.search(m.index, single[i : i + 1], 10)
            m.row["QPS_single"] = max(m.row["QPS_single"], len(single) / (clock() - t))
    rows = []
    for m in methods:
        r = m.row
        print(f"  {m.name:<14} bits={m.bits:<4} R10@10={r['R10@10']:.4f} R1@1={r['R1@1']:.3f} "
              f"QPS batch={r['QPS_batch']:8.0f} single={r['QPS_single']:7.0f} build={r['build_s']:7.2f}s "
              f"B/vec={r['bytes_per_vector']:.0f}", flush=True)  # fmt: skip
        rows.append(r)
        m.index = None
    return rows


def tq_methods(base: np.ndarray, bits: float, args: argparse.Namespace) -> list[Method]:
    dim = base.shape[1]

    def build(
        engine: str = "auto", threads: int | None = None, correction: bool = True
    ) -> Callable[[], TurboQuantIndex]:
        def make() -> TurboQuantIndex:
            index = TurboQuantIndex(dim, bits, "ip", engine=engine, search_threads=threads, correction=correction)  # type: ignore[arg-type]
            index.add(base)
            return index

        return make

    search = lambda index, q, k: index.search(q, k)
    size = lambda index: index.bytes_per_vector
    methods = [
        Method("tq", bits, build(), search, size),
        Method("tq-plain", bits, build(correction=False), search, size),
    ]
    if args.cur_threads > 1:
        methods.append(Method("tq-1thread", bits, build(threads=1), search, size))
    if not args.quick:
        methods.append(Method("tq-torch", bits, build("torch"), search, size, slow=True))
    return methods


def faiss_methods(base: np.ndarray, bits: float, tq_bytes: int, args: argparse.Namespace) -> list[Method]:
    import _faiss_peers as peers

    dim = base.shape[1]
    search = lambda index, q, k: peers.search(index, q, k)[:2]
    size = lambda index: peers.bytes_per_vector(index)

    def builder(make: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            index = make()
            peers.build(index, base, train_size=args.train)
            return index

        return run

    # "equal bytes": the largest PQ code that FAISS accepts for d and does not exceed ours
    pq_bytes = max(m for m in range(1, tq_bytes + 1) if dim % m == 0)
    fs_bytes = max((m for m in range(1, tq_bytes + 1) if dim % (2 * m) == 0), default=0)

    methods = []
    if not args.quick and float(bits).is_integer() and int(bits) in (1, 2, 3, 4):
        methods.append(
            Method("faiss-tq-mse", bits, builder(lambda: peers.make_tq_mse(dim, int(bits))), search, size, slow=True)
        )
    if float(bits).is_integer():
        methods.append(
            Method("faiss-rabitq", bits, builder(lambda: peers.make_rabitq(dim, int(bits))), search, size, slow=True)
        )
        methods.append(
            Method("faiss-rabitq-fs", bits, builder(lambda: peers.make_rabitq_fastscan(dim, int(bits))), search, size)
        )
    if not args.quick and dim <= 512 and float(bits).is_integer():  # 8-bit PQ training takes minutes
        methods.append(Method("faiss-pq", bits, builder(lambda: peers.make_pq(dim, pq_bytes)), search, size, slow=True))
    if fs_bytes:
        methods.append(Method("faiss-pq-fs", bits, builder(lambda: peers.make_pq_fastscan(dim, fs_bytes)), search, size))
    return methods


def summary(rows: list[dict]) -> list[dict]:
    """Per (set, bits, threads): tq's QPS over the faster FAISS peer at ≤ its bytes, recall minus RaBitQ's."""
    out = []
    for key in sorted({(r["set"], r["bits"], r["threads"]) for r in rows if r["method"] == "tq"}, key=str):
        group = [r for r in rows if (r["set"], r["bits"], r["threads"]) == key]
        tq = next(r for r in group if r["method"] == "tq")
        peers = [r for r in group if r["method"] in ("faiss-rabitq", "faiss-rabitq-fs", "faiss-pq-fs")
                 and r["bytes_per_vector"] <= tq["bytes_per_vector"]]  # fmt: skip
        rabitq = [r for r in group if r["method"] == "faiss-rabitq"]
        out.append({
            "set": key[0], "bits": key[1], "threads": key[2],
            "batch_x": tq["QPS_batch"] / max((p["QPS_batch"] for p in peers), default=float("nan")),
            "single_x": tq["QPS_single"] / max((p["QPS_single"] for p in peers), default=float("nan")),
            "recall_minus_rabitq": tq["R10@10"] - rabitq[0]["R10@10"] if rabitq else float("nan"),
            "peers_at_or_below_bytes": [p["method"] for p in peers],
        })  # fmt: skip
    return out


def table(rows: list[dict]) -> str:
    cols = [
        "set",
        "threads",
        "method",
        "bits",
        "R1@1",
        "R1@10",
        "R10@10",
        "QPS_batch",
        "QPS_single",
        "build_s",
        "bytes_per_vector",
    ]
    fmt = {"R1@1": "{:.3f}", "R1@10": "{:.3f}", "R10@10": "{:.4f}", "QPS_batch": "{:.0f}", "QPS_single": "{:.0f}",
           "build_s": "{:.2f}", "bytes_per_vector": "{:.0f}"}  # fmt: skip
    body = [[fmt.get(c, "{}").format(r[c]) for c in cols] for r in rows]
    try:
        from tabulate import tabulate

        return tabulate(body, headers=cols, tablefmt="github")
    except ImportError:
        return "\n".join(" | ".join(str(v) for v in line) for line in [cols, *body])


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        print("matplotlib not installed: no plot")
        return
    rows = [r for r in rows if r.get("threads") == max(x.get("threads", 0) for x in rows)] or rows
    sets = sorted({r["set"] for r in rows})
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4.5), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    methods = sorted({r["method"] for r in rows})
    for ax, name in zip(axes[0], sets):
        for j, method in enumerate(methods):
            pts = sorted(
                (r["bytes_per_vector"], r["R10@10"]) for r in rows if r["set"] == name and r["method"] == method
            )
            if pts:  # ours solid, FAISS dashed
                style = "-" if method.startswith("tq") else "--"
                ax.plot(*zip(*pts), style, marker="os^vDP*X"[j % 8], color=colors[j % 20], label=method)
        ax.set(title=name, xlabel="bytes per vector", ylabel="recall 10@10", xscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", nargs="+", default=["brown", "synthetic"], choices=["brown", "synthetic"])
    p.add_argument("--dims", nargs="+", type=int, default=DIMS, help="dimensions of the synthetic sets")
    p.add_argument("--bits", nargs="+", type=float, default=[2, 4])
    p.add_argument("--single", type=int, default=200, help="queries issued one by one for the single-query QPS")
    p.add_argument("--repeat", type=int, default=3, help="timing repeats (best is kept)")
    p.add_argument("--train", type=int, default=20000, help="training sample size for FAISS PQ / RaBitQ")
    p.add_argument("--synthetic-n", type=int, default=50000)
    p.add_argument("--synthetic-nq", type=int, default=1000)
    p.add_argument("--norm-sigma", type=float, default=0.1, help="log-normal sigma of the synthetic norms (0: unit)")
    p.add_argument("--threads", type=int, nargs="+", default=[os.cpu_count() or 1, 1])
    p.add_argument("--quick", action="store_true", help="skip tq-torch, faiss-tq-mse and faiss-pq (slow)")
    p.add_argument("--no-faiss", action="store_true")
    p.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall",
        help="cpu: time with the process CPU clock (with --threads 1 this is one idle core's time, robust to a "
        "shared machine; it undercounts multi-threaded work)",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=RESULTS / "ann.json", help="result JSON file, or a folder to write ann.json into")
    p.add_argument("--replot", type=Path, help="only redraw the PNG of an earlier JSON result")
    args = p.parse_args(argv)
    if args.replot:
        plot(json.loads(args.replot.read_text())["rows"], args.replot.with_suffix(".png"))
        return
    try:
        import faiss
    except ImportError:
        args.no_faiss = True
    info = machine_info()
    print(f"machine: {info}")
    rows: list[dict] = []
    jobs = [("brown", 384)] if "brown" in args.sets else []
    jobs += [(f"synthetic{d}", d) for d in args.dims] if "synthetic" in args.sets else []
    for set_name, dim in jobs:
        if set_name == "brown":
            base, queries, gt = brown()
        else:
            base, queries, gt = synthetic(args.synthetic_n, args.synthetic_nq, dim, norm_sigma=args.norm_sigma)
        for threads in args.threads:
            torch.set_num_threads(threads)
            if not args.no_faiss:
                faiss.omp_set_num_threads(threads)
            args.cur_threads = threads
            print(f"\n== {set_name}: base {base.shape}, queries {queries.shape}, threads {threads}", flush=True)
            for bits in args.bits:
                methods = tq_methods(base, bits, args)
                if not args.no_faiss:
                    tq_bytes = TurboQuantIndex(base.shape[1], bits).bytes_per_vector
                    methods += faiss_methods(base, bits, tq_bytes, args)
                rows += [{"set": set_name, "threads": threads, **r} for r in run_group(methods, queries, gt, args)]
    info["load_avg_end"] = os.getloadavg()
    print("\n" + table(rows))
    verdict = summary(rows) if not args.no_faiss else []
    for v in verdict:
        print(f"  {v['set']:<16} bits={v['bits']:<4} threads={v['threads']}: batch {v['batch_x']:.2f}x, "
              f"single {v['single_x']:.2f}x the faster FAISS peer at <= bytes; recall - RaBitQ = "
              f"{v['recall_minus_rabitq']:+.4f}")  # fmt: skip
    if args.out.is_dir():
        args.out = args.out / "ann.json"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(
        {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "summary": verdict}, indent=1
    ))  # fmt: skip
    print(f"wrote {args.out}")
    plot(rows, args.out.with_suffix(".png"))


def _built(peers: Any, index: Any, base: np.ndarray) -> Any:
    peers.build(index, base)
    return index


if __name__ == "__main__":
    main()
