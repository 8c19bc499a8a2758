"""End to end on one GPU: tokens/s of a Llama-3.2-3B-shaped model decoding at long context with TurboQuantCache vs DynamicCache, and the longest context in a fixed KV budget.

Random bf16 weights (28 layers, 24 query / 8 KV heads, head_dim 128); every layer's cache is
"prefilled" by writing random bf16 keys/values (``cache.update``), so only decoding is timed:
``--steps`` greedy steps at batch ``--batch`` after 3 warm-up steps (the first TurboQuant step
compresses the filled window). The context that fits a 16 GiB per-sequence KV budget is computed
from the bytes per token of each cache (``bytes_per_vector`` of the K4/V4 codes), next to the
measured ``cache.nbytes()``.

    python benchmarks/gpu_e2e.py --out $OUT                     # B=4, 32k context, 64 steps
    python benchmarks/gpu_e2e.py --tiny --device cpu --context 512 --steps 2   # smoke test

Writes ``gpu_e2e.json`` into ``--out`` (the committed H200 runs are ``e2e`` and ``e2e_run2`` in
``results/gpu_decode_h200.json``).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from turboquant import KVCacheConfig
from turboquant.codec import bytes_per_vector

from _common import log, machine_info, table
from _gpu import Sections, gpu_parser, random_llama

KV_HEADS, HEAD_DIM = 8, 128
BUDGET_GIB = 16
WINDOW_TOKENS = 128 + 32  # the cache's full-precision window + flush slack


def llama_3b(tiny: bool, device: str) -> Any:
    """Llama-3.2-3B shapes with random bf16 weights (``tiny``: 2 narrow layers, same head shapes)."""
    return random_llama(
        tiny, device, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, max_position_embeddings=131072, tie_word_embeddings=True,
    )  # fmt: skip


def decode_speed(model: Any, cache: Any, batch: int, context: int, steps: int, device: str) -> dict[str, float]:
    """Fill ``cache`` with ``context`` random tokens per layer, then time ``steps`` greedy decode steps."""
    gen = torch.Generator(device=device).manual_seed(0)
    for i in range(model.config.num_hidden_layers):
        k = torch.randn(batch, KV_HEADS, context, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=gen)
        v = torch.randn(batch, KV_HEADS, context, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=gen)
        cache.update(k, v, i)
        del k, v
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)

    def step(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        for _ in range(3):
            ids = step(ids)
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            ids = step(ids)
        sync()
        dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    return {"tokens_per_s": batch * steps / dt, "ms_per_step": dt / steps * 1e3, "peak_alloc_gib": peak}


def context_in_budget(layers: int, measured_bytes_per_token: float) -> dict[str, Any]:
    """Longest context per sequence in ``BUDGET_GIB`` for bf16 vs K4/V4 codes (+ a bf16 window)."""
    kcfg, vcfg = KVCacheConfig(key_bits=4, value_bits=4).quantizer_configs(HEAD_DIM)
    bf16_tok = layers * KV_HEADS * 2 * HEAD_DIM * 2
    tq_tok = layers * KV_HEADS * (bytes_per_vector(kcfg) + bytes_per_vector(vcfg))
    budget = BUDGET_GIB * 2**30
    ctx_bf16 = budget // bf16_tok
    ctx_tq = (budget - WINDOW_TOKENS * bf16_tok) // tq_tok + WINDOW_TOKENS
    return dict(budget_gib=BUDGET_GIB, bf16_bytes_per_token=bf16_tok, tq_bytes_per_token=tq_tok,
                measured_tq_bytes_per_token=measured_bytes_per_token, max_context_bf16=int(ctx_bf16),
                max_context_tq=int(ctx_tq), ratio=ctx_tq / ctx_bf16)  # fmt: skip


def run_e2e(batch: int, context: int, steps: int, device: str, tiny: bool) -> dict[str, Any]:
    from transformers import DynamicCache

    from turboquant import TurboQuantCache

    model = llama_3b(tiny, device)
    res: dict[str, Any] = {"model": "Llama-3.2-3B-shaped, random weights, bf16" + (" (tiny)" if tiny else ""),
                           "batch": batch, "context": context, "steps": steps}  # fmt: skip
    for name, make in (("dynamic_bf16", DynamicCache), ("turboquant_k4v4", lambda: TurboQuantCache(model.config, key_bits=4, value_bits=4))):
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        cache = make()
        res[name] = decode_speed(model, cache, batch, context, steps, device)
        log(f"e2e {name}: {res[name]['tokens_per_s']:.1f} tokens/s ({res[name]['ms_per_step']:.2f} ms/step)")
        if name == "turboquant_k4v4":
            nbytes = cache.nbytes()
            res["turboquant_cache_bytes"] = nbytes
            res["memory"] = context_in_budget(model.config.num_hidden_layers, nbytes["total"] / (cache.get_seq_length() * batch))
            log(f"e2e memory: {res['memory']}")
        model.config._attn_implementation = "sdpa"  # TurboQuantCache switched it; the next cache is a DynamicCache
        del cache
    res["speedup"] = res["turboquant_k4v4"]["tokens_per_s"] / res["dynamic_bf16"]["tokens_per_s"]
    return res


def main(argv: list[str] | None = None) -> int:
    p = gpu_parser(__doc__, tuning=False)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="2 narrow layers: a smoke test of this script (CPU is fine)")
    args = p.parse_args(argv)
    results: dict[str, Any] = {"machine": machine_info(), "device": args.device}
    sections = Sections(results, "gpu_e2e.json", args.out)
    res = sections.run("e2e", lambda: run_e2e(args.batch, args.context, args.steps, args.device, args.tiny))
    if res:
        cols = ["cache", "tokens_per_s", "ms_per_step", "peak_alloc_gib"]
        print(table([[k, *(res[k][c] for c in cols[1:])] for k in ("dynamic_bf16", "turboquant_k4v4")], cols))
        print(f"speedup {res['speedup']:.2f}x; context in {BUDGET_GIB} GiB: {res['memory']['ratio']:.2f}x")
    return 0 if res else 1


if __name__ == "__main__":
    raise SystemExit(main())
