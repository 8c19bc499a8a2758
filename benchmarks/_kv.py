"""What the KV-cache quality scripts share (kv_quality.py, kv_ablation.py, kv_needle.py).

The model (SmolLM2-135M on CPU), cache specifications (full precision, fp16, TurboQuant with
explicit settings, HF ``QuantizedCache``), their bytes per token, and teacher-forced perplexity
of pydoc continuations after a compressed prefix.

Teacher forcing in chunks is *exactly* token-by-token decoding here: a TurboQuant layer compresses
only when its window exceeds ``window + flush_every`` (checked before appending), so feeding
``flush_every + 1`` tokens per forward reproduces the token-by-token schedule; HF's
``QuantizedLayer`` re-quantizes when its residual reaches ``residual_length`` (128), which chunks
of 32 reproduce (``kv_quality.py --phases check`` verifies both).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from _common import log, machine_info, table  # noqa: E402

# Settings every TurboQuant spec starts from (explicit, so results don't move with library defaults).
# They equal KVCacheConfig's defaults, which were chosen from the ablations (kv_ablation.py): round 1
# ran with --base '{"sink_tokens": 0, "norm_correction": ""}', round 2 (sinks x key centering) picked
# sink_tokens=16, round 3 (--base '{"norm_correction": ""}') picked norm_correction="kv".
BASE: dict[str, Any] = dict(window=128, flush_every=32, sink_tokens=16, center_keys=True, center_values=False,
                            full_precision_layers=(), norm_correction="kv")  # fmt: skip
HF_RESIDUAL = 128


def fmt_bits(b: float) -> str:
    return f"{b:g}"


def parse_base(text: str) -> dict[str, Any]:
    """``BASE`` updated with the JSON of ``--base`` (a new dict; ``BASE`` is never changed)."""
    base = {**BASE, **(json.loads(text) if text else {})}
    base["full_precision_layers"] = tuple(base["full_precision_layers"])
    return base


# ----------------------------------------------------------------------------- cache specs


def _fp16_layer_cls() -> type:
    from transformers.cache_utils import DynamicLayer

    class Fp16KVLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            return super().update(key_states.half().to(key_states.dtype), value_states.half().to(value_states.dtype), *args, **kwargs)

    return Fp16KVLayer


class _OutlierKeyCodes:
    """Wraps a layer's key code buffer: the ``n`` largest key channels per head (mean |k − μ| over the
    first compressed block, i.e. the prompt) are kept aside in fp16 and the rest is coded with those
    channels zeroed. Benchmark-only simulation of "outlier channels at higher bits"."""

    def __init__(self, inner: Any, n: int) -> None:
        self.inner, self.n = inner, n
        self.idx: torch.Tensor | None = None  # [B, H, n]
        self.store: list[torch.Tensor] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def encode_append(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        if self.idx is None:
            self.idx = x.float().abs().mean(-2).topk(self.n, dim=-1).indices
        idx = self.idx.unsqueeze(-2).expand(*x.shape[:-1], self.n)
        self.store.append(x.gather(-1, idx).half())
        self.inner.encode_append(x.scatter(-1, idx, 0.0), *args, **kwargs)

    def restore(self, decoded: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
        """``decoded [B, H, N, d]`` (offset added) with the kept channels put back."""
        assert self.idx is not None
        vals = torch.cat(self.store, dim=-2)[:, :, : decoded.shape[-2]].to(decoded.dtype)
        if offset is not None:
            vals = vals + offset.gather(-1, self.idx).unsqueeze(-2).to(decoded.dtype)
        return decoded.scatter(-1, self.idx.unsqueeze(-2).expand(*vals.shape), vals)


def _outlier_layer_cls(n_outlier: int) -> type:
    from turboquant.cache import TurboQuantLayer

    class OutlierKeyLayer(TurboQuantLayer):
        # built without a layer index: attention gets the dequantized history through plain SDPA
        # (equal to the codes path up to fp error; simulation only)
        def lazy_initialization(self, key_states, value_states):
            super().lazy_initialization(key_states, value_states)
            self.key_codes = _OutlierKeyCodes(self.key_codes, n_outlier)

        def update(self, key_states, value_states, *args, **kwargs):
            keys, values = super().update(key_states, value_states, *args, **kwargs)
            return self.dequantized_history(keys, values)

        def dequantized_history(self, full_keys, full_values):
            keys, values = super().dequantized_history(full_keys, full_values)
            n, s = self.compressed_length, self.sink_keys.shape[-2]
            if n:
                restored = self.key_codes.restore(keys[:, :, s : s + n], self.key_offset)
                keys = torch.cat([keys[:, :, :s], restored, keys[:, :, s + n :]], dim=-2)
            return keys, values

    return OutlierKeyLayer


@dataclass
class Spec:
    """One cache configuration: ``kind`` fp32 | fp16 | tq (TurboQuant, ``base`` + ``overrides``) | hf."""

    name: str
    kind: str
    key_bits: float | None = None
    value_bits: float | None = None
    variant: str = "mse"
    overrides: dict = field(default_factory=dict)
    backend: str | None = None
    nbits: int | None = None
    outlier_channels: int = 0
    base: dict = field(default_factory=lambda: dict(BASE))

    def settings(self) -> dict[str, Any]:
        return {**self.base, **self.overrides}

    def chunk(self) -> int:
        """Tokens per forward that reproduce token-by-token decoding exactly."""
        if self.kind == "tq":
            return self.settings()["flush_every"] + 1
        if self.kind == "hf":
            return 32
        return 10**9

    def make(self, model: Any) -> Any:
        from transformers import DynamicCache
        from transformers.cache_utils import Cache, QuantizedCache

        if self.kind == "fp32":
            return DynamicCache(config=model.config)
        if self.kind == "fp16":
            cls = _fp16_layer_cls()
            return Cache(layers=[cls() for _ in range(model.config.num_hidden_layers)])
        if self.kind == "hf":
            return QuantizedCache(backend=self.backend, config=model.config, nbits=self.nbits, axis_key=0, axis_value=0,
                                  q_group_size=64, residual_length=HF_RESIDUAL)  # fmt: skip
        from turboquant import KVCacheConfig, TurboQuantCache
        from turboquant.cache import TurboQuantLayer

        cfg = KVCacheConfig(key_bits=self.key_bits, value_bits=self.value_bits, key_variant=self.variant, **self.settings())
        cache = TurboQuantCache(model.config, cfg)
        if self.outlier_channels:
            cls = _outlier_layer_cls(self.outlier_channels)
            for i, layer in enumerate(cache.layers):
                if isinstance(layer, TurboQuantLayer):
                    cache.layers[i] = cls(cfg, owner=cache)
        return cache

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "kind": self.kind}
        if self.kind == "tq":
            d.update(key_bits=self.key_bits, value_bits=self.value_bits, key_variant=self.variant, settings=self.settings())
            if self.outlier_channels:
                d["outlier_key_channels_fp16"] = self.outlier_channels
        if self.kind == "hf":
            d.update(backend=self.backend, nbits=self.nbits, q_group_size=64, axis=0, residual_length=HF_RESIDUAL)
        return d


def tq_spec(kb: float, vb: float, variant: str = "mse", label: str = "", outlier: int = 0,
            base: dict | None = None, **overrides: Any) -> Spec:  # fmt: skip
    name = f"TQ K{fmt_bits(kb)}/V{fmt_bits(vb)} {variant}" + (f" {label}" if label else "")
    return Spec(name, "tq", kb, vb, variant, overrides, outlier_channels=outlier, base=dict(base or BASE))


def hf_spec(backend: str, nbits: int) -> Spec:
    return Spec(f"HF {backend} {nbits}-bit", "hf", backend=backend, nbits=nbits)


def runnable(specs: list[Spec]) -> list[Spec]:
    """``specs`` without the HF caches whose quantization package is not installed (said in the log)."""
    import importlib.util

    packages = {"quanto": "optimum.quanto", "hqq": "hqq"}

    def installed(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # the parent package is missing
            return False

    missing = {s.name for s in specs if s.kind == "hf" and not installed(packages[s.backend or ""])}
    if missing:
        log(f"skipped (package not installed): {sorted(missing)}")
    return [s for s in specs if s.name not in missing]


# ----------------------------------------------------------------------------- memory accounting


def _tensor_bytes(obj: Any, only_fp32: bool = False) -> int:
    """Bytes of every tensor inside ``obj`` (recurses into tensor subclasses, tuples, dicts);
    ``only_fp32``: only float32 tensors (HF's scales/shifts, to re-count them at fp16)."""
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor:
            names, _ = obj.__tensor_flatten__()
            return sum(_tensor_bytes(getattr(obj, n), only_fp32) for n in names)
        if only_fp32 and obj.dtype != torch.float32:
            return 0
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_tensor_bytes(o, only_fp32) for o in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(o, only_fp32) for o in obj.values())
    return 0


def memory_stats(spec: Spec, cache: Any, model_config: Any, batch: int) -> dict[str, Any]:
    """Per-token bytes (all layers, K and V, all kv heads) of the compressed representation."""
    n_layers = model_config.num_hidden_layers
    heads = model_config.num_key_value_heads
    d = model_config.hidden_size // model_config.num_attention_heads
    fp16_tok = 2 * heads * d * 2  # per layer
    out: dict[str, Any] = {"fp16_bytes_per_token": fp16_tok * n_layers}
    if spec.kind == "fp32":
        bpt = 2 * fp16_tok * n_layers
    elif spec.kind == "fp16":
        bpt = fp16_tok * n_layers
    elif spec.kind == "tq":
        from turboquant.cache import TurboQuantLayer
        from turboquant.codec import bytes_per_vector

        kc, vc = cache.settings.quantizer_configs(d)
        tq_tok = heads * (bytes_per_vector(kc) + bytes_per_vector(vc)) + spec.outlier_channels * 2 * heads
        n_tq = sum(isinstance(layer, TurboQuantLayer) for layer in cache.layers)
        bpt = n_tq * tq_tok + (n_layers - n_tq) * fp16_tok  # full-precision layers counted at fp16
        rep = cache.memory_report()
        comp_tokens = sum(layer.compressed_length for layer in cache.layers if isinstance(layer, TurboQuantLayer))
        out["measured_compressed_bytes_per_token_per_tq_layer"] = rep["compressed_bytes"] / max(comp_tokens * batch, 1)
        out["measured_ratio_compressed_vs_fp16"] = rep["ratio_compressed"]
        out["compressed_tokens_layer0"] = getattr(cache.layers[0], "compressed_length", 0)
    else:  # HF QuantizedCache: count its stored tensors
        q_bytes = q_fp32 = q_tokens = 0
        for layer in cache.layers:
            stored = (layer._quantized_keys, layer._quantized_values)
            q_bytes += _tensor_bytes(stored)
            q_fp32 += _tensor_bytes(stored, only_fp32=True)
            resid = layer.keys.shape[-2] if layer.keys.dim() == 4 else 0
            q_tokens += layer.cumulative_length - resid
        bpt = q_bytes / max(q_tokens * batch, 1) * n_layers
        out["bytes_per_token_if_scales_fp16"] = (q_bytes - q_fp32 / 2) / max(q_tokens * batch, 1) * n_layers
        out["note"] = "quantized part as stored (scale/shift in the model dtype, fp32 here); residual (<=128 fp tokens) excluded"
    out["bytes_per_token"] = bpt
    out["bits_per_coordinate"] = bpt * 8 / (n_layers * 2 * heads * d)
    out["ratio_vs_fp16"] = fp16_tok * n_layers / bpt
    return out


# ----------------------------------------------------------------------------- model, prefill, scoring


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared, oversubscribed CPU, 2 OpenMP threads were 5-10x slower)")  # fmt: skip


def add_ppl_args(p: argparse.ArgumentParser) -> None:
    """Options of the perplexity windows and of the TurboQuant base settings."""
    add_model_args(p)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--prefix", type=int, default=1280)
    p.add_argument("--cont", type=int, default=256)
    p.add_argument("--base", default="", help='JSON overriding the TurboQuant base settings, e.g. \'{"sink_tokens": 4}\'')
    p.add_argument("--quick", action="store_true", help="smoke run: one short window and a few configurations")


def parse_ppl_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse; ``--quick`` shrinks the windows to one of 320 + 34 tokens."""
    args = p.parse_args(argv)
    if args.quick:
        args.windows, args.prefix, args.cont = 1, 320, 34
    return args


def load_model(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    """SmolLM2-135M (fp32) and its tokenizer, after setting threads and seed; and the result header."""
    from turboquant.demo.models import load_smollm2

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tok = load_smollm2(dtype=torch.float32)
    header = {
        "model": "SmolLM2-135M-Instruct (fp32 weights dequantized from Q4_1 GGUF)",
        "machine": {**machine_info(), "note": "2-core CPU shared with other jobs: wall times are noisy"},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    return model, tok, header


@torch.no_grad()
def prefill_kv(model: Any, ids: torch.Tensor, seed_kv: list | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Full-precision keys/values of ``ids`` (optionally continuing from ``seed_kv``)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    if seed_kv is not None:
        fill(cache, seed_kv)
    model.model(ids, past_key_values=cache, use_cache=True)
    return [(layer.keys, layer.values) for layer in cache.layers]


def fill(cache: Any, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)


@torch.no_grad()
def score(model: Any, cache: Any, inputs: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Per-token NLL ``[B, S]`` of ``targets`` when feeding ``inputs`` through ``cache``, ``chunk`` tokens per forward."""
    nll = []
    for s in range(0, inputs.shape[1], chunk):
        logits = model(inputs[:, s : s + chunk], past_key_values=cache, use_cache=True).logits.float()
        nll.append(-logits.log_softmax(-1).gather(-1, targets[:, s : s + chunk, None]).squeeze(-1))
    return torch.cat(nll, dim=1)


def ppl_windows(tok: Any, n_windows: int, prefix: int, cont: int) -> torch.Tensor:
    """``[n_windows, prefix + cont]`` token ids: non-overlapping windows of ``pydoc_data.topics``."""
    from turboquant.demo.models import pydoc_text

    ids = tok(pydoc_text(), return_tensors="pt").input_ids[0]
    span = prefix + cont
    stride = len(ids) // n_windows
    if stride < span:
        raise SystemExit(f"text too short for {n_windows} windows of {span} tokens")
    return torch.stack([ids[i * stride : i * stride + span] for i in range(n_windows)])


def prepare_ppl(model: Any, tok: Any, args: argparse.Namespace, results: dict[str, Any]) -> tuple[torch.Tensor, list]:
    """The windows and the full-precision KV of their prefixes (prefilled once, copied into each cache)."""
    windows = ppl_windows(tok, args.windows, args.prefix, args.cont)
    t0 = time.time()
    kv = prefill_kv(model, windows[:, : args.prefix - 1])
    results["ppl_prefill_s"] = round(time.time() - t0, 1)
    results["method"] = {
        "ppl": f"{args.windows} windows of pydoc_data.topics, prefix {args.prefix} (fp prefill copied into each cache), "
               f"{args.cont} teacher-forced continuation tokens scored; chunked feeding == token-by-token (kv_quality.py check)",
        "bytes_per_token": "summed over all layers, K+V, all kv heads; TurboQuant: codes + fp16 norms (+ QJL bits "
                           "and residual norms for prod); full-precision layers counted at fp16; HF: stored quantized tensors",
    }  # fmt: skip
    log(f"prefill {tuple(windows[:, : args.prefix - 1].shape)} in {results['ppl_prefill_s']}s")
    return windows, kv


def run_ppl(model: Any, specs: list[Spec], windows: torch.Tensor, prefix: int, kv: list, label: str) -> list[dict]:
    """One row per spec: mean NLL, perplexity, per-window NLL, wall time and bytes per token."""
    inputs, targets = windows[:, prefix - 1 : -1], windows[:, prefix:]
    rows = []
    for spec in specs:
        t0 = time.time()
        cache = spec.make(model)
        fill(cache, kv)
        nll = score(model, cache, inputs, targets, spec.chunk())
        wall = time.time() - t0
        row = spec.describe()
        row.update(nll=nll.mean().item(), ppl=math.exp(nll.mean().item()), window_nll=nll.mean(1).tolist(),
                   wall_s=round(wall, 1), memory=memory_stats(spec, cache, model.config, windows.shape[0]))  # fmt: skip
        rows.append(row)
        log(f"[{label}] {spec.name:42s} ppl {row['ppl']:.4f}  {row['memory']['bits_per_coordinate']:.2f} b/coord  {wall:.1f}s")
        del cache
    return rows


def add_deltas(rows: list[dict], ref: dict) -> None:
    """Perplexity change vs ``ref`` in %, with a standard error from the per-window NLL differences."""
    ref_w = torch.tensor(ref["window_nll"])
    for r in rows:
        diff = torch.tensor(r["window_nll"]) - ref_w
        r["delta_pct"] = (math.exp(r["nll"] - ref["nll"]) - 1) * 100
        r["delta_pct_se"] = (diff.std().item() / math.sqrt(len(diff)) * 100) if len(diff) > 1 else float("nan")


def reusable_rows(path: Path, args: argparse.Namespace) -> list[dict]:
    """The ``ppl`` rows of an earlier kv_quality.py JSON, refused unless it used the same windows."""
    old = json.loads(Path(path).read_text())
    keys = ("windows", "prefix", "cont")
    if {k: int(old["args"][k]) for k in keys} != {k: getattr(args, k) for k in keys}:
        raise SystemExit(f"{path}: the earlier run used other windows")
    return [dict(r, reused_from=str(path)) for r in old["ppl"]]


def ppl_table(rows: list[dict], title: str) -> str:
    body = [[r["name"], round(r["ppl"], 4), f"{r['delta_pct']:+.2f}±{r['delta_pct_se']:.2f}", round(r["memory"]["bytes_per_token"]),
             round(r["memory"]["bits_per_coordinate"], 2), round(r["memory"]["ratio_vs_fp16"], 2), r["wall_s"]] for r in rows]  # fmt: skip
    return f"\n=== {title} ===\n" + table(body, ["config", "ppl", "Δ% vs fp32", "bytes/tok", "bits/coord", "x vs fp16", "wall s"], floatfmt=".4f")
