"""Is the Triton decode-attention kernel right at full size? Its output against a float64 reference on one GPU.

Each case draws fresh random codes (``turboquant.kernels.testing.random_codes``), queries and a
full-precision window, runs ``triton_quantized_attention`` with its output and split partials
allocated full of NaN (so that a slot the kernel forgets to write shows up), and compares with
``float64_attention`` (codes decoded with float64 centroids and rotation). Cases cover head dims
64-256, bit widths 2-8 and fractional, GQA groups 1-8, batch 1-64, up to 128k tokens, boolean and
causal masks, key/value offsets and float32 norms. A case passes at relative error <= 1e-3.

    python benchmarks/gpu_decode_check.py                       # all cases (~1 min on an H200)
    python benchmarks/gpu_decode_check.py --tuning '{"lut": 1}' # another decoder

Writes ``gpu_decode_check.json`` into ``--out``. (The CPU test suite runs the same kernels under
the Triton interpreter on small shapes: tests/test_kernels.py.)
"""

from __future__ import annotations

import dataclasses
import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from turboquant import QuantizerConfig

from _common import log, table
from _gpu import Sections, TritonTuning, gpu_parser, device_info, tuning_from

CASES = [
    # d, kbits, vbits, G, B, N, W, L, extras
    (128, 4, 4, 4, 1, 131072, 128, 1, "boolmask+koff"),
    (128, 4, 4, 4, 8, 32768, 128, 1, ""),
    (128, 4, 4, 8, 64, 4096, 64, 1, ""),
    (128, 3, 3, 4, 8, 16384, 32, 1, "koff+voff"),
    (128, 2, 2, 1, 4, 65536, 0, 1, ""),
    (128, 4, 3, 8, 2, 1, 17, 1, ""),
    (128, 2.5, 3.5, 4, 4, 20000, 8, 1, ""),
    (128, 8, 8, 4, 1, 10000, 4, 1, ""),
    (128, 4, 4, 4, 2, 8192, 64, 64, "causal"),
    (64, 4, 4, 4, 16, 8192, 128, 1, "f32norms"),
    (64, 3, 2, 1, 1, 131072, 1, 1, ""),
    (256, 4, 4, 2, 4, 8192, 32, 1, ""),
    (80, 4, 3, 4, 2, 5000, 10, 1, ""),
    (96, 3, 4, 4, 2, 3000, 10, 1, ""),
    (128, 2, 4, 8, 32, 16384, 128, 1, "boolmask"),
]


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Make the kernel wrapper allocate its outputs and partials full of NaN for the duration."""
    from turboquant.kernels import triton_attention as ta

    real_empty = ta._empty

    def poisoned(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    ta._empty = poisoned
    try:
        yield
    finally:
        ta._empty = real_empty


def check_case(i: int, case: tuple, tuning: TritonTuning) -> dict[str, Any]:
    from turboquant.kernels.testing import float64_attention, random_codes, relative_error
    from turboquant.kernels.triton_attention import triton_quantized_attention

    d, kb, vb, g, b, n, w, l, extra = case
    torch.manual_seed(1000 + i)
    hkv, dev = 8, "cuda"
    nd = "float32" if "f32norms" in extra else "float16"
    keys = random_codes(QuantizerConfig(d, kb, seed=2 * i, norm_dtype=nd), (b, hkv, n), dev, capacity=n + 256)
    values = random_codes(QuantizerConfig(d, vb, seed=2 * i + 1, norm_dtype=nd), (b, hkv, n), dev, capacity=n + 256)
    q = torch.randn(b, hkv * g, l, d, device=dev, dtype=torch.bfloat16) * 2
    fk = torch.randn(b, hkv, w, d, device=dev, dtype=torch.bfloat16) if w else None
    fv = torch.randn(b, hkv, w, d, device=dev, dtype=torch.bfloat16) if w else None
    mask = None
    if "boolmask" in extra:
        mask = torch.rand(b, 1, l, n + w, device=dev) > 0.1
    if "causal" in extra:
        t = n + w
        allowed = torch.arange(t, device=dev)[None, :] <= (torch.arange(l, device=dev)[:, None] + t - l)
        mask = torch.zeros(1, 1, l, t, device=dev).masked_fill(~allowed, float("-inf"))
    ko = torch.randn(b, hkv, d, device=dev) if "koff" in extra else None
    vo = torch.randn(b, hkv, d, device=dev) if "voff" in extra else None
    args = (q.float(), keys, values, fk, fv, d**-0.5, mask, ko, vo)
    with poisoned_outputs():
        out = triton_quantized_attention(*args, tuning=tuning)
    torch.cuda.synchronize()
    ref = float64_attention(*args)
    err = relative_error(out, ref) if torch.isfinite(out).all() else float("inf")
    torch.cuda.empty_cache()
    return dict(d=d, k_bits=kb, v_bits=vb, G=g, B=b, N=n, W=w, L=l, extra=extra, rel_err=err, ok=err <= 1e-3)


def run_check(tuning: TritonTuning) -> list[dict[str, Any]]:
    rows = []
    for i, case in enumerate(CASES):
        rows.append(check_case(i, case, tuning))
        r = rows[-1]
        log(f"check d={r['d']:3d} K{r['k_bits']}/V{r['v_bits']} G={r['G']} B={r['B']:2d} N={r['N']:6d} W={r['W']:3d} "
            f"L={r['L']:2d} {r['extra']:14s} rel_err={r['rel_err']:.2e} {'OK' if r['ok'] else 'FAIL'}")  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = gpu_parser(__doc__)
    args = p.parse_args(argv)
    tuning = tuning_from(args.tuning)
    results: dict[str, Any] = {**device_info(), "tuning": dataclasses.asdict(tuning)}
    sections = Sections(results, "gpu_decode_check.json", args.out)
    rows = sections.run("check", lambda: run_check(tuning)) or []
    cols = ["d", "k_bits", "v_bits", "G", "B", "N", "W", "L", "extra", "rel_err", "ok"]
    print(table([[r[c] for c in cols] for r in rows], cols, floatfmt=".2e"))
    return 0 if rows and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
