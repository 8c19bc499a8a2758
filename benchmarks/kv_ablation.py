#!/usr/bin/env python
"""Which TurboQuantCache settings matter for perplexity? The three ablation rounds behind KVCacheConfig's defaults (SmolLM2-135M, CPU).

Same measurement as kv_quality.py (teacher-forced pydoc continuations after a compressed prefix;
Δ% vs an fp32 cache with a per-window standard error), one setting changed at a time from the
base settings (``--base`` JSON overrides them):

* round 1 (K4/V2, K3/V3; run with ``--base '{"sink_tokens": 0, "norm_correction": ""}'``): key and
  value centering, sink tokens, window 32/256, full-precision first/last layers, 2 outlier key
  channels kept in fp16 (a simulation);
* round 2 (K4/V4, K4/V2, K3/V3): sink tokens 4/16 × key centering on/off;
* round 3 (K4/V4, K4/V2, K3/V3, K3/V2; run with ``--base '{"norm_correction": ""}'``): storing
  ``‖x‖/‖ŷ‖`` for none, keys, or keys and values.

    python benchmarks/kv_ablation.py --round 3 --base '{"norm_correction": ""}'
    python benchmarks/kv_ablation.py --round 2 --reuse results/kv_quality.json   # base rows from the grid
    python benchmarks/kv_ablation.py --round 1 --quick

Writes ``benchmarks/results/kv_ablation_round{N}.json`` and ``.png`` (the committed runs of all
three rounds are ``ablation_round{1,2,3}`` in ``results/kv_quality.json``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from _common import RESULTS, log, parser, pyplot, save_figure, write_json
from _kv import Spec, add_deltas, add_ppl_args, load_model, parse_base, parse_ppl_args, ppl_table, prepare_ppl, reusable_rows, run_ppl, tq_spec


def round_specs(round_: int, n_layers: int, base: dict[str, Any]) -> list[Spec]:
    def spec(kb: float, vb: float, label: str, **overrides: Any) -> Spec:
        return tq_spec(kb, vb, label=label, base=base, **overrides)

    if round_ == 3:  # norm correction: store ||x||/||y_hat|| so reconstructions keep their norm
        return [spec(kb, vb, f"norm_correction={which or repr('')}", norm_correction=which)
                for kb, vb in ((4, 4), (4, 2), (3, 3), (3, 2)) for which in ("", "k", "kv")]  # fmt: skip
    if round_ == 2:  # interactions of the round-1 winner (full-precision sink tokens) with key centering
        specs = []
        for kb, vb in ((4, 4), (4, 2), (3, 3)):
            specs.append(spec(kb, vb, "[base]"))
            specs += [spec(kb, vb, f"sink_tokens={sink} center_keys={ck}", sink_tokens=sink, center_keys=ck)
                      for sink in (4, 16) for ck in (True, False)]  # fmt: skip
        return specs
    specs = []
    for kb, vb in ((4, 2), (3, 3)):
        specs += [
            spec(kb, vb, "[base]"),
            spec(kb, vb, "center_keys=False", center_keys=False),
            spec(kb, vb, "center_values=True", center_values=True),
            spec(kb, vb, "sink_tokens=4", sink_tokens=4),
            spec(kb, vb, "sink_tokens=4 center_values=True", sink_tokens=4, center_values=True),
            spec(kb, vb, "window=32", window=32),
            spec(kb, vb, "window=256", window=256),
            spec(kb, vb, "fp_layers=(0,)", full_precision_layers=(0,)),
            spec(kb, vb, f"fp_layers=(0,{n_layers - 1})", full_precision_layers=(0, n_layers - 1)),
            tq_spec(kb, vb, label="outlier K ch=2 fp16", outlier=2, base=base),
        ]
    return specs


def plot_ablation(rows: list[dict], path: Path, title: str) -> None:
    plt = pyplot()
    if plt is None or not rows:
        return
    fig, ax = plt.subplots(figsize=(7, max(4, 0.22 * len(rows))))
    ax.barh(range(len(rows)), [r["delta_pct"] for r in rows], xerr=[r["delta_pct_se"] for r in rows])
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r["name"].replace("TQ ", "").replace(" mse", "") for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel="perplexity Δ% vs fp32", title=title)
    save_figure(fig, path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    add_ppl_args(p)
    p.add_argument("--round", dest="round_", type=int, default=1, choices=[1, 2, 3])
    p.add_argument("--reuse", type=Path, help="take rows measured in an earlier kv_quality.py run (fp32 and '[base]' "
                   "rows of the same name and settings; same windows required) instead of re-running them")  # fmt: skip
    p.add_argument("--out", type=Path, default=None, help="JSON path (default results/kv_ablation_round{N}.json)")
    args = parse_ppl_args(p, argv)
    out = args.out or RESULTS / f"kv_ablation_round{args.round_}{'_quick' if args.quick else ''}.json"
    base = parse_base(args.base)
    t_start = time.time()
    model, tok, results = load_model(args)
    results["base_settings"] = base_json = {**base, "full_precision_layers": list(base["full_precision_layers"])}
    windows, kv = prepare_ppl(model, tok, args, results)

    specs = round_specs(args.round_, model.config.num_hidden_layers, base)
    if args.quick:
        specs = specs[:2]
    # rows already measured (same windows, same settings) are reused, not re-run
    done = {r["name"]: r for r in (reusable_rows(args.reuse, args) if args.reuse else [])}
    done = {k: r for k, r in done.items() if r["kind"] != "tq" or r["settings"] == base_json}
    todo = [s for s in specs if s.name.replace(" [base]", "") not in done]
    if "fp32" not in done:
        todo = [Spec("fp32", "fp32")] + todo
    new = {r["name"]: r for r in run_ppl(model, todo, windows, args.prefix, kv, f"ablation round {args.round_}")}
    ref = done.get("fp32") or new["fp32"]
    rows = [dict(new[s.name]) if s.name in new else dict(done[s.name.replace(" [base]", "")], name=s.name) for s in specs]
    add_deltas(rows, ref)
    results["ablation"] = rows
    print(ppl_table(rows, f"ablation round {args.round_}"))
    results["total_wall_s"] = round(time.time() - t_start, 1)
    write_json(out.name, results, out.parent)
    plot_ablation(rows, out.with_suffix(".png"), f"ablation round {args.round_}")
    log(f"done in {time.time() - t_start:.0f}s -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
