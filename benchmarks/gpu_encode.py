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
from turboquant.quantizer import QuantizedVectors, TurboQuantizer

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


CUDA_VARIANTS = [None, (4, 2, 4, 3), (2, 2, 4, 4), (4, 0, 4, 3), (2, 1, 4, 4), (2, 0, 4, 4), (4, 1, 8, 1), (8, 1, 4, 2),
                 (4, 1, 4, 2)]  # fmt: skip
"""``cuda_quantize_into`` variants (groups of 8 tokens per warp, bucketize 0 search / 1 cell table / 2 word table,
warps, min CTAs/SM);
None = the default."""


def run_cuda(copy_bw: float, variants: bool = True) -> list[dict[str, Any]]:
    """The CUDA encode (cuda_encode.cu): identical codes vs the quantizer, norms, time per variant and width."""
    from turboquant.codec import reconstruction_norms
    from turboquant.kernels import cuda_encode, triton_encode

    rows: list[dict[str, Any]] = []
    x = torch.randn(ROWS, TOKENS, D, device="cuda", dtype=torch.bfloat16)
    for d in (128, 64):
        xd = x if d == D else torch.randn(ROWS, TOKENS, d, device="cuda", dtype=torch.bfloat16)
        for bits in (4, 3, 2):
            cfg = QuantizerConfig(d, bits, norm_dtype="float16")
            codes = torch.empty(ROWS, TOKENS, code_bytes(cfg), dtype=torch.uint8, device="cuda")
            norms = torch.empty(ROWS, TOKENS, dtype=torch.float16, device="cuda")
            ref = TurboQuantizer.from_config(cfg).quantize(xd[:4])
            ref_dec = decode_mse(ref.codes, cfg)
            nbytes = xd.numel() * xd.element_size() + codes.numel() + norms.numel() * 2
            for variant in CUDA_VARIANTS if (d == D and bits == 4 and variants) else [None]:
                def enc(variant: Any = variant, correct: bool = False) -> Any:
                    return cuda_encode.cuda_quantize_into(xd, cfg, codes, norms, 0, variant=variant, norm_correction=correct)

                try:
                    out = enc()
                    out = QuantizedVectors(cfg, out.codes.clone(), out.norms.clone())
                    same = (decode_mse(out.codes[:4], cfg) == ref_dec).float().mean().item()
                    nerr = ((out.norms[:4].float() - ref.norms.float()).abs() / ref.norms.float()).max().item()
                    ms = bench(enc)
                    info = cuda_encode.encode_kernel_info(cfg, xd.dtype, xd.device, variant)
                except Exception as exc:
                    log(f"cuda encode d={d} bits={bits} {variant}: FAILED {str(exc)[:300]}")
                    continue
                frac = nbytes / (ms * 1e-3) / copy_bw
                row = dict(d=d, bits=bits, variant=variant, ms=ms, frac_copy=frac, same_codes=same, norm_rel_err=nerr,
                           regs=info[0], spill_bytes=info[1], ctas_per_sm=info[2], smem=info[3])  # fmt: skip
                if variant is None:
                    outc = enc(None, True)
                    y = decode_mse(outc.codes[:4], cfg)
                    want = out.norms[:4].float() / reconstruction_norms(y)
                    row["corrected_norm_rel_err"] = ((outc.norms[:4].float() - want).abs() / want).max().item()
                    row["ms_corrected"] = bench(lambda: enc(None, True))
                    row["triton_ms"] = bench(lambda: triton_encode.triton_quantize_into(xd, cfg, codes, norms, 0))
                log(f"cuda encode d={d} bits={bits} {variant}: {ms * 1e3:7.1f} us ({frac:.0%} of copy) same={same:.6f} "
                    f"norm err {nerr:.1e} regs/spill/ctas {info[:3]}"
                    + (f"; corrected {row['ms_corrected'] * 1e3:.1f} us (err {row['corrected_norm_rel_err']:.1e}), "
                       f"triton {row['triton_ms'] * 1e3:.1f} us" if variant is None else ""))  # fmt: skip
                rows.append(row)
    # the KV cache's flush: bf16 window minus the per-head mean (one product: y = Pi x - Pi mu), with or without a
    # per-channel key scale (outlier channels: the input goes through two bf16 parts), corrected norms
    cfg = QuantizerConfig(D, 4, norm_dtype="float16")
    codes = torch.empty(ROWS, TOKENS, code_bytes(cfg), dtype=torch.uint8, device="cuda")
    norms = torch.empty(ROWS, TOKENS, dtype=torch.float16, device="cuda")
    off = x[:, :64].float().mean(1)
    for label, inv in (("offset", None), ("offset + scale", 1.0 / (1.0 + torch.rand(ROWS, D, device="cuda")))):

        def fused(inv: Any = inv) -> Any:
            return cuda_encode.cuda_quantize_into(x, cfg, codes, norms, 0, offset=off, inv_scale=inv, norm_correction=True)

        def unfused(inv: Any = inv) -> Any:
            from turboquant.kernels import quantize_into

            xs = (x.float() - off.unsqueeze(1)) * (inv.unsqueeze(1) if inv is not None else 1.0)
            return quantize_into(xs, cfg, codes, norms, 0, backend="triton", norm_correction=True)

        a = fused()
        a_codes, a_norms = a.codes.clone(), a.norms.clone()
        b = unfused()
        same = (decode_mse(a_codes[:4], cfg) == decode_mse(b.codes[:4], cfg)).float().mean().item()
        nerr = ((a_norms.float() - b.norms.float()).abs() / b.norms.float().abs().clamp_min(1e-6)).max().item()
        row = dict(d=D, bits=4, variant=f"cache flush ({label}, corrected norms)", ms=bench(fused), unfused_ms=bench(unfused, rep_ms=200),
                   same_codes=same, norm_rel_err=nerr)  # fmt: skip
        row["frac_copy"] = (x.numel() * 2 + codes.numel() + norms.numel() * 2) / (row["ms"] * 1e-3) / copy_bw
        log(f"cache flush ({label}): fused CUDA {row['ms'] * 1e3:.1f} us ({row['frac_copy']:.0%} of copy) vs torch transform + "
            f"Triton + torch correction {row['unfused_ms'] * 1e3:.1f} us; same codes {same:.6f}, norm err {nerr:.1e}")  # fmt: skip
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = gpu_parser(__doc__)
    p.add_argument("--baseline", type=Path, help="a previous triton_encode.py to time side by side")
    p.add_argument("--cuda-only", action="store_true", help="only the CUDA encode section")
    p.add_argument("--defaults-only", action="store_true", help="CUDA encode: time the default kernels, not the variants")
    args = p.parse_args(argv)
    tuning = tuning_from(args.tuning)
    baseline = load_baseline(args.baseline) if args.baseline else None
    results: dict[str, Any] = {**device_info(), "tuning": dataclasses.asdict(tuning)}
    results["copy_bw_gbps"] = copy_bandwidth() / 1e9
    sections = Sections(results, "gpu_encode.json", args.out)
    cuda_rows = sections.run("cuda", lambda: run_cuda(results["copy_bw_gbps"] * 1e9, not args.defaults_only)) or []
    if args.cuda_only:
        cols = ["d", "bits", "variant", "ms", "frac_copy", "same_codes", "regs", "spill_bytes", "ctas_per_sm"]
        print(table([[r.get(c) for c in cols] for r in cuda_rows], cols))
        return 0
    rows = sections.run("encode", lambda: run_encode(tuning, results["copy_bw_gbps"] * 1e9, baseline)) or []
    sections.run("sweep", lambda: SWEEP)
    cols = ["bits", "ms", "frac_copy", "same_codes", "block_t", "warps", "bucket", "programs_per_sm", "dots", "torch_quantize_ms"]
    print(table([[r[c] for c in cols] for r in rows], cols))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
