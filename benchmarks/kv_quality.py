#!/usr/bin/env python
"""How much perplexity does each KV cache cost, per stored bit? SmolLM2-135M on CPU: TurboQuantCache vs full precision vs HF QuantizedCache.

``--windows`` non-overlapping windows of the standard library's ``pydoc_data.topics`` text; the
prefix (``--prefix`` tokens) is prefilled once with a full-precision ``DynamicCache`` and copied
into a fresh cache per configuration, then the continuation (``--cont`` tokens) is scored with
teacher forcing, so decoded tokens are themselves compressed as the window slides. Configurations:
fp32, fp16, TurboQuant K/V bits {4/4, 4/3, 4/2, 3/3, 3.5/2.5, 3/2, 2.5/2.5, 2/2} with MSE and
prod keys, HF quanto and HQQ at 4 and 2 bits. Bytes per token count every stored scalar.

The ``check`` phase verifies the method: chunked teacher forcing equals token-by-token decoding
(TurboQuant and HF), and a copied prefill equals prefilling through the cache.

    python benchmarks/kv_quality.py --quick          # smoke run, ~2 min
    python benchmarks/kv_quality.py                  # full grid (hours on 2 busy shared cores)
    python benchmarks/kv_quality.py --phases check

Writes ``benchmarks/results/kv_quality.json`` and ``kv_quality.png`` (``--quick``: ``kv_quality_quick.*``).
Ablations are ``kv_ablation.py``, the needle test ``kv_needle.py``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from _common import RESULTS, log, parser, pyplot, save_figure, write_json
from _kv import Spec, add_deltas, add_ppl_args, fill, hf_spec, load_model, parse_base, parse_ppl_args, ppl_table, prepare_ppl, reusable_rows, run_ppl, runnable, score, tq_spec

BIT_PAIRS = [(4, 4), (4, 3), (4, 2), (3, 3), (3.5, 2.5), (3, 2), (2.5, 2.5), (2, 2)]


def grid_specs(base: dict[str, Any]) -> list[Spec]:
    specs = [Spec("fp32", "fp32"), Spec("fp16 KV", "fp16")]
    specs += [tq_spec(kb, vb, variant, base=base) for kb, vb in BIT_PAIRS for variant in ("mse", "prod")]
    specs += [hf_spec(backend, nbits) for backend in ("quanto", "hqq") for nbits in (4, 2)]
    return specs


def run_check(model: Any, windows: torch.Tensor, prefix: int, kv: list, n_tq: int, n_hf: int, base: dict[str, Any]) -> dict:
    """Chunked teacher forcing == token-by-token; copied prefill == direct prefill."""
    w = windows[:1]
    kv1 = [(k[:1], v[:1]) for k, v in kv]
    out: dict[str, Any] = {}
    checks = [(tq_spec(4, 2, base=base, sink_tokens=4), n_tq)]
    if n_hf and runnable([hf_spec("quanto", 2)]):
        checks.append((hf_spec("quanto", 2), n_hf))
    for spec, n in checks:
        inputs, targets = w[:, prefix - 1 : prefix - 1 + n], w[:, prefix : prefix + n]
        t0 = time.time()
        nll = {}
        for how, chunk in (("token_by_token", 1), ("chunked", spec.chunk())):
            cache = spec.make(model)
            fill(cache, kv1)
            nll[how] = score(model, cache, inputs, targets, chunk)
        entry = {
            "tokens": n,
            "max_abs_nll_diff_chunked_vs_token_by_token": (nll["token_by_token"] - nll["chunked"]).abs().max().item(),
            "nll_token_by_token": nll["token_by_token"].mean().item(),
            "nll_chunked": nll["chunked"].mean().item(),
        }
        if spec.kind == "tq":
            cache = spec.make(model)
            with torch.no_grad():
                model(w[:, : prefix - 1], past_key_values=cache, use_cache=True)
            direct = score(model, cache, inputs, targets, spec.chunk())
            entry["max_abs_nll_diff_direct_vs_copied_prefill"] = (direct - nll["chunked"]).abs().max().item()
        entry["wall_s"] = round(time.time() - t0, 1)
        out[spec.name] = entry
        log(f"[check] {spec.name}: {entry}")
    return out


def plot_ppl(rows: list[dict], path: Path) -> None:
    """Perplexity change vs stored bits per coordinate, one marker per method."""
    plt = pyplot()
    if plt is None or not rows:
        return
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for kind, variant, marker, label in (("tq", "mse", "o", "TurboQuant (MSE keys)"), ("tq", "prod", "s", "TurboQuant (prod keys)"),
                                         ("hf", None, "^", "HF QuantizedCache")):  # fmt: skip
        sel = [r for r in rows if r["kind"] == kind and (variant is None or r.get("key_variant") == variant)]
        xs = [r["memory"]["bits_per_coordinate"] for r in sel]
        ys = [r["delta_pct"] for r in sel]
        if sel:
            ax.scatter(xs, ys, marker=marker, label=label)
        for r, x, y in zip(sel, xs, ys):
            short = r["name"].replace("TQ ", "").replace(" mse", "").replace(" prod", "").replace("HF ", "")
            ax.annotate(short, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0, color="k", lw=0.5)
    ax.set(yscale="symlog", xlabel="stored bits per coordinate (K+V avg, all scalars)", ylabel="perplexity Δ% vs fp32 cache",
           title="SmolLM2-135M, pydoc continuation perplexity")  # fmt: skip
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    add_ppl_args(p)
    p.add_argument("--phases", default="ppl,check", help="ppl, check or both")
    p.add_argument("--reuse-hf", type=Path, help="take the HF QuantizedCache rows from this earlier JSON "
                   "(they do not depend on TurboQuant settings; same windows required) instead of re-running them")  # fmt: skip
    p.add_argument("--out", type=Path, default=None, help="JSON path (default results/kv_quality.json, --quick: kv_quality_quick.json)")
    args = parse_ppl_args(p, argv)
    if args.quick and args.phases == "ppl,check":
        args.phases = "ppl"  # the token-by-token check alone takes minutes
    out = args.out or RESULTS / ("kv_quality_quick.json" if args.quick else "kv_quality.json")
    base = parse_base(args.base)
    phases = set(args.phases.split(","))
    t_start = time.time()
    model, tok, results = load_model(args)
    results["base_settings"] = {**base, "full_precision_layers": list(base["full_precision_layers"])}

    def save() -> None:
        results["total_wall_s"] = round(time.time() - t_start, 1)
        write_json(out.name, results, out.parent)
        plot_ppl(results.get("ppl", []), out.with_suffix(".png"))

    windows, kv = prepare_ppl(model, tok, args, results)
    if "ppl" in phases:
        specs = grid_specs(base)
        if args.quick:
            specs = [s for s in specs if s.name in ("fp32", "TQ K4/V2 mse", "HF quanto 4-bit")]
        reused = []
        if args.reuse_hf:
            reused = [r for r in reusable_rows(args.reuse_hf, args) if r["kind"] == "hf"]
            specs = [s for s in specs if s.kind != "hf"]
        rows = run_ppl(model, runnable(specs), windows, args.prefix, kv, "ppl") + reused
        add_deltas(rows, rows[0])
        results["ppl"] = rows
        print(ppl_table(rows, "perplexity (main grid)"))
        save()
    if "check" in phases:
        n_tq, n_hf = (34, 0) if args.quick else (67, 140)
        results["check"] = run_check(model, windows, args.prefix, kv, n_tq, n_hf, base)
        save()
    log(f"done in {time.time() - t_start:.0f}s -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
