"""Does a model decode the same with TurboQuantCache (Triton kernels) as with DynamicCache (SDPA) on a GPU?

Small random-weight Llama models in bf16 (4 layers, 8 query / 2 KV heads, head_dim 64 and 128,
K/V bits 4, 3, 2), batch 2, a ``--prompt``-token prompt then ``--steps`` tokens. Teacher-forced:
both caches get the same prompt and then the same tokens (DynamicCache's greedy choices), so the
per-step top-1 agreement and logit differences compare like with like; the Triton and the torch
backends of the cache are compared too, and greedy generation with each cache.

    python benchmarks/gpu_cache_check.py --out $OUT

Writes ``gpu_cache_check.json`` into ``--out`` (the committed H200 run is ``hf_check`` in
``results/gpu_decode_h200_v4.json``).
"""

from __future__ import annotations

from typing import Any

import torch

from _common import log, machine_info, table
from _gpu import Sections, gpu_parser

CASES = ((64, 4), (128, 4), (128, 3), (128, 2))  # head_dim, K and V bits


def forced_logits(model: Any, cache: Any, ids: torch.Tensor, steps: int, tokens: torch.Tensor | None) -> torch.Tensor:
    """Logits ``[B, steps + 1, V]`` after the prompt and after each of ``steps`` tokens fed through ``cache``
    (``tokens [B, steps]``, or the cache's own greedy choices when None)."""
    logits = []
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits.append(out.logits[:, -1].float())
        for i in range(steps):
            tok = tokens[:, i : i + 1] if tokens is not None else logits[-1].argmax(-1, keepdim=True)
            out = model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
            logits.append(out.logits[:, -1].float())
    return torch.stack(logits, 1)


def check_case(head_dim: int, bits: int, prompt: int, steps: int, device: str) -> dict[str, Any]:
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from turboquant import TurboQuantCache

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, head_dim=head_dim, vocab_size=4096, max_position_embeddings=8192,
    )  # fmt: skip
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).to(device=device, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, prompt), device=device)
    tokens = forced_logits(model, DynamicCache(), ids, steps, None).argmax(-1)[:, :steps]
    ref = forced_logits(model, DynamicCache(), ids, steps, tokens)
    cache = TurboQuantCache(model.config, key_bits=bits, value_bits=bits)
    tq = forced_logits(model, cache, ids, steps, tokens)
    tq_torch = forced_logits(model, TurboQuantCache(model.config, key_bits=bits, value_bits=bits, backend="torch"), ids, steps, tokens)
    diff = (tq - ref).abs()
    greedy = {}
    for name, make in (("ref", DynamicCache), ("tq", lambda: TurboQuantCache(model.config, key_bits=bits, value_bits=bits))):
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False, past_key_values=make())
        greedy[name] = out[:, prompt:]
    same = greedy["ref"] == greedy["tq"]
    return dict(
        head_dim=head_dim, bits=bits, top1_agreement=(tq.argmax(-1) == ref.argmax(-1)).float().mean().item(),
        max_logit_diff=diff.max().item(), mean_logit_diff=diff.mean().item(), max_abs_logit=ref.abs().max().item(),
        greedy_match=same.float().mean().item(), greedy_prefix=int(same.all(0).long().cumprod(0).sum().item()),
        compressed_tokens=cache.layers[0].compressed_length,
        triton_vs_torch_max_logit_diff=(tq - tq_torch).abs().max().item(),
        triton_vs_torch_top1=(tq.argmax(-1) == tq_torch.argmax(-1)).float().mean().item(),
    )  # fmt: skip


def run_checks(prompt: int, steps: int, device: str) -> dict[str, Any]:
    import transformers

    res: dict[str, Any] = {"transformers": transformers.__version__, "prompt": prompt, "steps": steps, "runs": []}
    for head_dim, bits in CASES:
        res["runs"].append(check_case(head_dim, bits, prompt, steps, device))
        log(f"d={head_dim} K{bits}/V{bits}: {res['runs'][-1]}")
        if device == "cuda":
            torch.cuda.empty_cache()
    return res


def main(argv: list[str] | None = None) -> int:
    p = gpu_parser(__doc__, tuning=False)
    p.add_argument("--prompt", type=int, default=2048)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--device", default="cuda", help="cuda (the Triton path); cpu runs the torch path only")
    args = p.parse_args(argv)
    results: dict[str, Any] = {"machine": machine_info(), "device": args.device}
    res = Sections(results, "gpu_cache_check.json", args.out).run("hf_check", lambda: run_checks(args.prompt, args.steps, args.device))
    if res:
        cols = ["head_dim", "bits", "top1_agreement", "max_logit_diff", "greedy_match", "greedy_prefix", "triton_vs_torch_top1"]
        print(table([[r[c] for c in cols] for r in res["runs"]], cols))
    return 0 if res else 1


if __name__ == "__main__":
    raise SystemExit(main())
