"""TurboQuantCache across two GPUs: transformers tensor parallelism and a layer split (issue 13).

Needs a machine with at least two GPUs of one host (fails at once otherwise). Phases, each in its own
process so that every measurement starts from empty GPUs:

1. ``single``: the model on one GPU. Greedy decoding of ``--steps`` tokens after a ``--context``
   prompt (batch ``--batch``) with TurboQuantCache (the reference tokens), then the same with
   transformers' bf16 ``DynamicCache``: decode tokens/s, KV bytes, peak memory.
2. ``tp``: the same checkpoint under transformers' tensor parallelism
   (``DistributedConfig(tp_plan="auto")``), launched with ``torchrun --nproc-per-node 2`` (NCCL on
   GPUs, gloo on CPU). Each rank's cache holds ``num_key_value_heads / 2`` heads. Decoding is
   teacher-forced with the reference tokens, so the per-step top-1 agreement with one GPU is defined
   even after a disagreement; agreement 1.0 means the greedy tokens are identical. Per-GPU KV bytes
   and decode tokens/s, TurboQuant vs bf16 under the same parallelism, and the longest context that
   fits per GPU (an estimate: free memory after weights and decode activations, divided by the
   measured KV bytes per token per GPU).
3. ``layers``: ``device_map="auto"`` over both GPUs (``max_memory`` caps GPU 0 at about half the
   weights so the layers really split), teacher-forced the same way; KV bytes per device.

The weights are random (Llama-3.1-8B shape, bf16, seed 0), saved once to ``--workdir`` so that all
phases load the same checkpoint. Random weights give nearly flat logits, so bf16 reduction-order
differences (TP sums partial matmuls with an all-reduce) can flip near-tied greedy choices: the
issue then asks for top-1 agreement ≥ 0.99 with that reason.

Usage::

    python benchmarks/kv_tensor_parallel.py                         # 2+ GPUs: the issue's measurement
    python benchmarks/kv_tensor_parallel.py --tiny --device cpu     # CPU smoke test of the same logic

Writes ``kv_tensor_parallel_<card>.json`` to ``--out`` (``$OUT``, else benchmarks/results).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import log, machine_info, out_folder, parser, table, write_json

LLAMA_8B = {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 131072, "rope_theta": 500000.0,
                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192}}  # fmt: skip
TINY = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256, "initializer_range": 0.2}  # fmt: skip
SCRIPT = Path(__file__).resolve()


def build_parser() -> Any:
    p = parser(__doc__)
    p.add_argument("--role", choices=["driver", "single", "tp", "layers"], default="driver", help="internal: which phase this process runs")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cuda (the measurement) or cpu (smoke test, needs --tiny)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer toy model, short context (smoke test)")
    p.add_argument("--batch", type=int, default=None, help="sequences (default 8; 2 with --tiny)")
    p.add_argument("--context", type=int, default=None, help="prompt tokens (default 32768; 48 with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="greedy decode steps (default 64; 8 with --tiny)")
    p.add_argument("--key-bits", type=float, default=4)
    p.add_argument("--value-bits", type=float, default=4)
    p.add_argument("--workdir", type=Path, default=None, help="checkpoint and per-phase results (default $TMPDIR/turboquant_kv_tp[_tiny])")
    p.add_argument("--out", type=Path, default=out_folder(), help="result folder (default: $OUT, else benchmarks/results)")
    return p


def defaults(args: Any) -> Any:
    args.batch = args.batch or (2 if args.tiny else 8)
    args.context = args.context or (48 if args.tiny else 32768)
    args.steps = args.steps or (8 if args.tiny else 64)
    if args.workdir is None:
        args.workdir = Path(os.environ.get("TMPDIR", "/tmp")) / ("turboquant_kv_tp_tiny" if args.tiny else "turboquant_kv_tp")
    return args


def cache_settings(args: Any) -> dict[str, Any]:
    small = {"sink_tokens": 2, "window": 6, "flush_every": 2} if args.tiny else {}
    return {"key_bits": args.key_bits, "value_bits": args.value_bits, **small}


def check_devices(args: Any) -> None:
    """Fail fast: the measurement needs two GPUs; CPU is only for the tiny smoke test."""
    import torch

    if args.device == "cpu":
        if not args.tiny:
            sys.exit("kv_tensor_parallel: --device cpu runs only the --tiny smoke test (an 8B model on CPU is not the measurement)")
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 2:
        sys.exit(f"kv_tensor_parallel: needs at least 2 GPUs of one host, found {count}; "
                 "run on a 2-GPU machine, or try the logic with --tiny --device cpu")  # fmt: skip


# ---------------------------------------------------------------------- shared by the phases


def sync(device: Any) -> None:
    import torch

    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize()


def make_checkpoint(args: Any) -> Path:
    """Random bf16 weights of the model shape, saved once (the same for every phase)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = args.workdir / "checkpoint"
    shape = TINY if args.tiny else LLAMA_8B
    marker = path / "turboquant_shape.json"
    if marker.exists() and json.loads(marker.read_text()) == shape:
        return path
    log(f"building random weights {shape['num_hidden_layers']} layers, hidden {shape['hidden_size']} -> {path}")
    torch.manual_seed(0)
    device = "cuda:0" if args.device == "cuda" else "cpu"
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**shape))
    finally:
        torch.set_default_dtype(old)
    model.save_pretrained(path)
    marker.write_text(json.dumps(shape))
    del model
    if device != "cpu":
        torch.cuda.empty_cache()
    return path


def prompt(args: Any, vocab: int, device: Any) -> Any:
    import torch

    ids = torch.randint(0, vocab, (args.batch, args.context), generator=torch.Generator().manual_seed(1))
    return ids.to(device)


def decode(model: Any, cache: Any, ids: Any, steps: int, forced: Any = None) -> tuple[Any, float, float]:
    """Prefill ``ids [B, T]``, then ``steps - 1`` one-token steps: the model's argmax, or ``forced [B, steps]``.

    Returns ``(argmax tokens [B, steps] on CPU, prefill seconds, decode seconds)``.
    """
    import torch

    device = ids.device
    with torch.no_grad():
        sync(device)
        t0 = time.perf_counter()
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        nxt = logits[:, -1].argmax(-1).to(device)
        sync(device)
        t1 = time.perf_counter()
        preds = [nxt]
        for i in range(steps - 1):
            feed = forced[:, i].to(device) if forced is not None else nxt
            logits = model(input_ids=feed[:, None], past_key_values=cache, use_cache=True).logits
            nxt = logits[:, -1].argmax(-1).to(device)
            preds.append(nxt)
        sync(device)
        t2 = time.perf_counter()
    return torch.stack(preds, dim=1).cpu(), t1 - t0, t2 - t1


def kv_bytes_by_device(cache: Any) -> dict[str, int]:
    """Bytes each device holds for this cache (TurboQuant layers: codes + norms + offsets + window)."""
    from turboquant.cache import TurboQuantLayer

    out: dict[str, int] = {}
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False):
            continue
        if isinstance(layer, TurboQuantLayer):
            n, dev = sum(layer.nbytes().values()), layer.device
        else:
            n, dev = 2 * layer.keys.numel() * layer.keys.element_size(), layer.keys.device
        out[str(dev)] = out.get(str(dev), 0) + n
    return out


def peak_memory(device: Any) -> dict[str, int]:
    import torch

    if getattr(device, "type", device) != "cuda":
        return {}
    return {f"cuda:{i}": torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())}


def run_both_caches(args: Any, model: Any, ids: Any, forced: dict[str, Any] | None) -> dict[str, Any]:
    """TurboQuantCache, then bf16 DynamicCache, same prompt; each teacher-forced with ``forced[name]`` if given.

    The bf16 run is the control: its agreement with one device shows what the parallelism alone changes.
    """
    import torch
    from transformers import DynamicCache

    from turboquant.cache import TurboQuantCache

    result: dict[str, Any] = {}
    for name in ("turboquant", "bf16"):
        if ids.device.type == "cuda":
            torch.cuda.empty_cache()
            for i in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(i)
        if name == "turboquant":
            cache = TurboQuantCache(model.config, **cache_settings(args))
        else:
            model.set_attn_implementation("sdpa")
            cache = DynamicCache(config=model.config)
        tokens, prefill_s, decode_s = decode(model, cache, ids, args.steps, None if forced is None else forced[name])
        result[name] = {
            "tokens": tokens.tolist(),
            "prefill_s": prefill_s,
            "decode_tokens_per_s": args.batch * (args.steps - 1) / decode_s,
            "kv_bytes_by_device": kv_bytes_by_device(cache),
            "kv_tokens_per_sequence": cache.get_seq_length(),
            "peak_bytes_by_device": peak_memory(ids.device),
        }
        del cache
    return result


def load(path: Path, args: Any, **kwargs: Any) -> Any:
    import torch
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **kwargs).eval()


# ---------------------------------------------------------------------- phases


def phase_single(args: Any) -> None:
    import torch

    device = torch.device("cuda:0" if args.device == "cuda" else "cpu")
    model = load(args.workdir / "checkpoint", args, device_map=str(device))
    weights = torch.cuda.memory_allocated(0) if device.type == "cuda" else 0
    res = run_both_caches(args, model, prompt(args, model.config.vocab_size, device), None)
    res["weights_bytes"] = weights
    (args.workdir / "single.json").write_text(json.dumps(res))


def phase_tp(args: Any) -> None:
    import torch
    import torch.distributed as dist
    from transformers.distributed import DistributedConfig

    rank = int(os.environ["RANK"])
    if args.device == "cpu":  # transformers picks the backend from the accelerator; on CPU it is gloo
        torch.set_num_threads(1)
    model = load(args.workdir / "checkpoint", args, distributed_config=DistributedConfig(tp_plan="auto"))
    device = model.model.embed_tokens.weight.device
    weights = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    reference = json.loads((args.workdir / "single.json").read_text())
    forced = {name: torch.tensor(reference[name]["tokens"]) for name in ("turboquant", "bf16")}
    res = run_both_caches(args, model, prompt(args, model.config.vocab_size, device), forced)
    res["weights_bytes"] = weights
    res["kv_heads_per_rank"] = model.config.num_key_value_heads // dist.get_world_size()
    res["total_bytes"] = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    (args.workdir / f"tp_rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


def phase_layers(args: Any) -> None:
    import torch

    path = args.workdir / "checkpoint"
    kwargs: dict[str, Any] = {"device_map": "auto"}
    if args.device == "cuda":
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        # cap GPU 0 at about half the weights so that "auto" splits the layers over both GPUs
        kwargs["max_memory"] = {0: int(size * 0.55), 1: int(torch.cuda.get_device_properties(1).total_memory * 0.9)}
    model = load(path, args, **kwargs)
    device = model.model.embed_tokens.weight.device
    reference = json.loads((args.workdir / "single.json").read_text())
    forced = {name: torch.tensor(reference[name]["tokens"]) for name in ("turboquant", "bf16")}
    res = run_both_caches(args, model, prompt(args, model.config.vocab_size, device), forced)
    res["hf_device_map"] = {k: str(v) for k, v in getattr(model, "hf_device_map", {}).items()}
    (args.workdir / "layers.json").write_text(json.dumps(res))


def run_phase(args: Any, role: str, torchrun: bool = False) -> None:
    common = ["--role", role, "--device", args.device, "--batch", str(args.batch), "--context", str(args.context),
              "--steps", str(args.steps), "--key-bits", str(args.key_bits), "--value-bits", str(args.value_bits),
              "--workdir", str(args.workdir)] + (["--tiny"] if args.tiny else [])  # fmt: skip
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] if torchrun else [sys.executable]
    env = dict(os.environ)
    if role == "single" and args.device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    log(f"phase {role}: {' '.join(launcher[1:] + [SCRIPT.name] + common[:2])}")
    t0 = time.perf_counter()
    subprocess.run([*launcher, str(SCRIPT), *common], env=env, check=True)
    log(f"phase {role}: {time.perf_counter() - t0:.1f} s")


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> float:
    pairs = [(a, b) for row, ref in zip(tokens, reference) for a, b in zip(row, ref)]
    return sum(a == b for a, b in pairs) / len(pairs)


def longest_context(rank: dict[str, Any], batch: int, tokens: int) -> dict[str, Any]:
    """Per GPU: (total − weights − decode activations) / KV bytes per token, for TurboQuant and bf16."""
    out: dict[str, Any] = {"method": "estimate: free bytes after weights and decode activations / measured KV bytes per token per GPU"}
    if not rank["total_bytes"]:
        return out
    for name in ("turboquant", "bf16"):
        kv = sum(rank[name]["kv_bytes_by_device"].values())
        peak = max(rank[name]["peak_bytes_by_device"].values(), default=0)
        activations = max(peak - rank["weights_bytes"] - kv, 0)
        per_token = kv / (batch * tokens)
        free = rank["total_bytes"] * 0.95 - rank["weights_bytes"] - activations
        out[name] = {"kv_bytes_per_token_per_gpu": per_token, "tokens_batch1": int(free / per_token), f"tokens_per_sequence_batch{batch}": int(free / per_token / batch)}
    return out


def driver(args: Any) -> None:
    import torch

    check_devices(args)
    args.workdir.mkdir(parents=True, exist_ok=True)
    for stale in ("single.json", "tp_rank0.json", "tp_rank1.json", "layers.json"):
        (args.workdir / stale).unlink(missing_ok=True)
    make_checkpoint(args)
    run_phase(args, "single")
    run_phase(args, "tp", torchrun=True)
    run_phase(args, "layers")
    single = json.loads((args.workdir / "single.json").read_text())
    ranks = [json.loads((args.workdir / f"tp_rank{r}.json").read_text()) for r in range(2)]
    layers = json.loads((args.workdir / "layers.json").read_text())
    ref = single["turboquant"]["tokens"]
    card = "cpu_tiny" if args.device == "cpu" else torch.cuda.get_device_name(0).replace("NVIDIA ", "").replace(" ", "_").lower()
    tp_agree = [agreement(r["turboquant"]["tokens"], ref) for r in ranks]
    layer_agree = agreement(layers["turboquant"]["tokens"], ref)
    bf16_ref = single["bf16"]["tokens"]
    control = {"tp": [agreement(r["bf16"]["tokens"], bf16_ref) for r in ranks], "layer_split": agreement(layers["bf16"]["tokens"], bf16_ref)}
    tokens = single["turboquant"]["kv_tokens_per_sequence"]
    result = {
        "issue": 13,
        "smoke_test": args.device == "cpu",
        "model": "random-weight " + ("tiny Llama" if args.tiny else "Llama-3.1-8B shape") + ", bf16",
        "batch": args.batch, "context": args.context, "steps": args.steps, "cache": cache_settings(args),
        "top1_agreement_tp_vs_one_device": tp_agree,
        "greedy_identical_tp": all(a == 1.0 for a in tp_agree),
        "top1_agreement_layer_split_vs_one_device": layer_agree,
        "top1_agreement_bf16_cache_control": control,
        "single": single, "tp_ranks": ranks, "layer_split": layers,
        "longest_context_per_gpu_tp": longest_context(ranks[0], args.batch, tokens),
        "machine": machine_info(),
    }  # fmt: skip
    rows = []
    for label, res in (("one device", single), ("TP rank 0", ranks[0]), ("TP rank 1", ranks[1]), ("layer split", layers)):
        for name in ("turboquant", "bf16"):
            kv = res[name]["kv_bytes_by_device"]
            rows.append([label, name, res[name]["decode_tokens_per_s"], " ".join(f"{d}={b / 2**20:.3f}MiB" for d, b in kv.items())])
    print(table(rows, ["run", "cache", "decode tok/s", "KV bytes per device"]))
    print(f"top-1 agreement with one device, TurboQuant: TP ranks {tp_agree}, layer split {layer_agree:.4f}")
    print(f"top-1 agreement with one device, bf16 cache (control): TP ranks {control['tp']}, layer split {control['layer_split']:.4f}")
    path = write_json(f"kv_tensor_parallel_{card}.json", result, args.out)
    log(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    args = defaults(build_parser().parse_args(argv))
    if args.role == "driver":
        driver(args)
    else:
        {"single": phase_single, "tp": phase_tp, "layers": phase_layers}[args.role](args)


if __name__ == "__main__":
    main()
