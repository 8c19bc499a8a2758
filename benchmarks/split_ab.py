"""Search speed and memory before/after the split storage, side by side on the same index file.

    python benchmarks/split_ab.py --base /tmp/base                    # Brown × MiniLM (d=384), 2 and 4 bits
    python benchmarks/split_ab.py --base /tmp/base --n 1000000        # synthetic 1M × 384 (ann_scale's set), 4 bits

``--base`` is a folder holding the ``turboquant`` package to compare against (e.g. ``git archive
<commit> turboquant | tar -x -C /tmp/base``); the other side is this checkout. The index is built once
by the base library and saved (its file format, version 1 for the pre-split code), then loaded
and saved again by this checkout (its format: version 2, the split storage); each side then loads its
own file memory-mapped in a fresh process (load time recorded; the first search, which builds the
base's scan mirror and computes the scan factors, is excluded from the timings) and times a batch of queries (median of ``--batch-repeats``) and single queries
(median per-query time over ``--single`` queries), in alternating processes for ``--repeats`` rounds:
medians per side and the paired ratio (after / before) per round, of wall-clock QPS and of process
CPU time per query (threads summed: steadier than wall time on a shared machine). Ids and scores of both sides must be identical.
Also records each search process's peak RSS over its RSS before loading. Writes
``benchmarks/results/<--out>``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from _common import machine_info, run_with_package, table, write_json

ROOT = Path(__file__).resolve().parents[1]

_BUILD = """
import sys, numpy as np
from turboquant.streaming import build_index
index = build_index(sys.argv[1], float(sys.argv[2]), "ip")
index.save(sys.argv[3])
"""

_CONVERT = """
import sys
from turboquant.index import TurboQuantIndex
index = TurboQuantIndex.load(sys.argv[1], mmap=True)
index.search(index.reconstruct([0]), 1)  # the split storage is built at the first search
index.save(sys.argv[2])
"""

_SEARCH = """
import json, sys, time, hashlib
import numpy as np, torch
from turboquant.index import TurboQuantIndex
from turboquant.index_file import read_index_file
from turboquant.kernels.cpu_scan import load_scan_library
def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))
path, q, single, reps = sys.argv[1], np.load(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
head = read_index_file(path, mmap=True)[1]
TurboQuantIndex(head.config.dim, head.config.bits).rotation.matrix()
load_scan_library()
open("/proc/self/clear_refs", "w").write("5")  # VmHWM from here: the peak of loading and searching
before = status("VmRSS:")
t = time.perf_counter()
index = TurboQuantIndex.load(path, mmap=True)
load_s = time.perf_counter() - t
index.search(q[:1], 10)  # builds the scan (and, on the split side, its storage): not timed
batch, batch_cpu = [], []
for _ in range(reps):
    t, c = time.perf_counter(), time.process_time(); s, ids = index.search(q, 10)
    batch.append(time.perf_counter() - t); batch_cpu.append(time.process_time() - c)
one = []
c = time.process_time()
for i in range(single):
    t = time.perf_counter(); index.search(q[i : i + 1], 10); one.append(time.perf_counter() - t)
single_cpu = (time.process_time() - c) / single
digest = hashlib.sha256(np.ascontiguousarray(ids).tobytes() + np.ascontiguousarray(s).tobytes()).hexdigest()
print(json.dumps({"load_s": load_s, "batch_qps": len(q) / float(np.median(batch)),
                  "batch_cpu_ms_per_query": 1e3 * float(np.median(batch_cpu)) / len(q), "single_cpu_ms": 1e3 * single_cpu, "single_qps": 1 / float(np.median(one)),
                  "digest": digest, "threads": torch.get_num_threads(),
                  "search_mem_MB": (status("VmHWM:") - before) / 1024, "split": hasattr(index, "_split") and index._split() is not None}))
"""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, required=True, help="folder with the turboquant package to compare against")
    p.add_argument("--n", type=int, default=0, help="synthetic set of n vectors (0: the Brown set)")
    p.add_argument("--bits", type=float, nargs="+", default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-repeats", type=int, default=3)
    p.add_argument("--single", type=int, default=200)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    bits_list = args.bits or ([4.0] if args.n else [2.0, 4.0])
    info = machine_info()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "base.npy"
        if args.n:
            sys.path.insert(0, str(Path(__file__).parent))
            from ann_scale import write_synthetic

            queries = write_synthetic(data, args.n, 1000, 384)
            name = f"synthetic-{args.n}"
        else:
            shared = ROOT.parent / "shared" / "data"
            np.save(data, np.load(shared / "brown_minilm_base.npy").astype(np.float32))
            queries = np.load(shared / "brown_minilm_queries.npy").astype(np.float32)[:1000]
            name = "brown-minilm"
        qpath = Path(tmp) / "q.npy"
        np.save(qpath, queries)
        for bits in bits_list:
            index = Path(tmp) / f"index_{bits}.tq"
            run_with_package(_BUILD, [str(data), str(bits), str(index)], args.base)
            converted = Path(tmp) / f"index_{bits}_v2.tq"
            run_with_package(_CONVERT, [str(index), str(converted)], ROOT)
            files = {"before": index, "after": converted}
            res: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
            for r in range(args.repeats):
                for side, lib in (("before", args.base), ("after", ROOT)) if r % 2 == 0 else (("after", ROOT), ("before", args.base)):
                    out = run_with_package(_SEARCH, [str(files[side]), str(qpath), str(args.single), str(args.batch_repeats)], lib)
                    res[side].append(json.loads(out.strip().splitlines()[-1]))
            digests = {x["digest"] for side in res.values() for x in side}
            row: dict[str, Any] = {"set": name, "bits": bits, "identical_results": len(digests) == 1}
            for side in res:
                for key in ("load_s", "batch_qps", "single_qps", "batch_cpu_ms_per_query", "single_cpu_ms", "search_mem_MB"):
                    row[f"{key}_{side}"] = float(np.median([x[key] for x in res[side]]))
                row[f"split_{side}"] = res[side][0]["split"]
            for key in ("batch_qps", "single_qps", "batch_cpu_ms_per_query", "single_cpu_ms"):
                ratios = [a[key] / b[key] for a, b in zip(res["after"], res["before"])]
                row[f"{key}_ratio_paired"] = ratios
                row[f"{key}_ratio_median"] = float(np.median(ratios))
            row["file_MB_before"] = index.stat().st_size / 2**20
            row["file_MB_after"] = converted.stat().st_size / 2**20
            row["threads"] = res["after"][0]["threads"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    cols = ["set", "bits", "identical_results", "batch_qps_before", "batch_qps_after", "batch_qps_ratio_median",
            "single_qps_before", "single_qps_after", "single_qps_ratio_median", "batch_cpu_ms_per_query_ratio_median",
            "single_cpu_ms_ratio_median", "search_mem_MB_before",
            "search_mem_MB_after", "load_s_before", "load_s_after", "file_MB_after"]  # fmt: skip
    print(table([[r[c] for c in cols] for r in rows], cols))
    out = args.out or (f"split_ab_{args.n}.json" if args.n else "split_ab_brown.json")
    print(f"wrote {write_json(out, {'machine': info, 'args': {k: str(v) for k, v in vars(args).items()}, 'rows': rows})}")


if __name__ == "__main__":
    main()
