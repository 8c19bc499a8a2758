#!/usr/bin/env python
"""Peak extra memory of ONE decode step of one attention layer over a long compressed history.

Claim under test: attention straight from TurboQuant codes never allocates a dequantized copy
of the compressed history (its temporaries are bounded by ``chunk`` tokens), whereas HF's
``QuantizedCache`` dequantizes everything on every step.

For N compressed tokens (default 8k, 32k, 128k) and two layer shapes (SmolLM2-135M: 9 query /
3 kv heads, d=64; Llama-3-8B-like: 32 / 8, d=128) we build the cache layer once, then measure
the peak of bytes allocated *during* one decode step (``update`` of one token + attention),
relative to the allocations live before the step:

* ``tq_kernel``: ``turboquant.kernels.torch_quantized_attention`` on the layer's codes (chunk 2048);
* ``tq_layer``: ``TurboQuantLayer.update`` + the ``"turboquant"`` attention hook (what the model runs);
* ``tq_dequant_sdpa``: the same layer, but dequantize the history and run SDPA (what one would
  do without the kernel; shows what the kernel avoids);
* ``hf_quanto4``: transformers' ``QuantizedCache`` layer (quanto, 4-bit, group 64, residual 128):
  ``update`` (dequantizes the whole history) + SDPA with GQA;
* ``dynamic_fp32``: plain ``DynamicLayer`` (``update`` concatenates, i.e. copies the whole fp32 cache).

Peak bytes come from torch.profiler's allocation events (``profile_memory=True``: every
allocation/free of the CPU allocator with its size, replayed in order) or, on CUDA, from
``torch.cuda.max_memory_allocated``. Ratios are against the size of a dequantized fp32 (and fp16)
copy of the compressed K and V.

Usage::

    python benchmarks/kv_memory.py            # writes benchmarks/results/kv_memory.json
    python benchmarks/kv_memory.py --quick    # 8k only, SmolLM2 shape
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from _common import RESULTS, machine_info, parser, write_json

LAYER_0 = SimpleNamespace(layer_idx=0)  # stands for the attention module of layer 0 (all the hook reads)
SHAPES = {"smollm2-135m": (9, 3, 64), "llama3-8b-like": (32, 8, 128)}


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device) -> tuple[int, float]:
    """Peak bytes allocated while ``fn`` runs, above what was allocated before; and its wall time."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        out = fn()
        torch.cuda.synchronize()
        wall = time.time() - t0
        del out
        return torch.cuda.max_memory_allocated() - base, wall
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    t0 = time.time()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    wall = time.time() - t0  # includes profiler overhead
    del out
    events: list[tuple[int, int]] = []

    def walk(node: Any) -> None:
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    events.sort()
    cur = peak = 0
    for _, size in events:
        cur += size
        peak = max(peak, cur)
    return peak, wall


def build_tq_layer(n: int, hkv: int, d: int, key_bits: float, value_bits: float, variant: str, device: torch.device):
    from turboquant import KVCacheConfig
    from turboquant.cache import TurboQuantLayer

    settings = KVCacheConfig(key_bits=key_bits, value_bits=value_bits, key_variant=variant, window=128, flush_every=32)
    # no owner: always the codes path; layer index 0 hands it to the attention function (LAYER_0)
    layer = TurboQuantLayer(settings, layer_idx=0)
    g = torch.Generator(device="cpu").manual_seed(0)
    full = settings.window + settings.sink_tokens  # tokens that stay in full precision
    k = torch.randn(1, hkv, n + full, d, generator=g).to(device)
    v = torch.randn(1, hkv, n + full, d, generator=g).to(device)
    layer.update(k, v)
    del k, v
    layer.update(torch.randn(1, hkv, 1, d, device=device), torch.randn(1, hkv, 1, d, device=device))  # flushes N tokens
    assert layer.compressed_length == n, layer.compressed_length
    return layer


def measure(n: int, shape: str, device: torch.device, methods: set[str]) -> list[dict]:
    from transformers.cache_utils import DynamicLayer, QuantoQuantizedLayer

    from turboquant.cache import turboquant_attention
    from turboquant.kernels import torch_quantized_attention

    hq, hkv, d = SHAPES[shape]
    scaling = d**-0.5
    deq_fp32 = n * hkv * d * 4 * 2
    rows = []

    def record(method: str, peak: int, wall: float, extra: dict | None = None) -> None:
        row = {"shape": shape, "n_compressed": n, "method": method, "peak_extra_bytes": peak,
               "peak_extra_MiB": round(peak / 2**20, 3), "dequantized_fp32_KV_bytes": deq_fp32,
               "ratio_vs_dequantized_fp32": peak / deq_fp32, "ratio_vs_dequantized_fp16": peak / (deq_fp32 / 2),
               "wall_s": round(wall, 3)}
        row.update(extra or {})
        rows.append(row)
        print(f"{shape:15s} N={n:7d} {method:18s} peak {peak / 2**20:9.2f} MiB = {peak / deq_fp32:7.4f} x fp32 copy "
              f"({deq_fp32 / 2**20:8.1f} MiB)  {wall:6.2f}s", flush=True)

    q = torch.randn(1, hq, 1, d, device=device)
    new_k = torch.randn(1, hkv, 1, d, device=device)
    new_v = torch.randn(1, hkv, 1, d, device=device)
    for kb, vb, variant in ((4, 2, "mse"), (3, 3, "prod")):
        tag = f"K{kb}/V{vb} {variant}"
        layer = build_tq_layer(n, hkv, d, kb, vb, variant, device)
        nb = layer.nbytes()
        info = {"config": tag, "compressed_bytes": nb["compressed"], "full_precision_bytes": nb["full_precision"]}
        if "tq_kernel" in methods:
            ck, cv = layer.compressed_keys(), layer.compressed_values()
            full_k, full_v = layer.keys, layer.values
            peak, wall = peak_extra_bytes(lambda: torch_quantized_attention(
                q, ck, cv, full_k, full_v, scaling, key_offset=layer.key_offset, value_offset=layer.value_offset), device)
            record(f"tq_kernel {tag}", peak, wall, info)
        if "tq_layer" in methods:
            def step() -> torch.Tensor:
                k, v = layer.update(new_k, new_v)
                total = layer.get_seq_length()
                mask = torch.ones(1, 1, 1, total, dtype=torch.bool, device=device)
                return turboquant_attention(LAYER_0, q, k, v, mask, scaling)[0]  # type: ignore[arg-type]

            peak, wall = peak_extra_bytes(step, device)
            layer.crop(-1)
            record(f"tq_layer {tag}", peak, wall, info)
        if "tq_dequant_sdpa" in methods:
            def deq() -> torch.Tensor:
                k, v = layer.dequantized_history(layer.keys, layer.values)
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scaling, enable_gqa=True)

            peak, wall = peak_extra_bytes(deq, device)
            record(f"tq_dequant_sdpa {tag}", peak, wall, info)
        del layer
        gc.collect()
    if "hf_quanto4" in methods:
        hf = QuantoQuantizedLayer(nbits=4, axis_key=0, axis_value=0, q_group_size=64, residual_length=128)
        g = torch.Generator(device="cpu").manual_seed(0)
        hf.update(torch.randn(1, hkv, n, d, generator=g).to(device), torch.randn(1, hkv, n, d, generator=g).to(device))

        def hf_step() -> torch.Tensor:
            k, v = hf.update(new_k, new_v)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scaling, enable_gqa=True)

        peak, wall = peak_extra_bytes(hf_step, device)
        record("hf_quanto4", peak, wall)
        del hf
        gc.collect()
    if "dynamic_fp32" in methods:
        dyn = DynamicLayer()
        g = torch.Generator(device="cpu").manual_seed(0)
        dyn.update(torch.randn(1, hkv, n, d, generator=g).to(device), torch.randn(1, hkv, n, d, generator=g).to(device))

        def dyn_step() -> torch.Tensor:
            k, v = dyn.update(new_k, new_v)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scaling, enable_gqa=True)

        peak, wall = peak_extra_bytes(dyn_step, device)
        record("dynamic_fp32", peak, wall)
        del dyn
        gc.collect()
    return rows


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sizes", default="8192,32768,131072")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--methods", default="tq_kernel,tq_layer,tq_dequant_sdpa,hf_quanto4,dynamic_fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared, oversubscribed CPU, 2 OpenMP threads were 5-10x slower)")
    p.add_argument("--out", default=str(RESULTS / "kv_memory.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.shapes = "8192", "smollm2-135m"
        if args.out == str(RESULTS / "kv_memory.json"):
            args.out = str(RESULTS / "kv_memory_quick.json")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    methods = set(args.methods.split(","))
    rows = []
    t0 = time.time()
    for shape in args.shapes.split(","):
        for n in (int(x) for x in args.sizes.split(",")):
            rows += measure(n, shape, device, methods)
    out = {
        "what": "peak bytes allocated during one decode step (1 query token) of one attention layer, above the bytes "
                "live before the step; batch 1, window 128 full-precision tokens + N compressed",
        "measurement": "torch.cuda.max_memory_allocated" if device.type == "cuda" else
                       "torch.profiler(profile_memory=True) allocation events replayed in time order",
        "shapes": {k: {"q_heads": v[0], "kv_heads": v[1], "head_dim": v[2]} for k, v in SHAPES.items()},
        "machine": {**machine_info(), "device": str(device)},
        "rows": rows,
        "total_wall_s": round(time.time() - t0, 1),
    }
    print(f"-> {write_json(Path(args.out).name, out, Path(args.out).parent)}")


if __name__ == "__main__":
    main()
