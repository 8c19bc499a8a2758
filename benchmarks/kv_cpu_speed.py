#!/usr/bin/env python
"""CPU decode-step time of SmolLM2-135M (fp32) with ``TurboQuantCache`` vs ``DynamicCache``.

Claim under test (issue 10): with the compressed cache a decode step is no slower than with
the full-precision cache at short context (≤ 1.0× at 1k) and clearly faster at long context
(≤ 0.7× at 16k and 32k), at the default torch thread count; 1 thread is measured too.

Method, for each thread setting and each context length N (default 1k, 4k, 16k, 32k):

* **Filling the caches cheaply.** A real prompt (``pydoc_text()``, 1,024 tokens) is prefilled
  once, in chunks of 256 tokens under ``torch.inference_mode`` with a ``DynamicCache``; its
  per-layer keys/values ``[1, 3, 1024, 64]`` are then *tiled* along the sequence to N tokens and
  written into a fresh ``DynamicCache`` and a fresh ``TurboQuantCache`` (K4/V4 defaults) through
  ``cache.update`` (the TurboQuant cache compresses them on the next step, which is discarded as
  warm-up). A decode step's cost depends on the number of cached tokens, not on their values, and
  tiled real keys keep the score distribution realistic; a true 32k prefill would cost ~10 min of
  CPU attention on this machine. Positions continue from N, so the query's rotary angle is the
  one at position N.
* **Rotary range.** SmolLM2's ``max_position_embeddings`` is 8,192 with default (unscaled) RoPE;
  the rotary embedding computes any position, so 16k/32k run unchanged (no rope scaling): the
  timing is what matters here, not the model's quality beyond 8k.
* **Timing.** After 2 warm-up steps per cache, steps alternate DynamicCache / TurboQuantCache
  (same token fed to both) and the median of ``--steps`` steps of each is reported, with their
  ratio. The attention implementation is switched per step: ``"sdpa"`` for the DynamicCache
  (what a user gets by default) and ``"turboquant"`` for the compressed cache.

Usage::

    python benchmarks/kv_cpu_speed.py                    # results/kv_cpu_speed.json + .png
    python benchmarks/kv_cpu_speed.py --contexts 1024 4096 --steps 5 --threads 1
    python benchmarks/kv_cpu_speed.py --reference        # also time the torch reference attention
    python benchmarks/kv_cpu_speed.py --random-head-dim 128 --out benchmarks/results/kv_cpu_speed_hd128.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

PROMPT_TOKENS = 1024
PREFILL_CHUNK = 256


def load_model() -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct in float32 (the one place that knows where the loader lives)."""
    try:
        from turboquant.models import load_smollm2
    except ImportError:  # the loader may move to turboquant.demo
        from turboquant.demo.models import load_smollm2  # type: ignore[no-redef]
    return load_smollm2(dtype=torch.float32)


def random_llama(head_dim: int, tokenizer: Any) -> Any:
    """A held-out shape: 8-layer Llama with random fp32 weights, 8 query / 2 key-value heads of ``head_dim``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden = 8 * head_dim
    cfg = LlamaConfig(hidden_size=hidden, num_attention_heads=8, num_key_value_heads=2, head_dim=head_dim,
                      intermediate_size=11 * hidden // 4, num_hidden_layers=8, vocab_size=len(tokenizer),
                      max_position_embeddings=65536)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).float().eval()


def prompt_ids(tokenizer: Any, n: int) -> torch.Tensor:
    try:
        from turboquant.models import pydoc_text
    except ImportError:
        from turboquant.demo.models import pydoc_text  # type: ignore[no-redef]
    text = pydoc_text()
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :n]
    while ids.shape[1] < n:  # repeat the text if it is shorter than n tokens
        ids = torch.cat([ids, ids], dim=1)[:, :n]
    return ids


def machine_info() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import transformers

    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "default_torch_threads": torch.get_num_threads(),
    }


@torch.inference_mode()
def real_prefill(model: Any, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``(keys, values)`` ``[1, Hkv, T, d]`` of a chunked prefill of ``ids``."""
    from transformers import DynamicCache

    model.set_attn_implementation("sdpa")
    cache = DynamicCache(config=model.config)
    for start in range(0, ids.shape[1], PREFILL_CHUNK):
        model(input_ids=ids[:, start : start + PREFILL_CHUNK], past_key_values=cache, use_cache=True)
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


def tiled(kv: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for k, v in kv:
        reps = -(-n // k.shape[2])
        out.append((k.repeat(1, 1, reps, 1)[:, :, :n].contiguous(), v.repeat(1, 1, reps, 1)[:, :, :n].contiguous()))
    return out


def set_attention(model: Any, name: str) -> None:
    from turboquant.cache import enable_turboquant_attention

    if name == "turboquant":
        enable_turboquant_attention(model)
    else:
        model.set_attn_implementation(name)


@torch.inference_mode()
def step(model: Any, cache: Any, token: torch.Tensor, attention: str) -> tuple[float, torch.Tensor]:
    set_attention(model, attention)
    t0 = time.perf_counter()
    logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits
    return time.perf_counter() - t0, logits[0, -1]


def measure(model: Any, kv: list, n: int, steps: int, reference: bool) -> dict[str, Any]:
    from transformers import DynamicCache

    from turboquant.cache import TurboQuantCache
    from turboquant.kernels import cpu_attention

    data = tiled(kv, n)
    caches: dict[str, Any] = {"dynamic": DynamicCache(config=model.config)}
    caches["turboquant"] = TurboQuantCache(model.config)
    if reference:
        caches["turboquant_reference"] = TurboQuantCache(model.config)
    with torch.inference_mode():
        for cache in caches.values():
            for i, (k, v) in enumerate(data):
                cache.update(k, v, i)
    del data
    gc.collect()
    attention = {"dynamic": "sdpa", "turboquant": "turboquant", "turboquant_reference": "turboquant"}
    token = torch.tensor([[504]])
    times: dict[str, list[float]] = {name: [] for name in caches}
    agree = []
    for it in range(steps + 2):
        logits = {}
        for name, cache in caches.items():
            if name == "turboquant_reference":
                saved, cpu_attention._lib = cpu_attention._lib, None  # force the torch reference
                cpu_attention._lib_error = "benchmark: reference"
            try:
                dt, logits[name] = step(model, cache, token, attention[name])
            finally:
                if name == "turboquant_reference":
                    cpu_attention._lib, cpu_attention._lib_error = saved, None
            if it >= 2:  # the first steps compress the filled window and warm up
                times[name].append(dt)
        agree.append(int(logits["turboquant"].argmax() == logits["dynamic"].argmax()))
        token = logits["dynamic"].argmax().view(1, 1)
    res: dict[str, Any] = {"context": n, "steps": steps}
    for name, ts in times.items():
        res[f"{name}_ms"] = 1e3 * statistics.median(ts)
        res[f"{name}_all_ms"] = [round(1e3 * t, 2) for t in ts]
    res["ratio"] = res["turboquant_ms"] / res["dynamic_ms"]
    if reference:
        res["ratio_reference"] = res["turboquant_reference_ms"] / res["dynamic_ms"]
    res["top1_agreement"] = sum(agree) / len(agree)
    tq = caches["turboquant"]
    res["turboquant_cache_bytes"] = tq.nbytes()["total"]
    res["dynamic_cache_bytes"] = sum(2 * layer.keys.numel() * layer.keys.element_size() for layer in caches["dynamic"].layers)
    return res


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    styles = {"dynamic": ("DynamicCache (fp32)", "tab:gray"), "turboquant": ("TurboQuantCache K4/V4", "tab:blue"),
              "turboquant_reference": ("TurboQuant, torch reference attention", "tab:orange")}  # fmt: skip
    for run in results["runs"]:
        ls = "-" if run["threads"] == results["machine"]["default_torch_threads"] else "--"
        rows = run["rows"]
        for key, (label, color) in styles.items():
            if f"{key}_ms" not in rows[0]:
                continue
            ax.plot([r["context"] for r in rows], [r[f"{key}_ms"] for r in rows], ls, marker="o", color=color,
                    label=f"{label}, {run['threads']} thread(s)")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode step (ms, median)")
    ax.set_title(f"{results['model'].split(',')[0]}: decode step on CPU", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    ap.add_argument("--steps", type=int, default=7, help="timed steps per cache (after 2 warm-up steps)")
    ap.add_argument("--threads", type=int, nargs="+", default=None, help="torch thread counts (default: default and 1)")
    ap.add_argument("--reference", action="store_true", help="also time the torch reference attention")
    ap.add_argument("--random-head-dim", type=int, default=None,
                    help="a random-weight 8-layer Llama with this head_dim (8 q / 2 kv heads) instead of SmolLM2")
    ap.add_argument("--out", type=Path, default=RESULTS / "kv_cpu_speed.json")
    args = ap.parse_args(argv)

    info = machine_info()
    default_threads = info["default_torch_threads"]
    thread_counts = args.threads or sorted({default_threads, 1}, reverse=True)
    model, tokenizer = load_model()
    model_name = "SmolLM2-135M-Instruct fp32"
    if args.random_head_dim:
        model = random_llama(args.random_head_dim, tokenizer)
        model_name = f"random-weight Llama, 8 layers, 8 q / 2 kv heads, head_dim {args.random_head_dim}, fp32"
    model.eval()
    kv = real_prefill(model, prompt_ids(tokenizer, PROMPT_TOKENS))
    from turboquant.kernels import cpu_attention

    info["cpu_kernel"] = "compiled" if cpu_attention.load_library() is not None else f"reference ({cpu_attention.library_error()})"
    results: dict[str, Any] = {"machine": info, "model": model_name, "cache": "TurboQuantCache defaults (K4/V4)",
                               "fill": f"real {PROMPT_TOKENS}-token prefill tiled to the context", "runs": []}  # fmt: skip
    print(f"{'threads':>7} {'context':>7} {'dynamic ms':>11} {'turboquant ms':>14} {'ratio':>6}" + (f" {'ref ms':>9}" if args.reference else ""))
    for threads in thread_counts:
        torch.set_num_threads(threads)
        rows = []
        for n in args.contexts:
            r = measure(model, kv, n, args.steps, args.reference)
            rows.append(r)
            line = f"{threads:>7} {n:>7} {r['dynamic_ms']:>11.1f} {r['turboquant_ms']:>14.1f} {r['ratio']:>6.2f}"
            if args.reference:
                line += f" {r['turboquant_reference_ms']:>9.1f}"
            print(line, flush=True)
            gc.collect()
        results["runs"].append({"threads": threads, "rows": rows})
    torch.set_num_threads(default_threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, args.out)
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return results


if __name__ == "__main__":
    main()
