"""Same numbers before and after a refactor: this checkout vs another checkout, side by side in one run.

Each measurement runs in a fresh subprocess per checkout (``PYTHONPATH`` points at the checkout),
alternating between the two, so both see the same machine state:

* codes: fraction of identical code bytes and the MSE per (dim, bits, variant, rotation);
* encode: vectors/s of ``TurboQuantMSE(128, 4).quantize`` (median of runs), ratio new/old;
* kv: SmolLM2-135M perplexity with the TurboQuant cache (K4/V4 and K3/V2) after a compressed prefix;
* index: Brown × MiniLM, 4 bits: identical ids, batch and single-query QPS, build time.

    python benchmarks/parity.py --baseline ../baseline            # everything (~10 min on 2 cores)
    python benchmarks/parity.py --baseline ../baseline --only codes,index

Writes ``benchmarks/results/parity.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from _common import REPO, SHARED_DATA, machine_info, write_json

CODE_CONFIGS = [(d, b, v, r) for d in (64, 128, 384) for b in (1, 2, 3, 4, 2.5) for v in ("mse",) for r in ("hadamard", "haar")]
CODE_CONFIGS += [(128, b, "prod", "hadamard") for b in (2, 3, 4)]


# --------------------------------------------------------------------------- workers (run inside one checkout)


def _work_codes() -> dict[str, Any]:
    import torch

    from turboquant import QuantizerConfig
    from turboquant.quantizer import TurboQuantizer

    out = {}
    for d, b, v, r in CODE_CONFIGS:
        q = TurboQuantizer.from_config(QuantizerConfig(d, b, v, r, 0))  # type: ignore[arg-type]
        x = torch.randn(4096, d, generator=torch.Generator().manual_seed(d * 10 + int(b * 2)))
        c = q.quantize(x)
        err = (q.dequantize(c) - x).square().sum(1) / x.square().sum(1)
        out[f"{d}/{b}/{v}/{r}"] = {"codes": c.codes.numpy().tobytes().hex(), "mse": float(err.mean())}
    return out


def _work_encode(repeats: int) -> dict[str, Any]:
    import torch

    from turboquant import TurboQuantMSE

    q = TurboQuantMSE(128, 4)
    x = torch.randn(200_000, 128, generator=torch.Generator().manual_seed(0))
    q.quantize(x[:1000])
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        q.quantize(x)
        times.append(time.perf_counter() - t0)
    return {"vectors_per_s": 200_000 / statistics.median(times), "threads": torch.get_num_threads()}


def _work_kv(prefix: int, score: int) -> dict[str, Any]:
    import torch

    try:
        from turboquant.demo.models import load_smollm2, pydoc_text
    except ImportError:  # checkouts before the demo subpackage
        from turboquant.models import load_smollm2, pydoc_text  # type: ignore[no-redef]
    from turboquant.cache import TurboQuantCache

    model, tok = load_smollm2(dtype=torch.float32)
    ids = tok(pydoc_text(), return_tensors="pt").input_ids[:, : prefix + score]
    out = {}
    for kb, vb in ((4, 4), (3, 2)):
        cache = TurboQuantCache(model.config, key_bits=kb, value_bits=vb)
        nll = []
        with torch.inference_mode():
            logits = model(ids[:, :prefix], past_key_values=cache, use_cache=True).logits[:, -1]
            for t in range(prefix, prefix + score):
                nll.append(float(torch.nn.functional.cross_entropy(logits.float(), ids[:, t])))
                logits = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits[:, -1]
        out[f"K{kb}/V{vb}"] = {"ppl": float(np.exp(np.mean(nll)))}
    return out


def _work_index(repeats: int) -> dict[str, Any]:
    from turboquant.index import TurboQuantIndex

    base = np.load(SHARED_DATA / "brown_minilm_base.npy").astype(np.float32)
    queries = np.load(SHARED_DATA / "brown_minilm_queries.npy").astype(np.float32)
    builds, batch, single = [], [], []
    ids = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        index = TurboQuantIndex(384, 4, "cosine")
        index.add(base)
        builds.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        _, ids = index.search(queries, 10)
        batch.append(len(queries) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for q in queries[:300]:
            index.search(q[None], 10)
        single.append(300 / (time.perf_counter() - t0))
    assert ids is not None
    return {"ids": ids.tobytes().hex(), "build_s": statistics.median(builds), "qps_batch": statistics.median(batch), "qps_single": statistics.median(single)}


WORKERS = {"codes": _work_codes, "encode": _work_encode, "kv": _work_kv, "index": _work_index}


# --------------------------------------------------------------------------- driver


def _run(checkout: Path, what: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    cmd = [sys.executable, __file__, "--worker", what, "--kwargs", json.dumps(kwargs)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, cwd=checkout)
    if done.returncode:
        raise RuntimeError(f"{what} in {checkout} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _compare(what: str, old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    if what == "codes":
        rows = {}
        for key in old:
            a, b = bytes.fromhex(old[key]["codes"]), bytes.fromhex(new[key]["codes"])
            same = float(np.mean(np.frombuffer(a, np.uint8) == np.frombuffer(b, np.uint8)))
            rows[key] = {"identical_bytes": same, "mse_old": old[key]["mse"], "mse_new": new[key]["mse"], "mse_rel_diff": new[key]["mse"] / old[key]["mse"] - 1}
        worst = max(abs(r["mse_rel_diff"]) for r in rows.values())
        return {"rows": rows, "worst_mse_rel_diff": worst, "min_identical_bytes": min(r["identical_bytes"] for r in rows.values())}
    if what == "encode":
        return {"old": old, "new": new, "ratio_new_over_old": new["vectors_per_s"] / old["vectors_per_s"]}
    if what == "kv":
        return {k: {"old": old[k]["ppl"], "new": new[k]["ppl"], "rel_diff": new[k]["ppl"] / old[k]["ppl"] - 1} for k in old}
    if what == "index":
        same = bytes.fromhex(old.pop("ids")) == bytes.fromhex(new.pop("ids"))
        return {"identical_ids": same, "old": old, "new": new, **{f"ratio_{k}": new[k] / old[k] for k in ("qps_batch", "qps_single", "build_s")}}
    raise ValueError(what)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", type=Path, help="the other checkout (its repository root)")
    p.add_argument("--only", default="codes,encode,kv,index", help="comma-separated subset of codes,encode,kv,index")
    p.add_argument("--rounds", type=int, default=2, help="alternating old/new rounds for the timed parts")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--kwargs", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](**json.loads(args.kwargs))))
        return 0
    if args.baseline is None:
        p.error("--baseline is required")
    kwargs = {"codes": {}, "encode": {"repeats": 5}, "kv": {"prefix": 1280, "score": 96}, "index": {"repeats": 3}}
    result: dict[str, Any] = {"machine": machine_info(), "baseline": str(args.baseline.resolve()), "current": str(REPO)}
    for what in args.only.split(","):
        rounds = args.rounds if what in ("encode", "index") else 1
        olds, news = [], []
        for _ in range(rounds):  # alternate, so both see the same machine state
            olds.append(_run(args.baseline.resolve(), what, kwargs[what]))
            news.append(_run(REPO, what, kwargs[what]))
        old, new = olds[-1], news[-1]
        if what in ("encode", "index"):  # medians over rounds of the timed numbers
            for key in old:
                if isinstance(old[key], float):
                    old[key] = statistics.median(o[key] for o in olds)
                    new[key] = statistics.median(n[key] for n in news)
        result[what] = _compare(what, old, new)
        summary = {k: v for k, v in result[what].items() if k != "rows"}
        print(f"{what}: {json.dumps(summary, indent=1)}", flush=True)
    path = write_json("parity.json", result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
