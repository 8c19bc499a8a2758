#!/usr/bin/env python
"""Can the model still find a pass key in long context through each KV cache? Needle in a haystack on SmolLM2-135M (CPU).

A random 5-digit pass key is hidden at a random sentence boundary in filler text of
``--lengths`` tokens (default 1k/2k/4k/8k, ``--trials`` per length); the full-precision prefill
(a shared filler prefix reused across trials) is copied into each cache, the question is fed
through the cache and the greedy answer is checked for the key (exact match). Also reported:
the teacher-forced log-probability of the key (a graded score, far less noisy than exact match
on 20 trials) and, for formats whose prompt does not end in a space, a *digit-restricted* greedy
answer (a forced space, then the argmax over the ten digit tokens, five times): it separates
"the cache still lets the model find the key" from "the model chose to answer with the digits",
which a 135M model does only 60-90% of the time even in full precision.

    python benchmarks/kv_needle.py --quick
    python benchmarks/kv_needle.py                      # 4 lengths x 20 trials (hours on 2 shared cores)
    python benchmarks/kv_needle.py --format auto        # pick plain vs chat by an fp32 pilot

Writes ``benchmarks/results/kv_needle.json`` and ``.png`` (the committed run is ``needle`` in
``results/kv_quality.json``).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import torch

from _common import RESULTS, log, parser, pyplot, save_figure, table, write_json
from _kv import Spec, add_model_args, fill, hf_spec, load_model, prefill_kv, runnable, tq_spec

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
    # 4, 3, 2.5 and 2 bits averaged over K and V, and HF's peers.
    return [Spec("fp32", "fp32"), tq_spec(4, 4), tq_spec(3, 3), tq_spec(3, 2), tq_spec(2, 2), hf_spec("quanto", 4), hf_spec("quanto", 2)]


def plot_needle(nd: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for name, rates in nd["rates"].items():
        ls = sorted(rates)
        ax.plot(ls, [rates[n] for n in ls], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="context tokens", ylabel="pass-key exact match", title=f"needle in a haystack ({nd['trials']} trials/length, {nd['format']})")
    ax.legend(fontsize=7)
    save_figure(fig, path, dpi=120)


def needle_tables(nd: dict[str, Any]) -> str:
    lengths = nd["lengths"]
    parts = [(f"needle exact match ({nd['format']}, {nd['trials']} trials/length)", nd["rates"])]
    if nd["format"] != "plain_space":
        parts.append(("digit-restricted greedy answer exact match (retrieval without the answer-format choice)", nd["digits_rates"]))
    if "mean_key_logprob" in nd:
        parts.append(("mean teacher-forced log-prob of the pass key (nats; 0 = certain)", nd["mean_key_logprob"]))
    return "\n\n".join(title + "\n" + table([[name, *(float(v[n]) for n in lengths)] for name, v in values.items()],
                                            ["config", *map(str, lengths)], floatfmt=".2f")
                       for title, values in parts)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    add_model_args(p)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 trial at 384 tokens, fp32 and TQ K4/V2")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--lengths", default="1024,2048,4096,8192")
    p.add_argument("--format", default="plain_space", choices=["auto", *FORMATS])
    p.add_argument("--pilot-trials", type=int, default=10, help="fp trials at the shortest length per format (auto)")
    p.add_argument("--no-logprob", action="store_true", help="skip the teacher-forced pass-key log-probability pass")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default results/kv_needle.json, --quick: kv_needle_quick.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.trials, args.lengths = 1, "384"
    out = args.out or RESULTS / ("kv_needle_quick.json" if args.quick else "kv_needle.json")
    lengths = [int(x) for x in args.lengths.split(",")]
    t_start = time.time()
    model, tok, results = load_model(args)
    fmt = args.format
    if fmt == "auto":
        pilot = {}
        for f in ("plain", "chat"):
            r = run_needle(model, tok, [Spec("fp32", "fp32")], f, [lengths[0]], args.pilot_trials, args.seed + 1, label=f"pilot-{f}")
            pilot[f] = r["rates"]["fp32"][lengths[0]]
        fmt = max(("plain", "chat"), key=lambda f: pilot[f])  # ties -> plain
        results["needle_format_pilot"] = {"fp32_rate_at_length": lengths[0], "trials": args.pilot_trials, **pilot, "chosen": fmt}
        log(f"needle format pilot: {pilot} -> {fmt}")
    specs = needle_specs()
    if args.quick:
        specs = [Spec("fp32", "fp32"), tq_spec(4, 2)]
    results["needle"] = nd = run_needle(model, tok, runnable(specs), fmt, lengths, args.trials, args.seed, logprob=not args.no_logprob)
    print("\n" + needle_tables(nd))
    print("prefill s per length:", nd["prefill_s"])
    results["total_wall_s"] = round(time.time() - t_start, 1)
    write_json(out.name, results, out.parent)
    plot_needle(nd, out.with_suffix(".png"))
    log(f"done in {time.time() - t_start:.0f}s -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
