"""How fast is the fused Triton encode (norm, rotation, bucketize, pack) next to a device copy, and does it write the torch codes?

One layer of a 32k prefill at batch 8 with 8 KV heads (64 rows × 32768 tokens × d=128, bf16),
bits 4, 3 and 2. For each encode launch variant (a ``dataclasses.replace`` of the tuning given by
``--tuning``: tokens per block, warps, bucketize mode, persistent programs per SM) it checks the
decoded codes of the first rows against ``TurboQuantizer.quantize`` (fraction of identical
reconstructions), then times ``triton_quantize_into`` and reports bytes read + written as a
fraction of the measured copy bandwidth; the torch quantizer is timed for reference.

    python benchmarks/gpu_encode.py --out $OUT
    python benchmarks/gpu_encode.py --baseline old_triton_encode.py   # a previous kernel, same run

Writes ``gpu_encode.json`` into ``--out``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from turboquant import QuantizerConfig
from turboquant.codec import code_bytes, decode_mse
from turboquant.quantizer import TurboQuantizer

from _common import log, table
from _gpu import Sections, TritonTuning, gpu_parser, bench, copy_bandwidth, device_info, kernel_info, load_baseline, tuning_from

ROWS, TOKENS, D = 64, 32768, 128
SWEEP: list[dict[str, Any]] = []  # every variant timed (the best per width goes to the table)
VARIANTS = [  # encode_block_t, encode_num_warps, encode_bucket, encode_programs_per_sm, encode_dots
    (64, 4, 2, 4, 3),
    (64, 4, 2, 2, 3),
    (128, 8, 2, 2, 3),
    (64, 4, 0, 0, 3),
    (64, 4, 2, 4, 2),
    (128, 8, 2, 2, 2),
    (64, 4, 2, 4, 1),
    (128, 8, 2, 2, 1),
    (128, 4, 2, 4, 1),
]


def run_encode(base: TritonTuning, copy_bw: float, baseline: ModuleType | None) -> list[dict[str, Any]]:
    from turboquant.kernels import triton_encode

    rows = []
    x = torch.randn(ROWS, TOKENS, D, device="cuda", dtype=torch.bfloat16)
    for bits in (4, 3, 2):
        cfg = QuantizerConfig(D, bits, norm_dtype="float16")
        codes = torch.empty(ROWS, TOKENS, code_bytes(cfg), dtype=torch.uint8, device="cuda")
        norms = torch.empty(ROWS, TOKENS, dtype=torch.float16, device="cuda")
        ref = decode_mse(TurboQuantizer.from_config(cfg).quantize(x[:4]).codes, cfg)
        nbytes = x.numel() * x.element_size() + codes.numel() + norms.numel() * 2
        best: dict[str, Any] | None = None
        for bt, warps, mode, per_sm, dots in VARIANTS:
            tuning = dataclasses.replace(
                base, encode_block_t=bt, encode_num_warps=warps, encode_bucket=mode, encode_programs_per_sm=per_sm, encode_dots=dots
            )

            def encode(tuning: TritonTuning = tuning) -> Any:
                return triton_encode.triton_quantize_into(x, cfg, codes, norms, 0, tuning=tuning)

            try:
                same = (decode_mse(encode().codes[:4], cfg) == ref).float().mean().item()
                ms = bench(encode)
            except Exception as exc:
                log(f"encode bits={bits} bt={bt} w={warps} mode={mode}: FAILED {str(exc)[:200]}")
                continue
            info = kernel_info(triton_encode.triton_quantize_kernel)
            frac = nbytes / (ms * 1e-3) / copy_bw
            log(f"encode bits={bits} bt={bt} warps={warps} bucket={mode} per_sm={per_sm} dots={dots}: {ms * 1e3:8.1f} us "
                f"{nbytes / ms / 1e6:7.0f} GB/s ({frac:.0%} of copy) same={same:.6f} {info}")  # fmt: skip
            if best is None or ms < best["ms"]:
                best = dict(ms=ms, block_t=bt, warps=warps, bucket=mode, programs_per_sm=per_sm, dots=dots, same_codes=same, frac_copy=frac)
            SWEEP.append(dict(bits=bits, ms=ms, block_t=bt, warps=warps, bucket=mode, programs_per_sm=per_sm, dots=dots, same_codes=same, frac_copy=frac))
        if best is None:
            continue
        row = dict(bits=bits, rows=ROWS, tokens=TOKENS, bytes=nbytes, **best)
        row["torch_quantize_ms"] = bench(lambda: TurboQuantizer.from_config(cfg).quantize(x), rep_ms=100)
        if baseline is not None:
            try:
                row["baseline_ms"] = bench(lambda: baseline.triton_quantize_into(x, cfg, codes, norms, 0))
                row["baseline_frac_copy"] = nbytes / (row["baseline_ms"] * 1e-3) / copy_bw
            except Exception as exc:
                log(f"baseline encode failed: {str(exc)[:200]}")
        rows.append(row)
        log(f"encode bits={bits}: identical codes {best['same_codes']:.5f}; best {best['ms'] * 1e3:.1f} us = "
            f"{best['frac_copy']:.0%} of copy; torch quantize {row['torch_quantize_ms'] * 1e3:.0f} us")  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = gpu_parser(__doc__)
    p.add_argument("--baseline", type=Path, help="a previous triton_encode.py to time side by side")
    args = p.parse_args(argv)
    tuning = tuning_from(args.tuning)
    baseline = load_baseline(args.baseline) if args.baseline else None
    results: dict[str, Any] = {**device_info(), "tuning": dataclasses.asdict(tuning)}
    results["copy_bw_gbps"] = copy_bandwidth() / 1e9
    sections = Sections(results, "gpu_encode.json", args.out)
    rows = sections.run("encode", lambda: run_encode(tuning, results["copy_bw_gbps"] * 1e9, baseline)) or []
    sections.run("sweep", lambda: SWEEP)
    cols = ["bits", "ms", "frac_copy", "same_codes", "block_t", "warps", "bucket", "programs_per_sm", "dots", "torch_quantize_ms"]
    print(table([[r[c] for c in cols] for r in rows], cols))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
