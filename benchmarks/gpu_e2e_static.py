"""End to end on one GPU, Llama-3.1-8B shapes: compiled + CUDA-graphed decoding with TurboQuantStaticCache vs bf16 StaticCache, the longest context in a KV budget, and eager TurboQuantCache vs DynamicCache.

Random bf16 weights (32 layers, hidden 4096, 32 query / 8 KV heads, head_dim 128, intermediate
14336, vocab 128256). Three sections (``--sections``):

* ``compiled`` — batch ``--batch`` at ``--context`` tokens: both caches are filled by writing
  random bf16 keys/values (``cache.update`` in chunks, no model prefill), then ``--steps`` real
  one-token model forwards, compiled with ``torch.compile(model.forward, mode="reduce-overhead",
  fullgraph=True)`` (CUDA graphs) for both sides. ``--runs`` runs per side, interleaved
  (bf16, TurboQuant, bf16, ...), each from the same state (the caches are rewound). The bf16 side
  attends with SDPA on grouped queries (``[B, Hkv, G, d]`` against the KV heads, no ``repeat_kv``):
  transformers' own "sdpa" repeats K/V 4x under compilation, which would flatter TurboQuant
  (``--baseline-attn hf`` measures that one instead).
* ``budget`` — the longest context per sequence whose cache fits ``--budget-gib``, found by
  allocating it: fill in chunks (so no full-precision prompt exists whole), one real eager decode
  step, peak ``torch.cuda.max_memory_allocated`` minus what was allocated before the cache
  (weights); bisection to ``--budget-tol`` of the estimate. bf16 ``StaticCache`` vs
  ``TurboQuantStaticCache``; the ratio is the claim (target >= 3.8x).
* ``eager`` — the plain eager loop (``model(...)`` per token, host-bound like ``generate``):
  ``TurboQuantCache`` vs ``DynamicCache`` at the same batch/context, ``--eager-steps`` steps,
  interleaved runs, then ``--runs × --eager-steps`` paired steps (the sides take turns every step,
  order alternating; median ms per step each, ``paired_speedup``).

    PYTHONPATH=. python benchmarks/gpu_e2e_static.py --out $OUT                          # everything
    PYTHONPATH=. python benchmarks/gpu_e2e_static.py --sections compiled --out $OUT      # one part
    PYTHONPATH=. python benchmarks/gpu_e2e_static.py --tiny --device cpu                 # smoke test, < 1 min

Writes ``gpu_e2e_static.json`` into ``--out`` after every section.
"""

from __future__ import annotations

import functools
import gc
import statistics
import time
from typing import Any

import torch

from _common import log, machine_info, table
from _gpu import Sections, gpu_parser, random_llama

KV_HEADS, HEAD_DIM, LAYERS = 8, 128, 32
GROUPED = "sdpa_grouped"


def llama_8b(tiny: bool, device: str) -> Any:
    """Llama-3.1-8B shapes with random bf16 weights (``tiny``: 2 narrow layers, same head shapes)."""
    return random_llama(
        tiny, device, hidden_size=4096, intermediate_size=14336, num_hidden_layers=LAYERS, num_attention_heads=32,
        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, max_position_embeddings=1 << 20, tie_word_embeddings=False,
    )  # fmt: skip


def grouped_sdpa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
                 scaling: float | None = None, dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:  # fmt: skip
    """bf16 baseline attention: one decode query per head, grouped onto its KV head (no K/V copy)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, hq, l, d = query.shape
    if l != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    hkv = key.shape[1]
    q = query.reshape(b, hkv, hq // hkv, d)
    mask = attention_mask if attention_mask is None or attention_mask.shape[1] == 1 else attention_mask.reshape(b, hkv, hq // hkv, -1)
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, hq, 1, d).transpose(1, 2).contiguous(), None


def register_baseline() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GROUPED, grouped_sdpa)
    AttentionMaskInterface.register(GROUPED, sdpa_mask)


def set_attention(model: Any, name: str) -> None:
    model.config._attn_implementation = name
    text = model.config.get_text_config(decoder=True)
    if text is not model.config:
        text._attn_implementation = name


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def fill(cache: Any, layers: int, batch: int, context: int, chunk: int, device: str) -> None:
    """Write ``context`` random bf16 tokens into every layer, ``chunk`` tokens at a time (one random chunk reused)."""
    from turboquant.cache import _PENDING

    gen = torch.Generator(device=device).manual_seed(0)
    size = min(chunk, context)
    k = torch.randn(batch, KV_HEADS, size, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=gen)
    v = torch.randn(batch, KV_HEADS, size, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=gen)
    with torch.no_grad():
        for start in range(0, context, size):
            n = min(size, context - start)
            for i in range(layers):
                cache.update(k[:, :, :n], v[:, :, :n], i)
    _PENDING.layers.clear()  # fake prefill: no attention reads these
    sync(device)


REWIND = ("cumulative_length", "keys", "values", "slot_positions")


def snapshot(cache: Any) -> list[tuple[Any, dict[str, torch.Tensor]]]:
    """State a decode run changes besides positions past the context (masked until written again)."""
    from turboquant.static_cache import TurboQuantStaticLayer

    names = lambda layer: REWIND if isinstance(layer, TurboQuantStaticLayer) else REWIND[:1]
    return [(layer, {n: getattr(layer, n).clone() for n in names(layer)}) for layer in cache.layers]


def rewind(saved: list[tuple[Any, dict[str, torch.Tensor]]]) -> None:
    for layer, tensors in saved:
        for name, t in tensors.items():
            getattr(layer, name).copy_(t)


def decode_run(step: Any, batch: int, context: int, steps: int, device: str, vocab: int) -> float:
    """Seconds for ``steps`` greedy one-token forwards starting at position ``context``."""
    positions = [torch.full((batch, 1), context + i, device=device, dtype=torch.long) for i in range(steps)]
    ids = torch.randint(0, vocab, (batch, 1), device=device, generator=torch.Generator(device=device).manual_seed(1))
    sync(device)
    t0 = time.perf_counter()
    for pos in positions:
        ids = step(ids, pos)
    sync(device)
    return time.perf_counter() - t0


def compiled_step(model: Any, cache: Any, forward: Any, device: str) -> Any:
    def step(ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if device == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad():
            out = forward(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1:].argmax(-1)

    return step


def run_compiled(model: Any, args: Any) -> dict[str, Any]:
    from transformers import StaticCache

    from turboquant.static_cache import TurboQuantStaticCache

    layers, vocab, dev = model.config.num_hidden_layers, model.config.vocab_size, args.device
    cap = -(-(args.context + args.steps + args.warmup) // 64) * 64  # aligned rows for SDPA's masked kernels
    backend = args.compile_backend or ("inductor" if dev == "cuda" else "aot_eager")
    opts: dict[str, Any] = {"mode": args.compile_mode} if backend == "inductor" else {}
    forward = torch.compile(model.forward, backend=backend, fullgraph=True, dynamic=False, **opts)
    baseline = GROUPED if args.baseline_attn == "grouped" else "sdpa"
    sides: dict[str, dict[str, Any]] = {
        "bf16_static": {"cache": StaticCache(model.config, max_cache_len=cap), "attn": baseline},
        "turboquant_static_k4v4": {"cache": TurboQuantStaticCache(model.config, max_cache_len=cap, key_bits=4, value_bits=4),
                                   "attn": "turboquant"},
    }  # fmt: skip
    res: dict[str, Any] = {"batch": args.batch, "context": args.context, "steps": args.steps, "max_cache_len": cap,
                           "compile": {"backend": backend, **opts, "fullgraph": True}, "baseline_attention": baseline}  # fmt: skip
    try:
        return _compiled_runs(model, args, forward, sides, res)
    finally:  # also on failure: the next sections need the memory
        sides.clear()
        torch._dynamo.reset()  # drop the graphs (and the CUDA-graph pools holding the caches)
        if dev == "cuda":
            from torch._inductor import cudagraph_trees

            cudagraph_trees.reset_cudagraph_trees()  # the recorded trees keep their static inputs (the caches) alive
            gc.collect()
            torch.cuda.empty_cache()


def _compiled_runs(model: Any, args: Any, forward: Any, sides: dict[str, dict[str, Any]], res: dict[str, Any]) -> dict[str, Any]:
    layers, vocab, dev = model.config.num_hidden_layers, model.config.vocab_size, args.device
    for name, side in sides.items():
        t0 = time.perf_counter()
        set_attention(model, side["attn"])
        fill(side["cache"], layers, args.batch, args.context, args.fill_chunk, dev)
        side["saved"] = snapshot(side["cache"])
        side["step"] = compiled_step(model, side["cache"], forward, dev)
        t1 = time.perf_counter()
        decode_run(side["step"], args.batch, args.context, args.warmup, dev, vocab)  # compiles, records the graphs
        res[f"{name}_fill_s"], res[f"{name}_compile_s"] = t1 - t0, time.perf_counter() - t1
        log(f"compiled {name}: fill {t1 - t0:.1f} s, compile + warm-up {time.perf_counter() - t1:.1f} s")
        if dev == "cuda":
            res[f"{name}_cache_gib"] = sum(t.numel() * t.element_size() for t in _cache_tensors(side["cache"])) / 2**30
    for name in sides:
        res[name] = {"tokens_per_s": [], "ms_per_step": []}
    for r in range(args.runs):
        for name, side in sides.items():
            rewind(side["saved"])
            set_attention(model, side["attn"])
            dt = decode_run(side["step"], args.batch, args.context, args.steps, dev, vocab)
            res[name]["tokens_per_s"].append(args.batch * args.steps / dt)
            res[name]["ms_per_step"].append(dt / args.steps * 1e3)
            log(f"compiled run {r + 1} {name}: {args.batch * args.steps / dt:.1f} tokens/s ({dt / args.steps * 1e3:.2f} ms/step)")
    if args.profile_steps and dev == "cuda":  # where a step's GPU time goes (kernels inside the graphs included)
        from torch.profiler import ProfilerActivity, profile

        for name, side in sides.items():
            rewind(side["saved"])
            set_attention(model, side["attn"])
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                decode_run(side["step"], args.batch, args.context, args.profile_steps, dev, vocab)
            res[f"{name}_profile"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=20)
            log(f"profile {name} ({args.profile_steps} steps):\n{res[f'{name}_profile']}")
    a, b = (res[n]["tokens_per_s"] for n in sides)
    res["speedup_per_run"] = [y / x for x, y in zip(a, b)]
    res["speedup_median"] = statistics.median(res["speedup_per_run"])
    res["recompiles"] = dict(torch._dynamo.utils.counters["stats"])
    res["graph_breaks"] = sum(torch._dynamo.utils.counters["graph_break"].values())
    return res


def _cache_tensors(cache: Any) -> list[torch.Tensor]:
    out = []
    for layer in cache.layers:
        if hasattr(layer, "_buffers") and callable(layer._buffers):
            out += [t for t in layer._buffers() if t.dim() > 1]
        elif getattr(layer, "is_initialized", False):
            out += [layer.keys, layer.values]
    return out


def cache_peak(model: Any, kind: str, context: int, args: Any) -> int:
    """Peak bytes above the weights while filling a batch-``budget_batch`` cache to ``context`` tokens and decoding one token."""
    from transformers import StaticCache

    from turboquant.static_cache import TurboQuantStaticCache

    dev, batch = args.device, args.budget_batch
    if dev == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    if kind == "bf16_static":
        cache = StaticCache(model.config, max_cache_len=context + 1)
        set_attention(model, GROUPED)
    else:
        cache = TurboQuantStaticCache(model.config, max_cache_len=context + 1, key_bits=4, value_bits=4)
        set_attention(model, "turboquant")
    try:
        fill(cache, model.config.num_hidden_layers, batch, context, args.budget_chunk, dev)
        ids = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        with torch.no_grad():
            model(input_ids=ids, position_ids=torch.full((batch, 1), context, device=dev), past_key_values=cache, use_cache=True, logits_to_keep=1)
        sync(dev)
        if dev == "cuda":
            return torch.cuda.max_memory_allocated() - base
        return sum(t.numel() * t.element_size() for t in _cache_tensors(cache))  # CPU: the cache's own tensors
    finally:
        del cache


def run_budget(model: Any, args: Any) -> dict[str, Any]:
    from turboquant import KVCacheConfig
    from turboquant.codec import bytes_per_vector

    layers = model.config.num_hidden_layers
    budget = int(args.budget_gib * 2**30)
    kcfg, vcfg = KVCacheConfig(key_bits=4, value_bits=4).quantizer_configs(HEAD_DIM)
    per_token = {"bf16_static": layers * KV_HEADS * 2 * HEAD_DIM * 2 * args.budget_batch,
                 "turboquant_static_k4v4": layers * KV_HEADS * (bytes_per_vector(kcfg) + bytes_per_vector(vcfg)) * args.budget_batch}  # fmt: skip
    res: dict[str, Any] = {"budget_gib": args.budget_gib, "batch": args.budget_batch, "bytes_per_token": per_token}
    for kind, tok in per_token.items():
        estimate = budget // tok
        step = max(16, int(estimate * args.budget_tol))
        lo, hi = int(estimate * 0.85), int(estimate * 1.02)
        probes = []

        def fits(t: int, kind: str = kind, probes: list = probes) -> bool:
            peak = cache_peak(model, kind if kind == "bf16_static" else "turboquant", t, args)
            probes.append({"context": t, "peak_bytes": peak, "fits": peak <= budget})
            log(f"budget {kind}: context {t}: {peak / 2**30:.3f} GiB ({'fits' if peak <= budget else 'over'})")
            return peak <= budget

        while not fits(lo):  # the estimate ignores workspace: step down until something fits
            hi, lo = lo, int(lo * 0.85)
        while fits(hi):  # and up until something does not
            lo, hi = hi, int(hi * 1.15)
        while hi - lo > step:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        res[kind] = {"max_context": lo, "estimate": int(estimate), "probes": probes}
    res["ratio"] = res["turboquant_static_k4v4"]["max_context"] / max(1, res["bf16_static"]["max_context"])
    return res


def run_eager(model: Any, args: Any) -> dict[str, Any]:
    from transformers import DynamicCache

    from turboquant import TurboQuantCache

    layers, vocab, dev = model.config.num_hidden_layers, model.config.vocab_size, args.device
    sides = {"dynamic_bf16": (DynamicCache(config=model.config), "sdpa"),
             "turboquant_k4v4": (TurboQuantCache(model.config, key_bits=4, value_bits=4), "turboquant")}  # fmt: skip
    res: dict[str, Any] = {"batch": args.batch, "context": args.context, "steps": args.eager_steps}
    steps_done = {}
    for name, (cache, attn) in sides.items():
        set_attention(model, attn)
        fill(cache, layers, args.batch, args.context, args.context, dev)  # dynamic caches: one piece (no regrowth)
        step = _eager_step(model, cache)
        decode_run(step, args.batch, args.context, args.warmup, dev, vocab)  # the first TurboQuant step compresses
        steps_done[name] = args.warmup
        res[name] = {"tokens_per_s": [], "ms_per_step": []}
    for r in range(args.runs):
        for name, (cache, attn) in sides.items():
            set_attention(model, attn)
            dt = decode_run(_eager_step(model, cache), args.batch, args.context + steps_done[name], args.eager_steps, dev, vocab)
            steps_done[name] += args.eager_steps
            res[name]["tokens_per_s"].append(args.batch * args.eager_steps / dt)
            res[name]["ms_per_step"].append(dt / args.eager_steps * 1e3)
            log(f"eager run {r + 1} {name}: {args.batch * args.eager_steps / dt:.1f} tokens/s")
    a, b = res["dynamic_bf16"]["tokens_per_s"], res["turboquant_k4v4"]["tokens_per_s"]
    res["speedup_per_run"] = [y / x for x, y in zip(a, b)]
    res["speedup_median"] = statistics.median(res["speedup_per_run"])
    # paired steps: the sides take turns one step at a time (order alternating), so host drift hits both alike
    ids = {name: torch.zeros(args.batch, 1, dtype=torch.long, device=dev) for name in sides}
    paired: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for i in range(args.eager_steps * args.runs):
        for name in names if i % 2 == 0 else names[::-1]:
            cache, attn = sides[name]
            set_attention(model, attn)
            pos = torch.full((args.batch, 1), args.context + steps_done[name], device=dev, dtype=torch.long)
            sync(dev)
            t0 = time.perf_counter()
            ids[name] = _eager_step(model, cache)(ids[name], pos)
            sync(dev)
            paired[name].append((time.perf_counter() - t0) * 1e3)
            steps_done[name] += 1
    for name in names:
        res[name]["paired_ms_per_step_median"] = statistics.median(paired[name])
    res["paired_speedup"] = res["dynamic_bf16"]["paired_ms_per_step_median"] / res["turboquant_k4v4"]["paired_ms_per_step_median"]
    log(f"eager paired steps ({len(paired[names[0]])} each): {res['paired_speedup']:.2f}x")
    sides.clear()
    if dev == "cuda":
        torch.cuda.empty_cache()
    # host time: at a short context the GPU work is small, so a step's wall time is the Python/launch time
    res["host_context"] = args.host_context
    for name, make, attn in (("dynamic_bf16", lambda: DynamicCache(config=model.config), "sdpa"),
                             ("turboquant_k4v4", lambda: TurboQuantCache(model.config, key_bits=4, value_bits=4), "turboquant")):  # fmt: skip
        cache = make()
        set_attention(model, attn)
        fill(cache, layers, args.batch, args.host_context, args.host_context, dev)
        step = _eager_step(model, cache)
        decode_run(step, args.batch, args.host_context, args.warmup, dev, vocab)
        times = [decode_run(step, args.batch, args.host_context, args.eager_steps, dev, vocab) / args.eager_steps * 1e3 for _ in range(3)]
        res[name]["short_context_ms_per_step"] = statistics.median(times)
        log(f"eager {name} at {args.host_context} tokens: {statistics.median(times):.2f} ms/step (host-bound)")
        del cache
    return res


def _eager_step(model: Any, cache: Any) -> Any:
    def step(ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)

    return step


def main(argv: list[str] | None = None) -> int:
    p = gpu_parser(__doc__, tuning=False)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="2 narrow layers, short context: a smoke test of this script (CPU is fine)")
    p.add_argument("--sections", default="compiled,budget,eager")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=None, help="default 32768 (tiny: 384)")
    p.add_argument("--steps", type=int, default=None, help="timed compiled steps per run (default 128; tiny: 4)")
    p.add_argument("--eager-steps", type=int, default=None, help="timed eager steps per run (default 32; tiny: 3)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--host-context", type=int, default=1024, help="eager section: context of the host-time steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile-steps", type=int, default=3, help="compiled section: steps per side under torch.profiler on CUDA (0: off)")
    p.add_argument("--fill-chunk", type=int, default=4096)
    p.add_argument("--compile-backend", default=None, help="default inductor on CUDA, aot_eager on CPU (without inductor the cache writes may copy whole buffers)")
    p.add_argument("--compile-mode", default="reduce-overhead")
    p.add_argument("--baseline-attn", choices=("grouped", "hf"), default="grouped")
    p.add_argument("--budget-gib", type=float, default=None, help="KV budget (default 16; tiny: 0.002)")
    p.add_argument("--budget-batch", type=int, default=1)
    p.add_argument("--budget-chunk", type=int, default=4096, help="tokens per fill chunk (its temporaries count against the budget)")
    p.add_argument("--budget-tol", type=float, default=0.01, help="bisection stops at this fraction of the estimate")
    args = p.parse_args(argv)
    tiny_defaults = {"context": (32768, 384), "steps": (128, 4), "eager_steps": (32, 3), "budget_gib": (16.0, 0.002)}
    for k, (full, tiny) in tiny_defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, tiny if args.tiny else full)
    if args.tiny:
        args.fill_chunk, args.budget_chunk = min(args.fill_chunk, 128), min(args.budget_chunk, 512)

    register_baseline()
    results: dict[str, Any] = {"machine": machine_info(), "device": args.device, "args": vars(args) | {"out": str(args.out)},
                               "torch": torch.__version__, "threads": torch.get_num_threads()}  # fmt: skip
    if args.device == "cuda":
        results["gpu"] = torch.cuda.get_device_name(0)
        from turboquant.kernels import cuda_attention, cuda_encode

        t_build = time.perf_counter()  # the CUDA extensions first: their build (~1 min each) must not land in a timed section
        cuda_attention.load_extension()
        cuda_encode.load_extension()
        results["extensions_s"] = time.perf_counter() - t_build
        log(f"CUDA extensions built or loaded in {results['extensions_s']:.1f} s")
    t0 = time.perf_counter()
    model = llama_8b(args.tiny, args.device)
    results["model"] = "Llama-3.1-8B-shaped, random weights, bf16" + (" (tiny)" if args.tiny else "")
    results["weights_gib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    log(f"model built in {time.perf_counter() - t0:.1f} s ({results['weights_gib']:.2f} GiB)")
    sections = Sections(results, "gpu_e2e_static.json", args.out)
    parts = {"compiled": run_compiled, "budget": run_budget, "eager": run_eager}
    for name in args.sections.split(","):
        sections.run(name, functools.partial(parts[name], model, args))
        if args.device == "cuda":
            torch.cuda.empty_cache()
    rows = []
    for sec, base, tq in (("compiled", "bf16_static", "turboquant_static_k4v4"), ("eager", "dynamic_bf16", "turboquant_k4v4")):
        if sec in results:
            r = results[sec]
            rows.append([sec, *(", ".join(f"{x:.0f}" for x in r[k]["tokens_per_s"]) for k in (base, tq)),
                         ", ".join(f"{x:.2f}" for x in r["speedup_per_run"]), r["speedup_median"], r.get("paired_speedup", "")])  # fmt: skip
    if rows:
        print(table(rows, ["section", "bf16 tokens/s", "turboquant tokens/s", "speedup per run", "median", "paired steps"]))
    if "budget" in results:
        b = results["budget"]
        print(f"longest context in {b['budget_gib']} GiB (batch {b['batch']}): bf16 {b['bf16_static']['max_context']}, "
              f"TurboQuant K4/V4 {b['turboquant_static_k4v4']['max_context']} -> {b['ratio']:.2f}x")  # fmt: skip
    log(f"total {time.perf_counter() - t0:.0f} s")
    return 0 if all(f"{s}_error" not in results for s in parts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
