"""Small, structurally faithful random-weight models of two families for the KV cache (issue 11).

Used by ``benchmarks/kv_families.py`` and ``tests/test_model_families.py``; no hub access.

* :func:`qwen2_style`: ``Qwen2Config`` with Qwen2.5-7B's attention geometry (head_dim 128, GQA
  with 4 query heads per KV head, rope_theta 1e6, q/k/v biases). Its key biases are set after init
  like Qwen2.5's: a few channels per KV head (in the low-frequency RoPE half, where trained models
  put their massive key values) with ``|bias|`` 10-50x the typical key coordinate.
* :func:`gemma3_style`: ``Gemma3TextConfig`` with Gemma-3-1B's attention geometry (head_dim 256,
  4 query heads, one KV head, QK-norm, ``query_pre_attn_scalar``, sliding-window layers between
  full-attention layers, two RoPE bases), fewer layers and a small sliding window so the sliding
  layers really slide within a few hundred tokens.

Random weights at the default ``initializer_range`` give nearly uniform attention and logits that
hardly depend on attention (the residual stream is dominated by the embeddings), so any KV cache
looks perfect. Both builders therefore scale the weights: linear maps get std ``1/sqrt(fan_in)``
(each sublayer output is O(1), comparable to the residual), and the query/key maps are scaled so
that attention is peaked (score standard deviation ``attn_temp``, a few nats, like trained models),
and the logits spread a few nats. The text is real: :func:`text_ids` maps the words of
``pydoc_text()`` to ids by a stable hash, so the token stream has real repetition statistics.
"""

from __future__ import annotations

import math
import os
import re
import zlib
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

VOCAB = 4096


def text_ids(n: int, vocab: int = VOCAB, offset: int = 0) -> torch.Tensor:
    """``[1, n]`` ids of the words (and punctuation) of ``pydoc_text()``, ``crc32(word) % vocab``."""
    from turboquant.demo.models import pydoc_text

    words = re.findall(r"\w+|[^\w\s]", pydoc_text()[offset * 8 : offset * 8 + 12 * n])
    if len(words) < n:
        raise ValueError(f"pydoc text too short for {n} words at offset {offset}")
    return torch.tensor([[zlib.crc32(w.encode()) % vocab for w in words[:n]]])


def _scale_linears(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            fan_in = module.weight.shape[1]
            module.weight.copy_(torch.randn(module.weight.shape, generator=g) / math.sqrt(fan_in))
            if module.bias is not None:
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=g))


@torch.no_grad()
def qwen2_style(seed: int = 0, layers: int = 4, attn_temp: float = 3.0, bias_scale: float = 1.0,
                bias_band: tuple[int, int] = (32, 64)) -> Any:
    """A Qwen2ForCausalLM with Qwen2.5-7B attention geometry and Qwen2.5-like key biases.

    ``bias_scale`` multiplies the large key biases (0: none; 1: ``|bias|`` 10-50x the typical key
    coordinate). ``bias_band``: the pair indices ``j`` (RoPE frequency ``theta^(-2j/128)``) that carry
    the large biases, default the low-frequency half. Returns the model in eval mode, float32, SDPA attention.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    head_dim, heads, kv_heads = 128, 8, 2
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=512, head_dim=head_dim, intermediate_size=1024, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=False,
                      attn_implementation="sdpa")  # fmt: skip
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).eval()
    _scale_linears(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    model.model.embed_tokens.weight.copy_(torch.randn(model.model.embed_tokens.weight.shape, generator=g))
    # logits spread ~3 nats: lm_head acts on a unit-RMS normed state
    model.lm_head.weight.mul_(3.0)
    # q·k/sqrt(d) with unit-RMS q and k coordinates has std 1: scale q and k by sqrt(attn_temp) each
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.q_proj.weight.mul_(math.sqrt(attn_temp))
        attn.k_proj.weight.mul_(math.sqrt(attn_temp))
        typical = math.sqrt(attn_temp)  # RMS of one key coordinate without bias
        bias = torch.zeros(kv_heads, head_dim)
        for h in range(kv_heads):
            # low-frequency RoPE channels: index j pairs with j + head_dim/2, frequency theta^(-2j/head_dim)
            channels = torch.randperm(bias_band[1] - bias_band[0], generator=g)[:3] + bias_band[0]
            mags = torch.tensor([50.0, 25.0, 10.0]) * typical
            signs = torch.where(torch.rand(3, generator=g) < 0.5, -1.0, 1.0)
            bias[h, channels] = bias_scale * mags * signs
            # plus Qwen-like moderate biases on every channel
            bias[h] += bias_scale * typical * 0.5 * torch.randn(head_dim, generator=g)
        attn.k_proj.bias.copy_(bias.flatten())
        attn.q_proj.bias.copy_(0.5 * typical * torch.randn(attn.q_proj.bias.shape, generator=g))
    return model


@torch.no_grad()
def gemma3_style(seed: int = 0, layers: int = 6, attn_temp: float = 3.0, sliding_window: int = 128) -> Any:
    """A Gemma3ForCausalLM with Gemma-3-1B attention geometry (head_dim 256, 1 KV head, QK-norm).

    Layer types alternate ``sliding, sliding, full`` (Gemma 3 uses 5 sliding per full layer; with 6
    layers that would leave one full layer). QK-norm fixes key/query RMS at ``(1 + w)`` per channel:
    ``w`` is drawn so the attention score std is about ``attn_temp`` with per-channel variation,
    as trained ``k_norm``/``q_norm`` weights have.
    """
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    kinds = ["sliding_attention", "sliding_attention", "full_attention"]
    cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=1024, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                           sliding_window=sliding_window, layer_types=[kinds[i % 3] for i in range(layers)],
                           max_position_embeddings=4096, attn_implementation="sdpa")  # fmt: skip
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(cfg).eval()
    _scale_linears(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    # Gemma scales embeddings by sqrt(hidden): std 1/sqrt(hidden) gives a unit-RMS residual
    model.model.embed_tokens.weight.copy_(torch.randn(model.model.embed_tokens.weight.shape, generator=g) / math.sqrt(256))
    model.lm_head.weight = torch.nn.Parameter(3.0 * torch.randn(VOCAB, 256, generator=g) / math.sqrt(256))
    for layer in model.model.layers:
        attn = layer.self_attn
        for norm in (attn.q_norm, attn.k_norm):
            # (1 + w) per channel, log-normal around sqrt(attn_temp)
            gain = math.sqrt(attn_temp) * torch.exp(0.5 * torch.randn(256, generator=g)) / math.exp(0.125)
            norm.weight.copy_(gain - 1.0)
    return model


def attention_outputs(model: Any) -> tuple[list[list[torch.Tensor]], list[Any]]:
    """Hooks storing each decoder layer's attention output (before ``o_proj``'s residual add).

    Returns ``(store, handles)``: ``store[i]`` collects layer ``i``'s ``[B, L, hidden]`` outputs.
    """
    store: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
    handles = []
    for i, layer in enumerate(model.model.layers):
        def hook(_m: Any, _args: Any, out: Any, i: int = i) -> None:
            store[i].append(out[0].detach().float())
        handles.append(layer.self_attn.register_forward_hook(hook))
    return store, handles


@torch.no_grad()
def teacher_forced(model: Any, ids: torch.Tensor, prefix: int, cache: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Prefill ``ids[:, :prefix]``, then decode the rest one token at a time.

    Returns ``(logits [B, n, V], attn)`` for the ``n = len - prefix`` decoded tokens, ``attn[i]``:
    layer ``i``'s attention outputs ``[B, n, hidden]`` at those steps.
    """
    model(ids[:, :prefix], past_key_values=cache, use_cache=True)
    store, handles = attention_outputs(model)
    try:
        logits = [model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits.float() for t in range(prefix, ids.shape[1])]
    finally:
        for h in handles:
            h.remove()
    return torch.cat(logits, dim=1), [torch.cat(s, dim=1) for s in store]


def compare(ref: tuple[torch.Tensor, list[torch.Tensor]], got: tuple[torch.Tensor, list[torch.Tensor]]) -> dict[str, Any]:
    """Top-1 agreement, relative logit error ``‖Δ‖/‖ref‖`` (logits centered per token), KL (nats) and
    per-layer attention-output relative error of ``got`` against ``ref``."""
    (lr, ar), (lg, ag) = ref, got
    lr_c, lg_c = lr - lr.mean(-1, keepdim=True), lg - lg.mean(-1, keepdim=True)
    kl = torch.nn.functional.kl_div(lg.log_softmax(-1), lr.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    return {
        "top1": (lg.argmax(-1) == lr.argmax(-1)).float().mean().item(),
        "logit_rel_err": (torch.linalg.vector_norm(lg_c - lr_c) / torch.linalg.vector_norm(lr_c)).item(),
        "kl": kl.mean().item(),
        "attn_rel_err": [(torch.linalg.vector_norm(g - r) / torch.linalg.vector_norm(r)).item() for r, g in zip(ar, ag)],
    }
