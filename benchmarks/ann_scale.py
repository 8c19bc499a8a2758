"""How the index scales with n: streamed build, memory, file size, mmap load, QPS, recall — beside FAISS.

    python benchmarks/ann_scale.py                    # n = 100k and 1M (d=384, 4 bits)
    python benchmarks/ann_scale.py --n 5000000        # the 5M point (about 7.7 GB of float32 input)

For each n: a synthetic set (clustered, anisotropic power-law spectrum, unit norm) is written to
a ``.npy`` file in chunks, never held in memory whole; exact inner-product ground truth for
``--nq`` queries is computed in chunks. TurboQuant: ``turboquant.streaming.build_index`` in a
child process (its peak RSS is the build's memory: codes + norms + one chunk + the interpreter),
``save``, then, in a second child process, ``TurboQuantIndex.load(mmap=True)`` (checksum verified)
and search (first search, a batch, single queries): that process's peak RSS (``VmHWM``) is the
memory *while searching*, reported beside the codes + norms and as their ratio (target ≤ 1.10 once
the RSS before loading is subtracted). ``--build-engine auto`` (default) builds the fast-scan
storage during the build, so the file holds the split storage that the search maps in place;
``torch`` saves row-major codes, converted at the first search. FAISS ``IndexRaBitQ`` and
``IndexPQFastScan`` (at ≤ the same bytes per vector) are built from the same file in chunks at
the same n, unless their codes would not fit in ``--peer-max-gb`` (then skipped and said so).
Writes ``benchmarks/results/ann_scale.json`` and ``ann_scale.png`` (log-log QPS and build time vs n).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import RESULTS, machine_info, pyplot, table, write_json

from turboquant.index import TurboQuantIndex
from turboquant.streaming import iter_npy_rows

CHUNK = 100_000


def write_synthetic(path: Path, n: int, nq: int, dim: int, seed: int = 0) -> np.ndarray:
    """Write ``n`` base vectors to ``path`` chunk by chunk; returns ``nq`` queries from the same law."""
    rng = np.random.default_rng(seed)
    spectrum = ((1.0 + np.arange(dim)) ** -0.6).astype(np.float32)
    basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
    centers = (rng.standard_normal((1000, dim)) * spectrum).astype(np.float32)

    def draw(m: int, r: np.random.Generator) -> np.ndarray:
        x = centers[r.integers(0, len(centers), m)] + 0.6 * (r.standard_normal((m, dim)) * spectrum).astype(np.float32)
        x = x @ basis
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    for s in range(0, n, CHUNK):
        out[s : s + CHUNK] = draw(min(CHUNK, n - s), np.random.default_rng([seed, s]))
    out.flush()
    del out
    return draw(nq, np.random.default_rng([seed, -1 % 2**32]))


def ground_truth(path: Path, queries: np.ndarray, k: int = 10) -> np.ndarray:
    q = torch.from_numpy(queries)
    best_s = torch.full((len(q), 0), -float("inf"))
    best_i = torch.zeros((len(q), 0), dtype=torch.int64)
    start = 0
    for x in iter_npy_rows(path, CHUNK):
        s = q @ torch.from_numpy(x).T
        cat_s, cat_i = torch.cat([best_s, s], 1), torch.cat([best_i, torch.arange(start, start + len(x)).expand(len(q), -1)], 1)
        top = cat_s.topk(k, dim=1)
        best_s, best_i = top.values, torch.gather(cat_i, 1, top.indices)
        start += len(x)
    return best_i.numpy()


def recall(ids: np.ndarray, gt: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(a[:10], b[:10])) / 10 for a, b in zip(ids, gt)]))


_CHILD = """
import json, sys, time
from turboquant.index import TurboQuantIndex
from turboquant.streaming import build_index, npy_shape
def status(key):  # kB from /proc (VmHWM is per process image, unlike ru_maxrss which survives exec)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))
t = time.perf_counter()
TurboQuantIndex(npy_shape(sys.argv[1])[0][1], float(sys.argv[3]))  # one-time codebook + rotation setup
setup_s = time.perf_counter() - t
base = status("VmRSS:")
t = time.perf_counter()
index = build_index(sys.argv[1], float(sys.argv[3]), "ip", engine=sys.argv[4])
build_s = time.perf_counter() - t
peak = status("VmHWM:")
index.save(sys.argv[2])
print(json.dumps({"setup_s": setup_s, "build_s": build_s, "rss_before_MB": base / 1024, "rss_peak_MB": peak / 1024,
                  "codes_norms_MB": index.nbytes / 2**20, "allocated_MB": index.memory_bytes / 2**20}))
"""


# The process that loads and searches: its VmHWM is the search-time peak. Everything but the index
# (interpreter, torch, the scan library, codebooks, rotation, the queries, and the code pages and
# thread pools a search touches: one warm-up search of a 2,000-vector index, then freed) is in
# place before the RSS snapshot taken just before loading, where VmHWM is reset (``/proc/self/clear_refs``),
# so that the peak reported is the peak of loading and searching.
_SEARCH_CHILD = """
import json, sys, time
import numpy as np
from turboquant.index import TurboQuantIndex
from turboquant.index_file import read_index_file
from turboquant.kernels.cpu_scan import load_scan_library
def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))
path, queries, single = sys.argv[1], np.load(sys.argv[2]), int(sys.argv[3])
head = read_index_file(path, mmap=True)[1]
load_scan_library()
warm = TurboQuantIndex(head.config.dim, head.config.bits)  # codebook + rotation caches, a search's code pages
warm.add(queries[np.arange(2000) % len(queries)] + np.float32(1e-3))
warm.search(queries[:1], 10), warm.search(queries, 10)
del warm
hwm_before = status("VmHWM:")
with open("/proc/self/clear_refs", "w") as fh:  # reset VmHWM to the current RSS (Linux >= 4.0): the peak from here
    fh.write("5")
before = status("VmRSS:")
t = time.perf_counter()
index = TurboQuantIndex.load(path, mmap=True)
load_s = time.perf_counter() - t
t = time.perf_counter()
index.search(queries[:1], 10)
first_s = time.perf_counter() - t
t = time.perf_counter()
ids = index.search(queries, 10)[1]
batch_s = time.perf_counter() - t
t = time.perf_counter()
for i in range(single):
    index.search(queries[i : i + 1], 10)
single_s = time.perf_counter() - t
peak = status("VmHWM:")
np.save(sys.argv[4], ids)
print(json.dumps({"mmap_load_s": load_s, "first_search_s": first_s, "QPS_batch": len(queries) / batch_s,
                  "QPS_single": single / single_s, "search_rss_before_MB": before / 1024,
                  "search_hwm_before_MB": hwm_before / 1024, "search_rss_peak_MB": peak / 1024,
                  "search_rss_after_MB": status("VmRSS:") / 1024, "split_storage": getattr(index, "_split", lambda: None)() is not None,
                  "memory_bytes_MB": index.memory_bytes / 2**20, "bytes_per_vector": index.bytes_per_vector}))
"""


def run_tq(data: Path, out: Path, bits: float, queries: np.ndarray, gt: np.ndarray, single: int,
           engine: str = "auto") -> dict[str, Any]:  # fmt: skip
    env = dict(os.environ)
    child = subprocess.run([sys.executable, "-c", _CHILD, str(data), str(out), str(bits), engine], env=env,
                           capture_output=True, text=True, check=True)  # fmt: skip
    row: dict[str, Any] = {"method": "tq", "build_engine": engine, **json.loads(child.stdout.strip().splitlines()[-1])}
    row["build_mem_over_codes"] = (row["rss_peak_MB"] - row["rss_before_MB"]) / row["codes_norms_MB"] - 1
    row["file_MB"] = out.stat().st_size / 2**20
    qpath, idpath = out.with_suffix(".queries.npy"), out.with_suffix(".ids.npy")
    np.save(qpath, queries)
    child = subprocess.run([sys.executable, "-c", _SEARCH_CHILD, str(out), str(qpath), str(single), str(idpath)], env=env,
                           capture_output=True, text=True, check=True)  # fmt: skip
    row.update(json.loads(child.stdout.strip().splitlines()[-1]))
    row["R10@10"] = recall(np.load(idpath), gt)
    # memory while searching: the loading-and-searching process's peak over its RSS before the load
    row["search_mem_MB"] = row["search_rss_peak_MB"] - row["search_rss_before_MB"]
    row["search_mem_over_codes"] = row["search_mem_MB"] / row["codes_norms_MB"]
    qpath.unlink()
    idpath.unlink()
    return row


def time_search(search: Any, queries: np.ndarray, gt: np.ndarray, single: int) -> dict[str, Any]:
    t = time.perf_counter()
    ids = search(queries)
    batch_s = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(single):
        search(queries[i : i + 1])
    single_s = time.perf_counter() - t
    return {"R10@10": recall(np.asarray(ids), gt), "QPS_batch": len(queries) / batch_s, "QPS_single": single / single_s}


def run_peer(name: str, data: Path, n: int, dim: int, bits: int, tq_bytes: int, queries: np.ndarray, gt: np.ndarray,
             single: int, max_gb: float) -> dict[str, Any]:  # fmt: skip
    import faiss

    if name == "faiss-rabitq":
        index = faiss.IndexRaBitQ(dim, faiss.METRIC_INNER_PRODUCT, bits)
        index.qb = 4
    else:
        m = max(m for m in range(2, 2 * tq_bytes + 1, 2) if dim % m == 0)
        index = faiss.IndexPQFastScan(dim, m, 4, faiss.METRIC_INNER_PRODUCT)
    need_gb = n * index.sa_code_size() / 1e9 if index.is_trained else n * (index.code_size or 1) / 1e9
    if need_gb > max_gb:
        return {"method": name, "skipped": f"codes need {need_gb:.1f} GB > --peer-max-gb {max_gb}"}
    t = time.perf_counter()
    sample = next(iter_npy_rows(data, 20_000))
    index.train(sample)
    for x in iter_npy_rows(data, CHUNK):
        index.add(x)
    row: dict[str, Any] = {"method": name, "build_s": time.perf_counter() - t, "bytes_per_vector": int(index.sa_code_size())}
    row.update(time_search(lambda q: index.search(q, 10)[1], queries, gt, single))
    return row


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for method in sorted({r["method"] for r in rows}):
        pts = sorted((r["n"], r) for r in rows if r["method"] == method and "skipped" not in r)
        if not pts:
            continue
        ns = [p[0] for p in pts]
        style = "-o" if method == "tq" else "--s"
        axes[0].plot(ns, [p[1]["QPS_batch"] for p in pts], style, label=method)
        axes[1].plot(ns, [p[1]["QPS_single"] for p in pts], style, label=method)
        axes[2].plot(ns, [p[1]["build_s"] for p in pts], style, label=method)
    for ax, title in zip(axes, ["batch QPS (1,000 queries)", "single-query QPS", "build seconds"]):
        ax.set(xscale="log", yscale="log", xlabel="n vectors (d=384)", title=title)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--nq", type=int, default=1000)
    p.add_argument("--single", type=int, default=50, help="queries issued one by one")
    p.add_argument("--workdir", type=Path, default=None, help="where the .npy inputs go (default: a temp dir)")
    p.add_argument("--peer-max-gb", type=float, default=4.0)
    p.add_argument("--no-faiss", action="store_true")
    p.add_argument("--build-engine", default="auto", choices=["auto", "torch"],
                   help="engine of the build (auto: the file holds the fast scan's split storage)")
    p.add_argument("--out", default="ann_scale.json")
    args = p.parse_args(argv)
    info = machine_info()
    print(f"machine: {info}")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for n in args.n:
            data, out = Path(tmp) / f"base_{n}.npy", Path(tmp) / f"index_{n}.tq"
            t = time.perf_counter()
            queries = write_synthetic(data, n, args.nq, args.dim)
            gt = ground_truth(data, queries)
            print(f"\n== n={n}: data {data.stat().st_size / 2**30:.2f} GiB written + ground truth in {time.perf_counter() - t:.0f} s", flush=True)
            tq = run_tq(data, out, args.bits, queries, gt, args.single, args.build_engine)
            rows.append({"n": n, **tq})
            print(json.dumps(rows[-1]), flush=True)
            if not args.no_faiss:
                for name in ("faiss-rabitq", "faiss-pq-fs"):
                    rows.append({"n": n, **run_peer(name, data, n, args.dim, args.bits, tq["bytes_per_vector"], queries, gt,
                                                     args.single, args.peer_max_gb)})  # fmt: skip
                    print(json.dumps(rows[-1]), flush=True)
            data.unlink()
            out.unlink()
    cols = ["n", "method", "R10@10", "QPS_batch", "QPS_single", "build_s", "bytes_per_vector", "rss_peak_MB",
            "codes_norms_MB", "build_mem_over_codes", "search_mem_MB", "search_mem_over_codes", "file_MB",
            "mmap_load_s", "first_search_s", "skipped"]  # fmt: skip
    print("\n" + table([[r.get(c, "") for c in cols] for r in rows], cols))
    path = write_json(args.out, {"machine": info, "threads": {"torch": torch.get_num_threads()}, "args": vars(args), "rows": rows})
    print(f"wrote {path}")
    plot(rows, path.with_suffix(".png"))


if __name__ == "__main__":
    main()
