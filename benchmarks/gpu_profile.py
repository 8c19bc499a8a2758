"""Nsight Compute profile of the CUDA decode and encode kernels (what limits them, not how fast they are).

Two steps. On the GPU machine, launch one kernel a few times under ``ncu`` and export its pages::

    ncu --clock-control none --set full --import-source no -k regex:decode_kernel --launch-skip 1 \\
        --launch-count 1 -o dec4 python benchmarks/gpu_profile.py dec 4 8 65536
    ncu -i dec4.ncu-rep --page details --csv > dec4_details.csv
    ncu -i dec4.ncu-rep --page raw --csv > dec4_raw.csv
    ncu -i dec4.ncu-rep --page source --csv --print-source sass > dec4_src.csv

(``enc 4`` profiles the 4-bit encode of 64 rows × 32k bf16 tokens, ``-k regex:encode_kernel``.) Then,
anywhere, summarize the exports (stall reasons, L1 wavefronts, pipe use; per-opcode stall samples)::

    python benchmarks/gpu_profile.py summarize DIR [--out benchmarks/results/ncu_h200.json]
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import math
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SECTIONS = ("GPU Speed Of Light Throughput", "Compute Workload Analysis", "Scheduler Statistics", "Warp State Statistics", "Occupancy")
RAW = (
    "l1tex__data_pipe_lsu_wavefronts.sum.pct_of_peak_sustained_elapsed",
    "l1tex__data_pipe_lsu_wavefronts_mem_shared.sum",
    "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum",
    "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum",
    "l1tex__throughput.avg.pct_of_peak_sustained_active",
    "sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active",
    "sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active",
    "sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active",
    "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",
    "smsp__inst_executed.sum",
)


def launch(argv: list[str]) -> None:
    import torch

    from turboquant import QuantizerConfig

    if argv[0] == "dec":  # dec BITS B N: the decode benchmark's inputs (Llama-3.1-8B shapes, gpu_decode_cuda.py)
        from gpu_decode_cuda import D, inputs

        from turboquant.kernels import cuda_attention as ca

        bits, b, n = map(int, argv[1:4])
        q, keys, values, _ = inputs(b, n, bits)
        for _ in range(3):
            ca.cuda_quantized_attention(q, keys, values, None, None, D**-0.5)
    else:  # enc BITS: one layer of a 32k prefill at B = 8
        from turboquant.codec import code_bytes
        from turboquant.kernels import cuda_encode

        cfg = QuantizerConfig(128, int(argv[1]), norm_dtype="float16")
        x = torch.randn(64, 32768, 128, device="cuda", dtype=torch.bfloat16)
        codes = torch.empty(64, 32768, code_bytes(cfg), dtype=torch.uint8, device="cuda")
        norms = torch.empty(64, 32768, dtype=torch.float16, device="cuda")
        for _ in range(3):
            cuda_encode.cuda_quantize_into(x, cfg, codes, norms, 0)
    torch.cuda.synchronize()


def _num(x: str) -> float:
    try:
        return float(x.replace(",", ""))
    except ValueError:
        return float("nan")


def summarize(folder: Path) -> dict:
    out: dict = {}
    for det in sorted(folder.glob("*_details.csv")):
        name = det.name[: -len("_details.csv")]
        rows = list(csv.reader(det.open()))
        h = rows[0]
        i_s, i_m, i_u, i_v = (h.index(k) for k in ("Section Name", "Metric Name", "Metric Unit", "Metric Value"))
        res: dict = {"kernel": rows[1][h.index("Kernel Name")], "details": {}}
        for r in rows[1:]:
            if len(r) > i_v and r[i_s] in SECTIONS and r[i_m]:
                res["details"][f"{r[i_m]} [{r[i_u]}]" if r[i_u] else r[i_m]] = _num(r[i_v])
        raw = folder / f"{name}_raw.csv"
        if raw.exists():
            rr = list(csv.reader(raw.open()))
            d = dict(zip(rr[0], rr[2]))
            stalls = {k[len("smsp__pcsamp_warps_issue_stalled_"):]: _num(v) for k, v in d.items()
                      if k.startswith("smsp__pcsamp_warps_issue_stalled_") and not k.endswith("not_issued")}  # fmt: skip
            tot = sum(v for v in stalls.values() if not math.isnan(v))
            res["stall_share"] = {k: round(v / tot, 4) for k, v in sorted(stalls.items(), key=lambda kv: -kv[1]) if v > 0}
            res["raw"] = {k: _num(d[k]) for k in RAW if k in d}
        src = folder / f"{name}_src.csv"
        if src.exists():
            rows = list(csv.reader(src.open()))
            h, data = rows[1], rows[2:]
            ix = {k: i for i, k in enumerate(h)}
            agg: dict = collections.defaultdict(collections.Counter)
            for r in data:
                if len(r) < len(h):
                    continue
                op = re.sub(r"^@!?U?P\w+\s+", "", r[ix["Source"]].strip()).split(" ")[0]
                key = op if op.split(".")[0] in ("LDG", "LDS", "HMMA", "SHFL") else op.split(".")[0]
                agg[key]["samples"] += _num(r[ix["Warp Stall Sampling (All Samples)"]])
                agg[key]["executed"] += _num(r[ix["Instructions Executed"]])
                agg[key]["long_scoreboard"] += _num(r[ix["stall_long_sb"]])
            tot = sum(a["samples"] for a in agg.values()) or 1.0
            res["by_opcode"] = {k: {"sample_share": round(a["samples"] / tot, 4), "executed": a["executed"],
                                    "long_scoreboard_share": round(a["long_scoreboard"] / tot, 4)}
                                for k, a in sorted(agg.items(), key=lambda kv: -kv[1]["samples"])[:16]}  # fmt: skip
        out[name] = res
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "summarize":
        ap = argparse.ArgumentParser()
        ap.add_argument("cmd")
        ap.add_argument("folder", type=Path)
        ap.add_argument("--out", type=Path, default=None)
        args = ap.parse_args()
        res = summarize(args.folder)
        text = json.dumps(res, indent=1)
        if args.out:
            args.out.write_text(text)
        for name, r in res.items():
            print(name, r["kernel"][:70])
            for k in ("Duration [us]", "Memory Throughput [%]", "DRAM Throughput [%]", "Issue Slots Busy [%]"):
                print(f"  {k:28s} {r['details'].get(k)}")
            print("  stalls:", ", ".join(f"{k} {v:.0%}" for k, v in list(r.get("stall_share", {}).items())[:6]))
        return
    launch(sys.argv[1:])


if __name__ == "__main__":
    main()
