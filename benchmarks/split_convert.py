"""What loading an index file costs, by format: version 2 (split storage) vs a converted version 1 file.

    python benchmarks/split_convert.py --base /tmp/base              # 1M × 384, 4 bits

``--base``: a folder with the previous ``turboquant`` package (index file version 1, e.g. ``git archive
fbbf53b turboquant | tar -x -C /tmp/base``), which builds the index and saves it; this checkout loads
that file and saves it again (version 2). For each file and ``mmap`` True/False a fresh process (this
checkout, warmed up on a small index, its VmHWM reset through ``/proc/self/clear_refs``) loads it and
runs one search: load and first-search seconds, peak RSS and RSS after, over the RSS before loading.
Writes ``benchmarks/results/split_convert.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from _common import machine_info, run_with_package, table, write_json

ROOT = Path(__file__).resolve().parents[1]

_BUILD = """
import sys
from turboquant.streaming import build_index
build_index(sys.argv[1], float(sys.argv[2]), "ip", engine="torch").save(sys.argv[3])
"""

_RESAVE = """
import sys
from turboquant.index import TurboQuantIndex
index = TurboQuantIndex.load(sys.argv[1])
index.search(index.reconstruct([0]), 1)
index.save(sys.argv[2])
"""

_LOAD = """
import json, sys, time
import numpy as np
from turboquant.index import TurboQuantIndex
def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) / 1024
q = np.load(sys.argv[3])
warm = TurboQuantIndex(q.shape[1], float(sys.argv[4]))
warm.add(q[np.arange(2000) % len(q)] + np.float32(1e-3))
warm.search(q, 10)
del warm
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS:")
t = time.perf_counter()
index = TurboQuantIndex.load(sys.argv[1], mmap=sys.argv[2] == "1")
load_s = time.perf_counter() - t
t = time.perf_counter()
index.search(q[:1], 10)
first_s = time.perf_counter() - t
print(json.dumps({"load_s": load_s, "first_search_s": first_s, "peak_MB": status("VmHWM:") - before,
                  "after_MB": status("VmRSS:") - before, "codes_norms_MB": index.nbytes / 2**20}))
"""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--bits", type=float, default=4.0)
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, str(Path(__file__).parent))
        from ann_scale import write_synthetic

        data, v1, v2, qpath = (Path(tmp) / name for name in ("base.npy", "v1.tq", "v2.tq", "q.npy"))
        np.save(qpath, write_synthetic(data, args.n, 1000, 384))
        run_with_package(_BUILD, [str(data), str(args.bits), str(v1)], args.base)
        run_with_package(_RESAVE, [str(v1), str(v2)], ROOT)
        for name, path in (("version 2", v2), ("version 1 (converted)", v1)):
            for mmap in (True, False):
                out = json.loads(run_with_package(_LOAD, [str(path), "1" if mmap else "0", str(qpath), str(args.bits)], ROOT).strip().splitlines()[-1])
                out.update({"file": name, "mmap": mmap, "peak_over_codes": out["peak_MB"] / out["codes_norms_MB"],
                            "after_over_codes": out["after_MB"] / out["codes_norms_MB"]})  # fmt: skip
                rows.append(out)
                print(json.dumps(out), flush=True)
    cols = ["file", "mmap", "load_s", "first_search_s", "peak_MB", "after_MB", "codes_norms_MB", "peak_over_codes", "after_over_codes"]
    print(table([[r[c] for c in cols] for r in rows], cols))
    print(f"wrote {write_json('split_convert.json', {'machine': machine_info(), 'args': {k: str(v) for k, v in vars(args).items()}, 'rows': rows})}")


if __name__ == "__main__":
    main()
