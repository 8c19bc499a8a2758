#!/usr/bin/env python
"""TurboQuantCache across model families: top-1 agreement and logit error vs the full-precision cache.

Families (``_families.py``): a Qwen2-style random-weight model (head_dim 128, GQA, Qwen2.5-like large
key biases), the same with the large biases on high-frequency RoPE channels (a stress case that
centering cannot fix), a Gemma-3-style one (head_dim 256, one KV head, QK-norm, sliding-window
layers), and SmolLM2-135M (real weights, real tokenizer) as the reference. For each: prefill
``--prefix`` tokens (so ``prefix - sink - window`` ≈ 500 tokens are compressed), then decode
``--decode`` tokens teacher-forced, once with ``DynamicCache`` and once per cache setting; report the
share of steps whose argmax agrees, the relative logit error ``‖Δlogits‖/‖logits‖`` (logits centered
per step), the KL (nats) and per-layer attention-output relative errors. Random-weight families are
averaged over ``--seeds`` seeds (weights and text offset).

    python benchmarks/kv_families.py                  # ~4 min on 1 thread
    python benchmarks/kv_families.py --quick          # one seed, no SmolLM2

Writes ``benchmarks/results/kv_families.json``.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from _common import log, machine_info, parser, table, write_json
from _families import compare, gemma3_style, qwen2_style, teacher_forced, text_ids

SETTINGS: list[tuple[str, dict[str, Any]]] = [
    ("K4/V4", dict(key_bits=4, value_bits=4)),
    ("K3/V3", dict(key_bits=3, value_bits=3)),
    ("K4/V4 no smoothing", dict(key_bits=4, value_bits=4, key_outlier_ratio=0)),
    ("K4/V4 no centering/smoothing", dict(key_bits=4, value_bits=4, center_keys=False, key_outlier_ratio=0)),
]


def families(quick: bool) -> dict[str, Callable[[int], Any]]:
    fams: dict[str, Callable[[int], Any]] = {
        "qwen2-style (key biases, low-freq)": lambda s: qwen2_style(seed=s),
        "qwen2-style (no biases)": lambda s: qwen2_style(seed=s, bias_scale=0.0),
        "qwen2-style (key biases, high-freq)": lambda s: qwen2_style(seed=s, bias_band=(0, 32)),
        "gemma3-style": lambda s: gemma3_style(seed=s),
    }
    if quick:
        fams.pop("qwen2-style (no biases)")
        fams.pop("qwen2-style (key biases, high-freq)")
    return fams


def run_family(model: Any, ids: torch.Tensor, prefix: int, settings: list[tuple[str, dict[str, Any]]]) -> dict[str, dict]:
    from transformers import DynamicCache

    from turboquant.cache import TurboQuantCache, TurboQuantLayer

    impl = model.config._attn_implementation
    ref = teacher_forced(model, ids, prefix, DynamicCache(config=model.config))
    out = {}
    for name, kw in settings:
        cache = TurboQuantCache(model.config, **kw)
        got = teacher_forced(model, ids, prefix, cache)
        model.config._attn_implementation = impl  # DynamicCache runs must use the model's own attention
        row = compare(ref, got)
        row["compressed_tokens"] = max(layer.compressed_length for layer in cache.layers if isinstance(layer, TurboQuantLayer))
        row["compressed_layers"] = [i for i, layer in enumerate(cache.layers) if isinstance(layer, TurboQuantLayer)]
        out[name] = row
    return out


def mean_rows(rows: list[dict]) -> dict:
    keys = ("top1", "logit_rel_err", "kl")
    m = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
    m["attn_rel_err"] = [sum(r["attn_rel_err"][i] for r in rows) / len(rows) for i in range(len(rows[0]["attn_rel_err"]))]
    m["per_seed"] = [{k: r[k] for k in keys} for r in rows]
    m["compressed_tokens"] = rows[0]["compressed_tokens"]
    m["compressed_layers"] = rows[0]["compressed_layers"]
    return m


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--prefix", type=int, default=640)
    p.add_argument("--decode", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds = 1
    torch.set_num_threads(args.threads)
    n = args.prefix + args.decode
    results: dict[str, Any] = {"machine": machine_info(), "args": vars(args), "families": {}}
    t0 = time.time()
    for fam, build in families(args.quick).items():
        per_setting: dict[str, list[dict]] = {name: [] for name, _ in SETTINGS}
        for seed in range(args.seeds):
            model = build(seed)
            rows = run_family(model, text_ids(n, offset=seed * 5000), args.prefix, SETTINGS)
            for name in per_setting:
                per_setting[name].append(rows[name])
        results["families"][fam] = {name: mean_rows(rs) for name, rs in per_setting.items()}
        log(f"{fam}: {time.time() - t0:.0f}s")
    if not args.quick:
        from turboquant.demo.models import load_smollm2, pydoc_text

        model, tok = load_smollm2(dtype=torch.float32)
        ids = tok(pydoc_text()[:40000], return_tensors="pt").input_ids[:, :n]
        rows = run_family(model, ids, args.prefix, SETTINGS)
        results["families"]["SmolLM2-135M (real)"] = {name: mean_rows([r]) for name, r in rows.items()}
        log(f"SmolLM2: {time.time() - t0:.0f}s")
    body = []
    for fam, settings in results["families"].items():
        for name, r in settings.items():
            attn = [r["attn_rel_err"][i] for i in r["compressed_layers"]]
            body.append([fam, name, r["top1"], r["logit_rel_err"], r["kl"], max(attn), r["compressed_tokens"]])
    print(table(body, ["family", "cache", "top-1 agree", "logit rel err", "KL nats", "max attn rel err", "compressed tok"], floatfmt=".3f"))
    path = write_json("kv_families" + ("_quick" if args.quick else "") + ".json", results)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
