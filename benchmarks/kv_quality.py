#!/usr/bin/env python
"""KV-cache quality benchmark on SmolLM2-135M (CPU): TurboQuantCache vs full precision vs HF QuantizedCache.

Measures, for every cache configuration:

* **perplexity** of continuations whose context is (mostly) the *compressed* cache: ``--windows``
  non-overlapping windows of the standard library's ``pydoc_data.topics`` text; the prefix
  (``--prefix`` tokens, default 1280) is prefilled once with a full-precision ``DynamicCache``
  and copied into a fresh cache per configuration (``cache.update(k, v, layer)``), then the
  continuation (``--cont`` tokens, default 256) is scored with teacher forcing, so decoded tokens
  are themselves compressed as the window slides;
* **needle in a haystack**: a random 5-digit pass key hidden at a random depth in filler text of
  1k/2k/4k/8k tokens, the question fed through the cache, greedy answer, exact-match rate;
* **KV bytes per token** with every stored scalar counted.

Teacher forcing in chunks is *exactly* token-by-token decoding here: a TurboQuant layer compresses
only when its window exceeds ``window + flush_every`` (checked before appending), so feeding
``flush_every + 1`` tokens per forward reproduces the token-by-token schedule (each scored token
attends to the same compressed tokens and the same full-precision ones); HF's ``QuantizedLayer``
re-quantizes when its residual reaches ``residual_length`` (128), which chunks of 32 reproduce. The
``check`` phase verifies both numerically (and that copying the prefill equals prefilling directly).

The needle phase also reports a *digit-restricted* greedy answer (a forced space, then the
argmax over the ten digit tokens, five times): it separates "the cache still lets the model find
the key" from "the model chose to answer with the digits", which a 135M model does only
60-90% of the time even in full precision.

Usage::

    python benchmarks/kv_quality.py --quick          # smoke run, < 2 min
    python benchmarks/kv_quality.py                  # full run (hours on 2 busy shared cores)
    python benchmarks/kv_quality.py --phases ppl,ablation

Writes ``benchmarks/results/kv_quality.json`` and ``kv_quality.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# Settings every TurboQuant spec starts from (explicit, so results don't move with library defaults).
# They equal KVCacheConfig's defaults, which were chosen from these ablations: round 1 ran with
# --base '{"sink_tokens": 0, "norm_correction": ""}', round 2 (sinks x key centering) picked sink_tokens=16,
# round 3 (--base '{"norm_correction": ""}') picked norm_correction="kv".
BASE = dict(window=128, flush_every=32, sink_tokens=16, center_keys=True, center_values=False, full_precision_layers=(),
            norm_correction="kv")
BIT_PAIRS = [(4, 4), (4, 3), (4, 2), (3, 3), (3.5, 2.5), (3, 2), (2.5, 2.5), (2, 2)]
HF_RESIDUAL = 128


# ----------------------------------------------------------------------------- helpers


def log(*args: Any) -> None:
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_start": os.getloadavg(),
        "note": "2-core CPU shared with other jobs: wall times are noisy",
    }


def _fmt_bits(b: float) -> str:
    return f"{b:g}"


# ----------------------------------------------------------------------------- cache specs


def _make_fp16_layer_cls():
    from transformers.cache_utils import DynamicLayer

    class Fp16KVLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            return super().update(key_states.half().to(key_states.dtype), value_states.half().to(value_states.dtype), *args, **kwargs)

    return Fp16KVLayer


class _OutlierKeyQuantizer:
    """Wraps a TurboQuantizer: the ``n`` largest key channels per head (mean |k - mu| over the first
    compressed block, i.e. the prompt) are stored separately in fp16; the rest is TurboQuant-coded
    with those channels zeroed. Benchmark-only simulation of "outlier channels at higher bits"."""

    def __init__(self, inner: Any, n: int) -> None:
        self.inner, self.n = inner, n
        self.idx: torch.Tensor | None = None
        self.store: list[torch.Tensor] = []

    def quantize(self, k: torch.Tensor) -> Any:
        if self.idx is None:
            self.idx = k.float().abs().mean(-2).topk(self.n, dim=-1).indices  # [B, H, n]
        idx = self.idx.unsqueeze(-2).expand(*k.shape[:-1], self.n)
        self.store.append(k.gather(-1, idx).half())
        return self.inner.quantize(k.scatter(-1, idx, 0.0))

    def dequantize(self, codes: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out = self.inner.dequantize(codes, dtype)
        vals = torch.cat(self.store, dim=-2)[:, :, : out.shape[-2]].to(out.dtype)
        idx = self.idx.unsqueeze(-2).expand(*vals.shape)
        return out.scatter(-1, idx, vals)


def _make_outlier_layer_cls():
    from turboquant.cache import TurboQuantLayer

    class OutlierKeyLayer(TurboQuantLayer):
        n_outlier = 2

        def lazy_initialization(self, key_states, value_states):
            super().lazy_initialization(key_states, value_states)
            self._key_quantizer = _OutlierKeyQuantizer(self._key_quantizer, self.n_outlier)

        def update(self, key_states, value_states, *args, **kwargs):
            keys, values = super().update(key_states, value_states, *args, **kwargs)
            # dequantized history -> plain SDPA (equal to the codes path up to fp error; simulation only)
            return self.dequantized_history(keys, values)

    return OutlierKeyLayer


@dataclass
class Spec:
    name: str
    kind: str  # fp32 | fp16 | tq | hf
    key_bits: float | None = None
    value_bits: float | None = None
    variant: str = "mse"
    overrides: dict = field(default_factory=dict)
    backend: str | None = None
    nbits: int | None = None
    outlier_channels: int = 0

    def settings(self) -> dict[str, Any]:
        s = dict(BASE)
        s.update(self.overrides)
        return s

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
            cls = _make_fp16_layer_cls()
            return Cache(layers=[cls() for _ in range(model.config.num_hidden_layers)])
        if self.kind == "hf":
            return QuantizedCache(backend=self.backend, config=model.config, nbits=self.nbits, axis_key=0, axis_value=0,
                                  q_group_size=64, residual_length=HF_RESIDUAL)
        from turboquant.cache import KVCacheConfig, TurboQuantCache, TurboQuantLayer

        cfg = KVCacheConfig(key_bits=self.key_bits, value_bits=self.value_bits, key_variant=self.variant, **self.settings())
        cache = TurboQuantCache(model.config, cfg)
        if self.outlier_channels:
            cls = _make_outlier_layer_cls()
            cls.n_outlier = self.outlier_channels
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


def tq_spec(kb: float, vb: float, variant: str = "mse", label: str = "", outlier: int = 0, **overrides: Any) -> Spec:
    name = f"TQ K{_fmt_bits(kb)}/V{_fmt_bits(vb)} {variant}" + (f" {label}" if label else "")
    return Spec(name, "tq", kb, vb, variant, overrides, outlier_channels=outlier)


def main_specs() -> list[Spec]:
    specs = [Spec("fp32", "fp32"), Spec("fp16 KV", "fp16")]
    for kb, vb in BIT_PAIRS:
        for variant in ("mse", "prod"):
            specs.append(tq_spec(kb, vb, variant))
    for backend in ("quanto", "hqq"):
        for nbits in (4, 2):
            specs.append(Spec(f"HF {backend} {nbits}-bit", "hf", backend=backend, nbits=nbits))
    return specs


def ablation_specs(n_layers: int, round_: int = 1) -> list[Spec]:
    if round_ == 3:  # norm correction: store ||x||/||y_hat|| so reconstructions keep their norm
        specs = []
        for kb, vb in ((4, 4), (4, 2), (3, 3), (3, 2)):
            specs.append(tq_spec(kb, vb, label="norm_correction=''", norm_correction=""))
            for which in ("k", "kv"):
                specs.append(tq_spec(kb, vb, label=f"norm_correction={which}", norm_correction=which))
        return specs
    if round_ == 2:  # interactions of the round-1 winner (full-precision sink tokens) with key centering
        specs = []
        for kb, vb in ((4, 4), (4, 2), (3, 3)):
            specs.append(tq_spec(kb, vb, label="[base]"))
            for sink in (4, 16):
                for ck in (True, False):
                    specs.append(tq_spec(kb, vb, label=f"sink_tokens={sink} center_keys={ck}", sink_tokens=sink, center_keys=ck))
        return specs
    specs = []
    for kb, vb in ((4, 2), (3, 3)):
        specs += [
            tq_spec(kb, vb, label="[base]"),
            tq_spec(kb, vb, label="center_keys=False", center_keys=False),
            tq_spec(kb, vb, label="center_values=True", center_values=True),
            tq_spec(kb, vb, label="sink_tokens=4", sink_tokens=4),
            tq_spec(kb, vb, label="sink_tokens=4 center_values=True", sink_tokens=4, center_values=True),
            tq_spec(kb, vb, label="window=32", window=32),
            tq_spec(kb, vb, label="window=256", window=256),
            tq_spec(kb, vb, label="fp_layers=(0,)", full_precision_layers=(0,)),
            tq_spec(kb, vb, label=f"fp_layers=(0,{n_layers - 1})", full_precision_layers=(0, n_layers - 1)),
            tq_spec(kb, vb, label="outlier K ch=2 fp16", outlier=2),
        ]
    return specs


# ----------------------------------------------------------------------------- memory accounting


def _tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor inside obj (recurses into tensor subclasses, tuples, dicts)."""
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor:
            names, _ = obj.__tensor_flatten__()
            return sum(_tensor_bytes(getattr(obj, n)) for n in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_tensor_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(o) for o in obj.values())
    return 0


def _scalar_bytes_fp32(obj: Any) -> int:
    """Bytes of float32 scale/shift tensors (to re-count them at fp16)."""
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor:
            names, _ = obj.__tensor_flatten__()
            return sum(_scalar_bytes_fp32(getattr(obj, n)) for n in names)
        return obj.numel() * 4 if obj.dtype == torch.float32 else 0
    if isinstance(obj, (tuple, list)):
        return sum(_scalar_bytes_fp32(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_scalar_bytes_fp32(o) for o in obj.values())
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
        from turboquant.quantizer import bytes_per_vector

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
            qk, qv = layer._quantized_keys, layer._quantized_values
            q_bytes += _tensor_bytes(qk) + _tensor_bytes(qv)
            q_fp32 += _scalar_bytes_fp32(qk) + _scalar_bytes_fp32(qv)
            resid = layer.keys.shape[-2] if layer.keys.dim() == 4 else 0
            q_tokens += layer.cumulative_length - resid
        per_layer_tok = q_bytes / max(q_tokens * batch, 1)
        bpt = per_layer_tok * n_layers
        out["bytes_per_token_if_scales_fp16"] = (q_bytes - q_fp32 / 2) / max(q_tokens * batch, 1) * n_layers
        out["note"] = "quantized part as stored (scale/shift in the model dtype, fp32 here); residual (<=128 fp tokens) excluded"
    out["bytes_per_token"] = bpt
    out["bits_per_coordinate"] = bpt * 8 / (n_layers * 2 * heads * d)
    out["ratio_vs_fp16"] = fp16_tok * n_layers / bpt
    return out


# ----------------------------------------------------------------------------- perplexity


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
    from turboquant.models import pydoc_text

    ids = tok(pydoc_text(), return_tensors="pt").input_ids[0]
    span = prefix + cont
    stride = len(ids) // n_windows
    if stride < span:
        raise SystemExit(f"text too short for {n_windows} windows of {span} tokens")
    return torch.stack([ids[i * stride : i * stride + span] for i in range(n_windows)])


def run_ppl(model: Any, specs: list[Spec], windows: torch.Tensor, prefix: int, kv: list, label: str) -> list[dict]:
    inputs, targets = windows[:, prefix - 1 : -1], windows[:, prefix:]
    rows = []
    for spec in specs:
        t0 = time.time()
        cache = spec.make(model)
        fill(cache, kv)
        nll = score(model, cache, inputs, targets, spec.chunk())
        wall = time.time() - t0
        row = spec.describe()
        row.update(
            nll=nll.mean().item(),
            ppl=math.exp(nll.mean().item()),
            window_nll=nll.mean(1).tolist(),
            wall_s=round(wall, 1),
            memory=memory_stats(spec, cache, model.config, windows.shape[0]),
        )
        rows.append(row)
        log(f"[{label}] {spec.name:42s} ppl {row['ppl']:.4f}  {row['memory']['bits_per_coordinate']:.2f} b/coord  {wall:.1f}s")
        del cache
    return rows


def add_deltas(rows: list[dict], ref: dict) -> None:
    ref_w = torch.tensor(ref["window_nll"])
    for r in rows:
        diff = torch.tensor(r["window_nll"]) - ref_w
        r["delta_pct"] = (math.exp(r["nll"] - ref["nll"]) - 1) * 100
        # standard error from the spread of per-window NLL differences (windows are independent)
        r["delta_pct_se"] = (diff.std().item() / math.sqrt(len(diff)) * 100) if len(diff) > 1 else float("nan")


# ----------------------------------------------------------------------------- equivalence check


def run_check(model: Any, windows: torch.Tensor, prefix: int, kv: list, n_tq: int, n_hf: int) -> dict:
    """Chunked teacher forcing == token-by-token; copied prefill == direct prefill."""
    w = windows[:1]
    kv1 = [(k[:1], v[:1]) for k, v in kv]
    out: dict[str, Any] = {}
    checks = [(tq_spec(4, 2, sink_tokens=4), n_tq)]
    if n_hf:
        checks.append((Spec("HF quanto 2-bit", "hf", backend="quanto", nbits=2), n_hf))
    for spec, n in checks:
        inputs, targets = w[:, prefix - 1 : prefix - 1 + n], w[:, prefix : prefix + n]
        t0 = time.time()
        c1 = spec.make(model)
        fill(c1, kv1)
        step = score(model, c1, inputs, targets, 1)
        c2 = spec.make(model)
        fill(c2, kv1)
        chunked = score(model, c2, inputs, targets, spec.chunk())
        entry = {
            "tokens": n,
            "max_abs_nll_diff_chunked_vs_token_by_token": (step - chunked).abs().max().item(),
            "nll_token_by_token": step.mean().item(),
            "nll_chunked": chunked.mean().item(),
        }
        if spec.kind == "tq":
            c3 = spec.make(model)
            with torch.no_grad():
                model(w[:, : prefix - 1], past_key_values=c3, use_cache=True)
            direct = score(model, c3, inputs, targets, spec.chunk())
            entry["max_abs_nll_diff_direct_vs_copied_prefill"] = (direct - chunked).abs().max().item()
        entry["wall_s"] = round(time.time() - t0, 1)
        out[spec.name] = entry
        log(f"[check] {spec.name}: {entry}")
    return out


# ----------------------------------------------------------------------------- needle in a haystack

HEADER = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
          "I will quiz you about the important information there.\n\n")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
FORMATS = {
    "plain": ("", "\n\nWhat is the pass key? The pass key is"),
    # the trailing space leaves only the digits to say: retrieval without the model's choice of
    # answer style (a 135M model often says "a special key that ..." after "is")
    "plain_space": ("", "\n\nWhat is the pass key? The pass key is "),
    "chat": ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n",
             "\n\nWhat is the pass key?<|im_end|>\n<|im_start|>assistant\nThe pass key is"),
}
GEN_TOKENS = 7  # " " + 5 digits + "."


class Haystack:
    def __init__(self, tok: Any, fmt: str, max_len: int) -> None:
        pre, question = FORMATS[fmt]
        self.tok = tok
        self.head = tok(pre + HEADER).input_ids
        self.question = tok(question).input_ids
        self.needle_len = len(tok(NEEDLE.format(key=12345)).input_ids)
        unit = tok(FILLER).input_ids
        n_fill = self.filler_len(max_len)
        self.filler = (unit * (n_fill // len(unit) + 1))[:n_fill]
        dot = tok(".").input_ids[-1]
        self.boundaries = [0] + [i for i in range(1, n_fill) if self.filler[i - 1] == dot]
        self.shared_kv: list | None = None

    def filler_len(self, length: int) -> int:
        return length - GEN_TOKENS - len(self.head) - self.needle_len - len(self.question)

    def trial(self, length: int, rng: random.Random) -> dict:
        n_fill = self.filler_len(length)
        key = rng.randint(10000, 99999)
        target = int(rng.random() * n_fill)
        depth = max(b for b in self.boundaries if b <= target)
        return {"key": key, "depth_tokens": depth, "depth_frac": depth / n_fill, "n_fill": n_fill}

    def prefill(self, model: Any, trial: dict) -> list:
        """Full-precision KV of header + filler[:d] + needle + filler[d:n_fill] (shared prefix reused)."""
        h, d = len(self.head), trial["depth_tokens"]
        seed = [(k[:, :, : h + d], v[:, :, : h + d]) for k, v in self.shared_kv]  # type: ignore[union-attr]
        needle = self.tok(NEEDLE.format(key=trial["key"])).input_ids
        assert len(needle) == self.needle_len
        rest = torch.tensor([needle + self.filler[d : trial["n_fill"]]])
        return prefill_kv(model, rest, seed)

    def build_shared(self, model: Any, n_fill: int) -> None:
        self.shared_kv = prefill_kv(model, torch.tensor([self.head + self.filler[:n_fill]]))


@torch.no_grad()
def answer(model: Any, cache: Any, question: torch.Tensor) -> torch.Tensor:
    logits = model(question, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    out = [nxt]
    for _ in range(GEN_TOKENS - 1):
        nxt = model(nxt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
    return torch.cat(out, dim=1)


@torch.no_grad()
def answer_digits(model: Any, cache: Any, question: torch.Tensor, space_id: int, digit_ids: torch.Tensor) -> torch.Tensor:
    """Greedy answer restricted to digit tokens (after a forced space): retrieval without the format choice.

    A 135M model often answers "a special key that is ..." instead of the digits even in full
    precision; restricting the vocabulary isolates whether the cache still lets it find the key.
    """
    inputs = question
    if question[0, -1].item() != space_id:
        inputs = torch.cat([question, torch.full((question.shape[0], 1), space_id)], dim=1)
    out = []
    for _ in range(5):
        logits = model(inputs, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        inputs = digit_ids[logits[:, digit_ids].argmax(-1)].unsqueeze(-1)
        out.append(inputs)
    return torch.cat(out, dim=1)


@torch.no_grad()
def key_logprob(model: Any, cache: Any, question: torch.Tensor, key_ids: torch.Tensor) -> torch.Tensor:
    """Teacher-forced log-probability (nats) of the pass-key tokens after the question, per trial."""
    inputs = torch.cat([question, key_ids[:, :-1]], dim=1)
    logits = model(inputs, past_key_values=cache, use_cache=True, logits_to_keep=key_ids.shape[1]).logits.float()
    return logits.log_softmax(-1).gather(-1, key_ids.unsqueeze(-1)).squeeze(-1).sum(-1)


def run_needle(model: Any, tok: Any, specs: list[Spec], fmt: str, lengths: list[int], trials: int, seed: int,
               max_group_bytes: float = 2e9, label: str = "needle", logprob: bool = True) -> dict:
    hay = Haystack(tok, fmt, max(lengths))
    t0 = time.time()
    hay.build_shared(model, max(hay.filler_len(n) for n in lengths))
    shared_s = time.time() - t0
    log(f"[{label}] shared filler prefix ({len(hay.head) + hay.filler_len(max(lengths))} tokens) in {shared_s:.0f}s")
    cfg = model.config
    per_tok = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    res: dict[str, Any] = {"format": fmt, "trials": trials, "lengths": lengths, "shared_prefill_s": round(shared_s, 1),
                           "prefill_s": {}, "rates": {s.name: {} for s in specs}, "wall_s": {s.name: 0.0 for s in specs},
                           "answers": {s.name: {} for s in specs}, "trial_info": {},
                           "key_logprob": {s.name: {} for s in specs},
                           "digits_rates": {s.name: {} for s in specs}}
    space_id = tok(" 12345").input_ids[0]
    digit_ids = torch.tensor([tok(str(d)).input_ids[-1] for d in range(10)])
    for length in lengths:
        rng = random.Random(seed * 1000 + length)
        info = [hay.trial(length, rng) for _ in range(trials)]
        res["trial_info"][length] = [{k: v for k, v in t.items() if k != "n_fill"} for t in info]
        group = max(1, min(trials, int(max_group_bytes // (per_tok * length))))
        hits = {s.name: 0 for s in specs}
        digit_hits = {s.name: 0 for s in specs}
        res["prefill_s"][length] = 0.0
        for g0 in range(0, trials, group):
            part = info[g0 : g0 + group]
            t0 = time.time()
            kvs = [hay.prefill(model, t) for t in part]
            res["prefill_s"][length] += time.time() - t0
            kv = [(torch.cat([x[i][0] for x in kvs]), torch.cat([x[i][1] for x in kvs])) for i in range(len(kvs[0]))]
            del kvs
            q = torch.tensor([hay.question] * len(part))
            for spec in specs:
                t0 = time.time()
                cache = spec.make(model)
                fill(cache, kv)
                gen = answer(model, cache, q)
                del cache
                if logprob:  # a graded score: far less noisy than exact match on 20 trials
                    cache = spec.make(model)
                    fill(cache, kv)
                    keys = torch.tensor([tok(f" {t['key']}").input_ids for t in part])
                    lp = key_logprob(model, cache, q, keys)
                    res["key_logprob"][spec.name].setdefault(length, []).extend(lp.tolist())
                    del cache
                if fmt != "plain_space":  # there the prompt already leaves only the digits to say
                    cache = spec.make(model)
                    fill(cache, kv)
                    digits = answer_digits(model, cache, q, space_id, digit_ids)
                    del cache
                    for t, row in zip(part, digits):
                        digit_hits[spec.name] += tok.decode(row.tolist()) == str(t["key"])
                res["wall_s"][spec.name] += time.time() - t0
                for t, row in zip(part, gen):
                    text = tok.decode(row.tolist())
                    ok = str(t["key"]) in text
                    hits[spec.name] += ok
                    res["answers"][spec.name].setdefault(length, []).append(text)
            del kv
            if fmt == "plain_space":
                log(f"[{label}] L={length} trials {g0 + len(part)}/{trials}: " + ", ".join(f"{k}={v}" for k, v in hits.items()))
            else:
                log(f"[{label}] L={length} trials {g0 + len(part)}/{trials} free/digits: "
                    + ", ".join(f"{k}={v}/{digit_hits[k]}" for k, v in hits.items()))
        for spec in specs:
            res["rates"][spec.name][length] = hits[spec.name] / trials
            if fmt != "plain_space":
                res["digits_rates"][spec.name][length] = digit_hits[spec.name] / trials
            if logprob:
                lps = res["key_logprob"][spec.name][length]
                res.setdefault("mean_key_logprob", {}).setdefault(spec.name, {})[length] = sum(lps) / len(lps)
        res["prefill_s"][length] = round(res["prefill_s"][length], 1)
    res["wall_s"] = {k: round(v, 1) for k, v in res["wall_s"].items()}
    return res


def needle_specs() -> list[Spec]:
    # 4, 3, 2.5 and 2 bits averaged over K and V (the issue asks for parity down to 3 bits), and HF's peers.
    return [
        Spec("fp32", "fp32"),
        tq_spec(4, 4), tq_spec(3, 3), tq_spec(3, 2), tq_spec(2, 2),
        Spec("HF quanto 4-bit", "hf", backend="quanto", nbits=4), Spec("HF quanto 2-bit", "hf", backend="quanto", nbits=2),
    ]


# ----------------------------------------------------------------------------- output


def print_table(rows: list[dict], title: str) -> None:
    print(f"\n=== {title} ===")
    print(f"{'config':44s} {'ppl':>8s} {'Δ% vs fp32':>12s} {'bytes/tok':>10s} {'bits/coord':>10s} {'x vs fp16':>9s} {'wall s':>7s}")
    for r in rows:
        m = r["memory"]
        delta = f"{r['delta_pct']:+.2f}±{r['delta_pct_se']:.2f}"
        print(f"{r['name']:44s} {r['ppl']:8.4f} {delta:>12s} {m['bytes_per_token']:10.0f} {m['bits_per_coordinate']:10.2f} "
              f"{m['ratio_vs_fp16']:9.2f} {r['wall_s']:7.1f}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ablation = [r for k in sorted(results) if k.startswith("ablation") and isinstance(results[k], list) for r in results[k]]
    panels = 1 + ("needle" in results) + bool(ablation)
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, max(5, 0.16 * len(ablation))))
    axes = [axes] if panels == 1 else list(axes)
    ax = axes[0]
    rows = results.get("ppl", [])
    for kind, variant, marker, label in (("tq", "mse", "o", "TurboQuant (MSE keys)"), ("tq", "prod", "s", "TurboQuant (prod keys)"),
                                         ("hf", None, "^", "HF QuantizedCache")):
        sel = [r for r in rows if r["kind"] == kind and (variant is None or r.get("key_variant") == variant)]
        if not sel:
            continue
        xs = [r["memory"]["bits_per_coordinate"] for r in sel]
        ys = [r["delta_pct"] for r in sel]
        ax.scatter(xs, ys, marker=marker, label=label)
        for r, x, y in zip(sel, xs, ys):
            short = r["name"].replace("TQ ", "").replace(" mse", "").replace(" prod", "").replace("HF ", "")
            ax.annotate(short, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlabel("stored bits per coordinate (K+V avg, all scalars)")
    ax.set_ylabel("perplexity Δ% vs fp32 cache")
    ax.set_title("SmolLM2-135M, pydoc continuation perplexity")
    ax.legend(fontsize=8)
    i = 1
    if "needle" in results:
        ax = axes[i]
        i += 1
        nd = results["needle"]
        for name, rates in nd["rates"].items():
            ls = sorted(int(k) for k in rates)
            ax.plot(ls, [rates[k] if k in rates else rates[str(k)] for k in ls], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens")
        ax.set_ylabel("pass-key exact match")
        ax.set_title(f"needle in a haystack ({nd['trials']} trials/length, {nd['format']})")
        ax.legend(fontsize=7)
    if ablation:
        ax = axes[i]
        ab = ablation
        names = [r["name"].replace("TQ ", "").replace(" mse", "") for r in ab]
        ax.barh(range(len(ab)), [r["delta_pct"] for r in ab], xerr=[r["delta_pct_se"] for r in ab])
        ax.set_yticks(range(len(ab)))
        ax.set_yticklabels(names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("perplexity Δ% vs fp32")
        ax.set_title("ablations")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run (< 2 min)")
    p.add_argument("--phases", default="ppl,ablation,check,needle")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--prefix", type=int, default=1280)
    p.add_argument("--cont", type=int, default=256)
    p.add_argument("--needle-trials", type=int, default=20)
    p.add_argument("--needle-lengths", default="1024,2048,4096,8192")
    p.add_argument("--needle-format", default="plain_space", choices=["auto", "plain", "plain_space", "chat"])
    p.add_argument("--pilot-trials", type=int, default=10, help="fp trials at the shortest length per format (auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-logprob", action="store_true", help="needle: skip the teacher-forced pass-key log-probability pass")
    p.add_argument("--base", default="", help='JSON overriding the TurboQuant base settings, e.g. \'{"sink_tokens": 4}\'')
    p.add_argument("--ablation-round", type=int, default=1, choices=[1, 2, 3])
    p.add_argument("--reuse-hf", default="", help="take the HF QuantizedCache rows of the ppl table from this earlier JSON "
                   "(they do not depend on TurboQuant settings; same windows required) instead of re-running them")
    p.add_argument("--import", dest="imports", action="append", default=[],
                   help="PATH:KEY=NEWKEY, copy results[KEY] of an earlier run's JSON into this one as NEWKEY")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared, oversubscribed CPU, 2 OpenMP threads were 5-10x slower)")
    p.add_argument("--out", default=str(RESULTS / "kv_quality.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.windows, args.prefix, args.cont = 1, 320, 34
        args.needle_trials, args.needle_lengths = 1, "384"
        if args.needle_format == "auto":
            args.needle_format = "plain"
        if args.phases == "ppl,ablation,check,needle":
            args.phases = "ppl,ablation,needle"  # the token-by-token check alone takes minutes
        if args.out == str(RESULTS / "kv_quality.json"):
            args.out = str(RESULTS / "kv_quality_quick.json")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.base:
        BASE.update(json.loads(args.base))
        BASE["full_precision_layers"] = tuple(BASE["full_precision_layers"])
    phases = set(args.phases.split(","))
    lengths = [int(x) for x in args.needle_lengths.split(",")]
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    from turboquant.models import load_smollm2

    t_start = time.time()
    model, tok = load_smollm2(dtype=torch.float32)
    results: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct (fp32 weights dequantized from Q4_1 GGUF)",
        "machine": machine_info(),
        "args": vars(args),
        "base_settings": {**BASE, "full_precision_layers": list(BASE["full_precision_layers"])},
        "method": {
            "ppl": f"{args.windows} windows of pydoc_data.topics, prefix {args.prefix} (fp prefill copied into each cache), "
                   f"{args.cont} teacher-forced continuation tokens scored; chunked feeding == token-by-token (see check)",
            "bytes_per_token": "summed over all layers, K+V, all kv heads; TurboQuant: codes + fp16 norms (+ QJL bits "
                               "and residual norms for prod); full-precision layers counted at fp16; HF: stored quantized tensors",
        },
    }

    for item in args.imports:
        path, keys = item.rsplit(":", 1)
        key, new = keys.split("=")
        results[new] = json.loads(Path(path).read_text())[key]

    def save() -> None:
        results["total_wall_s"] = round(time.time() - t_start, 1)
        results["machine"]["loadavg_end"] = os.getloadavg()
        out_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
        try:
            plot(results, out_path.with_suffix(".png"))
        except Exception as exc:  # plotting must never lose the numbers
            log("plot failed:", exc)

    windows = kv = None
    ppl_rows: list[dict] = []
    if phases & {"check", "ppl", "ablation"}:
        windows = ppl_windows(tok, args.windows, args.prefix, args.cont)
        t0 = time.time()
        kv = prefill_kv(model, windows[:, : args.prefix - 1])
        results["ppl_prefill_s"] = round(time.time() - t0, 1)
        log(f"prefill {tuple(windows[:, : args.prefix - 1].shape)} in {results['ppl_prefill_s']}s")
    if "ppl" in phases:
        specs = main_specs()
        if args.quick:
            specs = [s for s in specs if s.name in ("fp32", "TQ K4/V2 mse", "HF quanto 4-bit")]
        reused = []
        if args.reuse_hf:
            old = json.loads(Path(args.reuse_hf).read_text())
            same = {k: old["args"][k] for k in ("windows", "prefix", "cont")} == {k: getattr(args, k) for k in ("windows", "prefix", "cont")}
            if not same:
                raise SystemExit("--reuse-hf: the earlier run used other windows")
            reused = [dict(r, reused_from=args.reuse_hf) for r in old["ppl"] if r["kind"] == "hf"]
            specs = [s for s in specs if s.kind != "hf"]
        ppl_rows = run_ppl(model, specs, windows, args.prefix, kv, "ppl") + reused
        add_deltas(ppl_rows, ppl_rows[0])
        results["ppl"] = ppl_rows
        print_table(ppl_rows, "perplexity (main grid)")
        save()
    if "ablation" in phases:
        specs = ablation_specs(model.config.num_hidden_layers, args.ablation_round)
        if args.quick:
            specs = specs[:2]
        # rows already measured in the main grid (same windows, same settings) are reused, not re-run
        done = {r["name"]: r for r in ppl_rows}
        todo = [s for s in specs if s.name.replace(" [base]", "") not in done]
        if "fp32" not in done:
            todo = [Spec("fp32", "fp32")] + todo
        new = {r["name"]: r for r in run_ppl(model, todo, windows, args.prefix, kv, "ablation")}
        ref = done.get("fp32") or new["fp32"]
        rows = []
        for s in specs:
            base = s.name.replace(" [base]", "")
            row = dict(new[s.name]) if s.name in new else dict(done[base], name=s.name, reused_from=base)
            rows.append(row)
        add_deltas(rows, ref)
        results["ablation"] = rows
        print_table(rows, "ablations")
        save()
    if "check" in phases:
        n_tq = 34 if args.quick else 67
        n_hf = 0 if args.quick else 140
        results["check"] = run_check(model, windows, args.prefix, kv, n_tq, n_hf)
        save()
    del kv
    if "needle" in phases:
        fmt = args.needle_format
        if fmt == "auto":
            pilot = {}
            for f in ("plain", "chat"):
                r = run_needle(model, tok, [Spec("fp32", "fp32")], f, [lengths[0]], args.pilot_trials, args.seed + 1, label=f"pilot-{f}")
                pilot[f] = r["rates"]["fp32"][lengths[0]]
            fmt = max(("plain", "chat"), key=lambda f: pilot[f])  # ties -> plain
            results["needle_format_pilot"] = {"fp32_rate_at_length": lengths[0], "trials": args.pilot_trials, **pilot, "chosen": fmt}
            log(f"needle format pilot: {pilot} -> {fmt}")
            save()
        specs = needle_specs()
        if args.quick:
            specs = [s for s in specs if s.name in ("fp32", "TQ K4/V2 mse")]
        results["needle"] = run_needle(model, tok, specs, fmt, lengths, args.needle_trials, args.seed,
                                       logprob=not args.no_logprob)
        nd = results["needle"]
        print(f"\n=== needle ({nd['format']}, {nd['trials']} trials/length) ===")
        print(f"{'config':30s} " + " ".join(f"{n:>7d}" for n in lengths) + "   wall s")
        for name, rates in nd["rates"].items():
            print(f"{name:30s} " + " ".join(f"{rates[n]:7.2f}" for n in lengths) + f"   {nd['wall_s'][name]:.0f}")
        if nd["format"] != "plain_space":
            print("digit-restricted greedy answer exact match (retrieval without the answer-format choice):")
            for name, rates in nd["digits_rates"].items():
                print(f"{name:30s} " + " ".join(f"{rates[n]:7.2f}" for n in lengths))
        if "mean_key_logprob" in nd:
            print("mean teacher-forced log-prob of the pass key (nats; 0 = certain):")
            for name, lp in nd["mean_key_logprob"].items():
                print(f"{name:30s} " + " ".join(f"{lp[n]:7.2f}" for n in lengths))
        print("prefill s per length:", nd["prefill_s"])
        save()
    save()
    log(f"done in {time.time() - t_start:.0f}s -> {out_path}")


if __name__ == "__main__":
    sys.exit(main())
