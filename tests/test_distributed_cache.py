"""The KV cache across ranks and devices (issue 13), on CPU.

* Tensor parallelism: transformers 5 runs ``tp_plan="auto"`` on CPU with a gloo process group (its
  ``DISTRIBUTED_BACKEND_MAP`` maps ``cpu`` to ``gloo``), so the test drives transformers' own
  tensor parallelism, not a home-made sharding: two spawned processes load a tiny random Llama with
  ``DistributedConfig(tp_plan="auto")``; each rank's ``k_proj``/``v_proj`` are column shards, so its
  cache sees ``num_key_value_heads / 2`` heads.
* Per-rank head slicing at the cache level, in one process: splitting the KV heads (and their query
  heads) into slices and running one cache layer per slice gives bit-identical codes and attention
  outputs to one layer over all heads, with no process group at all (the cache needs no traffic).
* Layer split: cache layers of one cache on different devices (``cpu`` and ``meta``, the only two a
  CPU machine has) each allocate on their own key's device.
"""

from __future__ import annotations

import os
import socket
import sys
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM

from turboquant.cache import _PENDING, TurboQuantCache, TurboQuantLayer, _device_scope, turboquant_attention
from turboquant.config import KVCacheConfig, TurboQuantError

CACHE = {"key_bits": 4, "value_bits": 3, "sink_tokens": 2, "window": 6, "flush_every": 2, "backend": "cpu"}
PROMPT, STEPS = 24, 10
# Collectives a tensor-parallel forward can issue through torch.distributed (counted per rank).
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
                "broadcast_object_list", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single",
                "send", "recv", "isend", "irecv", "barrier")  # fmt: skip


def _tiny_config() -> LlamaConfig:
    # initializer_range 0.2: peaked logits, so greedy tokens are not decided by near-ties
    return LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, max_position_embeddings=128, initializer_range=0.2)  # fmt: skip


def _prompt() -> torch.Tensor:
    return torch.randint(0, 96, (2, PROMPT), generator=torch.Generator().manual_seed(1))


def _greedy(model: LlamaForCausalLM) -> tuple[torch.Tensor, torch.Tensor, TurboQuantCache]:
    """``(tokens [2, STEPS], scores [STEPS, 2, vocab], cache)`` of greedy decoding with a TurboQuantCache."""
    cache = TurboQuantCache(model.config, **CACHE)
    ids = _prompt()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=STEPS,
                             min_new_tokens=STEPS, do_sample=False, output_scores=True, return_dict_in_generate=True,
                             pad_token_id=0)  # fmt: skip
    return out.sequences[:, PROMPT:], torch.stack(out.scores), cache


def _tp_worker(rank: int, world: int, path: str, port: int, results: dict) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from transformers import DynamicCache
    from transformers.distributed import DistributedConfig

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = LlamaForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(tp_plan="auto"), dtype=torch.float32)
        weight = model.model.layers[0].self_attn.k_proj.weight
        counts = {"n": 0}
        originals = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}

        def counting(fn):
            def wrapped(*args, **kwargs):
                counts["n"] += 1
                return fn(*args, **kwargs)

            return wrapped

        for name, fn in originals.items():
            setattr(dist, name, counting(fn))
        tokens, scores, cache = _greedy(model)
        tq_collectives = counts["n"]
        counts["n"] = 0
        ids = _prompt()
        with torch.no_grad():  # the same decode with transformers' own cache and SDPA: the collectives of the model alone
            model.set_attn_implementation("sdpa")
            model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=DynamicCache(config=model.config),
                           max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, pad_token_id=0)  # fmt: skip
        for name, fn in originals.items():
            setattr(dist, name, fn)
        layer = cache.layers[0]
        results[rank] = {
            "sharded": isinstance(weight, DTensor) and tuple(weight.to_local().shape),
            "tokens": tokens,
            "scores": scores,
            "kv_heads": [lay.keys.shape[1] for lay in cache.layers],
            "compressed": [lay.compressed_length for lay in cache.layers],
            "codes0": layer.key_codes.view().codes.clone(),
            "norms0": layer.key_codes.view().norms.clone(),
            "tq_collectives": tq_collectives,
            "sdpa_collectives": counts["n"],
        }
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the test with it
        results[rank] = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_tensor_parallel_gloo_matches_one_process(tmp_path: Path) -> None:
    """transformers' own TP (``tp_plan="auto"``, gloo, 2 processes) with TurboQuantCache.

    Greedy tokens must equal one process with the same cache settings. The logits are not bit-equal
    (``o_proj``/``down_proj`` are row shards whose partial products are summed by an all-reduce, a
    different float32 summation order) and are compared to 1e-4. The first layer's codes are bit-equal
    to the matching head slice of the one-process cache (same seeded rotation and codebook on every
    rank, before any all-reduce). The cache issues no collective: the count per rank equals that of
    the same decode with transformers' DynamicCache and SDPA.
    """
    if sys.platform not in ("linux", "darwin"):
        pytest.skip(f"spawning gloo workers is not supported on {sys.platform}")
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch was built without the gloo backend")
    torch.manual_seed(0)
    LlamaForCausalLM(_tiny_config()).save_pretrained(tmp_path)
    reference = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ref_tokens, ref_scores, ref_cache = _greedy(reference)

    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        try:
            mp.start_processes(_tp_worker, args=(2, str(tmp_path), _free_port(), results), nprocs=2, join=True, start_method="spawn")
        except mp.ProcessRaisedException as exc:  # pragma: no cover - a failing worker
            pytest.fail(f"tensor-parallel worker failed: {exc}")
        results = dict(results)
    assert sorted(results) == [0, 1]
    ref_layer = ref_cache.layers[0]
    for rank, res in results.items():
        assert "error" not in res, res.get("error")
        assert res["sharded"] == (16, 64)  # k_proj [2 heads * 16, 64] column-sharded: one head per rank
        assert res["kv_heads"] == [1, 1]
        assert res["compressed"] == [lay.compressed_length for lay in ref_cache.layers] and res["compressed"][0] > 0
        assert torch.equal(res["tokens"], ref_tokens), (rank, res["tokens"], ref_tokens)
        torch.testing.assert_close(res["scores"], ref_scores, rtol=0, atol=1e-4)
        heads = slice(rank, rank + 1)
        assert torch.equal(res["codes0"], ref_layer.key_codes.view().codes[:, heads])
        assert torch.equal(res["norms0"], ref_layer.key_codes.view().norms[:, heads])
        assert res["sdpa_collectives"] > 0  # the counter sees the model's all-reduces ...
        assert res["tq_collectives"] == res["sdpa_collectives"]  # ... and the cache adds none
    # the tokens must depend on the cache: a full-precision run of the same model decodes differently
    # somewhere in its logits (else the test could not tell a broken cache from none)
    with torch.no_grad():
        ids = _prompt()
        reference.set_attn_implementation("sdpa")
        fp = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS, min_new_tokens=STEPS,
                                do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)  # fmt: skip
    finite = torch.isfinite(ref_scores)  # min_new_tokens sets the EOS score to -inf
    assert (torch.stack(fp.scores) - ref_scores)[finite].abs().max() > 1e-3


def _run_layer(layer: TurboQuantLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One update + attention of ``layer``: q ``[B, Hq, L, d]``, k/v ``[B, Hkv, L, d]`` → ``[B, L, Hq, d]``."""
    keys, values = layer.update(k, v)
    mask = None
    if q.shape[2] > 1:
        total = layer.get_seq_length()
        rows = torch.arange(q.shape[2]).unsqueeze(-1) + (total - q.shape[2])
        mask = (torch.arange(total).unsqueeze(0) <= rows)[None, None].expand(q.shape[0], 1, -1, -1)
    out, _ = turboquant_attention(types.SimpleNamespace(layer_idx=layer.layer_idx), q, keys, values, mask)
    return out


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_head_slices_bit_identical(backend: str) -> None:
    """Per-rank head slicing: rank r holds kv heads ``[r*H/2, (r+1)*H/2)`` and their query heads.

    Each slice's layer encodes and attends over its own heads only, in this one process with no
    process group (so it needs no cross-rank traffic); its codes and outputs are bit-identical to the
    matching slice of one layer over all heads (exact equality, not a tolerance).
    """
    torch.manual_seed(3)
    b, hkv, groups, d, world = 2, 4, 2, 32, 2
    settings = KVCacheConfig(**{**CACHE, "backend": backend})
    full = TurboQuantLayer(settings, layer_idx=0)
    parts = [TurboQuantLayer(settings, layer_idx=0) for _ in range(world)]
    per = hkv // world
    for length in (20, 1, 1, 3, 1, 1):  # prefill, decode steps, a 3-token chunk; crosses several flushes
        q = torch.randn(b, hkv * groups, length, d)
        k = torch.randn(b, hkv, length, d) * 2 + 0.5
        v = torch.randn(b, hkv, length, d)
        want = _run_layer(full, q, k, v)
        got = [
            _run_layer(parts[r], q[:, r * per * groups : (r + 1) * per * groups], k[:, r * per : (r + 1) * per], v[:, r * per : (r + 1) * per])
            for r in range(world)
        ]  # fmt: skip
        assert torch.equal(torch.cat(got, dim=2), want)
    assert full.compressed_length > 0
    for r, part in enumerate(parts):
        heads = slice(r * per, (r + 1) * per)
        assert part.compressed_length == full.compressed_length
        assert torch.equal(part.key_codes.view().codes, full.key_codes.view().codes[:, heads])
        assert torch.equal(part.value_codes.view().codes, full.value_codes.view().codes[:, heads])
        assert torch.equal(part.key_offset, full.key_offset[:, heads])


def test_layers_on_different_devices() -> None:
    """A layer split (``device_map="auto"``): layer 0 on ``cpu``, layer 1 on ``meta``.

    Each layer allocates its buffers, codes and offsets on the device of the first keys it sees, and
    attention (causal mask included) runs there; nothing in the cache assumes one device.
    """
    config = _tiny_config()
    cache = TurboQuantCache(config, **{**CACHE, "backend": "torch", "norm_dtype": "float32"})  # meta tensors cannot be read: no float16 overflow check
    devices = ["cpu", "meta"]
    for length in (12, 1, 1, 1):
        for idx, dev in enumerate(devices):
            k = torch.randn(1, 2, length, 16, device=dev)
            v = torch.randn(1, 2, length, 16, device=dev)
            keys, values = cache.update(k, v, idx)
            q = torch.randn(1, 4, length, 16, device=dev)
            out, _ = turboquant_attention(types.SimpleNamespace(layer_idx=idx), q, keys, values, None)
            assert out.device.type == dev
    for layer, dev in zip(cache.layers, devices):
        assert layer.compressed_length > 0
        tensors = [*layer.key_codes.buffer.tensors.values(), *layer.value_codes.buffer.tensors.values(), layer.key_offset, layer.keys]
        assert {t.device.type for t in tensors} == {dev}
    assert cache.get_seq_length(1) == 15 and cache.nbytes()["compressed"] > 0


def test_kv_heads_that_do_not_divide_the_config_are_rejected() -> None:
    cache = TurboQuantCache(_tiny_config(), **CACHE)  # num_key_value_heads=2
    assert cache.kv_heads(0) == 2
    cache.update(torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 16), 0)  # one rank of two: fine
    _PENDING.layers.clear()
    with pytest.raises(TurboQuantError, match="does not divide the config's num_key_value_heads=2"):
        cache.update(torch.randn(1, 3, 4, 16), torch.randn(1, 3, 4, 16), 1)


def test_a_layer_rejects_another_layout() -> None:
    layer = TurboQuantLayer(KVCacheConfig(**CACHE), layer_idx=0)
    layer.update(torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16))
    with pytest.raises(TurboQuantError, match=r"\[batch, kv_heads, head_dim\] = \[1, 1, 16\].*holds \[1, 2, 16\]"):
        layer.update(torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16))
    with pytest.raises(TurboQuantError, match="on meta"):
        layer.update(torch.randn(1, 2, 1, 16, device="meta"), torch.randn(1, 2, 1, 16, device="meta"))
    _PENDING.layers.clear()


def test_query_heads_must_be_a_multiple_of_kv_heads() -> None:
    k = torch.randn(1, 2, 3, 16)
    with pytest.raises(TurboQuantError, match="3 query heads are not a multiple of 2 kv heads"):
        turboquant_attention(types.SimpleNamespace(layer_idx=None), torch.randn(1, 3, 1, 16), k, k, None)


def test_device_scope_selects_the_tensors_gpu() -> None:
    scope = _device_scope(torch.device("cuda", 1))  # constructing it needs no GPU
    assert isinstance(scope, torch.cuda.device) and scope.idx == 1
    assert not isinstance(_device_scope(torch.device("cpu")), torch.cuda.device)
