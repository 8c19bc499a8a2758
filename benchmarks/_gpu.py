"""What the GPU benchmark scripts share: device info, CUDA timing, kernel launch tuning, result files.

Imported by ``gpu_decode_check.py``, ``gpu_decode.py``, ``gpu_encode.py``, ``gpu_e2e.py`` and
``gpu_cache_check.py``. Triton is imported inside the functions that need it, so that each
script's ``--help`` works on a machine without CUDA or Triton.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from turboquant.kernels.tuning import DEFAULT_TUNING, TritonTuning

from _common import log, machine_info, out_folder, write_json
from _common import parser as parser_for  # the name "parser" is the local variable below


def gpu_parser(doc: str | None, tuning: bool = True) -> argparse.ArgumentParser:
    """The script's parser with ``--out`` (default ``$OUT`` or benchmarks/results) and, for kernel
    scripts, ``--tuning``."""
    parser = parser_for(doc)
    parser.add_argument("--out", type=Path, default=out_folder(), help="result folder (default: $OUT, else benchmarks/results)")
    if tuning:
        parser.add_argument(
            "--tuning", default="{}",
            help='JSON of TritonTuning fields to change from DEFAULT_TUNING, e.g. \'{"num_stages": 2, "maxnreg": 0}\'',
        )  # fmt: skip
    return parser


def tuning_from(overrides: str | dict[str, Any]) -> TritonTuning:
    """``DEFAULT_TUNING`` with the given fields replaced (a JSON string or a dict)."""
    fields = json.loads(overrides) if isinstance(overrides, str) else overrides
    return dataclasses.replace(DEFAULT_TUNING, **fields)


def random_llama(tiny: bool, device: str, **shape: Any) -> Any:
    """A Llama with random bf16 weights built on ``device``; ``shape``: LlamaConfig fields (layers, widths, heads).

    ``tiny``: 2 narrow layers (hidden 256, vocab 1,000) with the same head shapes and GQA group, a smoke test.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128256, rope_theta=500000.0, **shape)
    if tiny:
        group = cfg.num_attention_heads // cfg.num_key_value_heads
        cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size = 2, 256, 512, 1000
        cfg.num_attention_heads = group * cfg.num_key_value_heads
    cfg._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: no fp32 copy of the weights on the card
    try:
        with torch.device(device):
            return LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(previous)


def device_info() -> dict[str, Any]:
    """The card (name, SM count) and the library versions, next to :func:`_common.machine_info`."""
    import triton

    props = torch.cuda.get_device_properties(0)
    info = {"device": props.name, "sms": props.multi_processor_count, "triton": triton.__version__, "machine": machine_info()}
    log(f"device {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}")
    return info


def bench(fn: Callable[[], Any], rep_ms: int = 120) -> float:
    """Median milliseconds (Triton ``do_bench``: CUDA events, L2 flushed before every call)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def bench_graph(fn: Callable[[], Any]) -> float:
    """Median ms of CUDA-graph replays (no Python launch overhead; L2 not flushed, so only
    meaningful when the data exceeds L2)."""
    from triton.testing import do_bench_cudagraph

    return float(do_bench_cudagraph(fn, rep=100, return_mode="median"))


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write) of a 2 GiB bf16 tensor."""
    src = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = bench(functools.partial(dst.copy_, src))
    bw = 2 * src.numel() * src.element_size() / (ms * 1e-3)
    del src, dst
    torch.cuda.empty_cache()
    log(f"device-to-device copy: {bw / 1e9:.0f} GB/s (read + write)")
    return bw


def kernel_info(fn: Any) -> dict[str, Any]:
    """Registers / spills / shared memory of the most recently compiled variant of a Triton kernel."""
    try:
        kernels = []
        for cache in getattr(fn, "device_caches", {}).values():
            kernels += list((cache[0] if isinstance(cache, tuple) else cache).values())
        if not kernels:
            kernels = list(getattr(fn, "cache", {}).get(0, {}).values())
        k = kernels[-1]
        return {"regs": int(k.n_regs), "spills": int(k.n_spills), "smem": int(k.metadata.shared)}
    except Exception as exc:  # informative only
        return {"error": str(exc)[:100]}


def load_baseline(path: Path) -> ModuleType:
    """Import a previous kernel file (e.g. ``git show OLD:turboquant/kernels/triton_attention.py``)
    as a submodule of ``turboquant.kernels``, so that its relative imports resolve."""
    name = f"turboquant.kernels.{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    log(f"baseline kernel loaded from {path}")
    return module


class Sections:
    """Runs named parts of a benchmark in order; a part that raises is recorded, not fatal,
    and the JSON is rewritten after each part (a lease may end mid-run)."""

    def __init__(self, results: dict[str, Any], name: str, folder: Path) -> None:
        self.results, self.name, self.folder = results, name, folder
        self.t0 = time.time()

    def run(self, part: str, fn: Callable[[], Any]) -> Any:
        value = None
        try:
            value = fn()
            self.results[part] = value
        except Exception:
            self.results[f"{part}_error"] = traceback.format_exc()
            log(traceback.format_exc())
        log(f"[{part} done at {time.time() - self.t0:.0f} s]")
        self.save()
        return value

    def save(self) -> Path:
        return write_json(self.name, self.results, self.folder)
