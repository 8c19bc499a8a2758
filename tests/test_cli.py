"""The ``turboquant`` command: subcommand wiring (the index commands are tested in test_index.py)."""

from __future__ import annotations

import pytest

from turboquant.cli import main


def test_demo_owns_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    assert "usage: turboquant demo" in capsys.readouterr().out


def test_unknown_and_missing_command_fail(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["bench", "distortion"], []):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    assert "invalid choice: 'bench'" in capsys.readouterr().err


def test_demo_scores_caches_side_by_side() -> None:
    """The demo's quality/speed table: every cache scores the same tokens as a lone full-precision run."""
    import torch
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from turboquant import TurboQuantCache
    from turboquant.demo.run import score_continuations

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, vocab_size=200)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 200, (1, 40), generator=torch.Generator().manual_seed(1))
    caches = {"a": DynamicCache(config=cfg), "b": DynamicCache(config=cfg), "tq": TurboQuantCache(cfg, window=4, sink_tokens=2, flush_every=0)}
    res = score_continuations(model, ids, 30, caches, progress=False)
    with torch.no_grad():  # reference: the whole sequence at once
        logp = model(ids).logits[0, 29:-1].float().log_softmax(-1)
    ref = -logp.gather(-1, ids[0, 30:, None])[:, 0]
    torch.testing.assert_close(res["a"].nll, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(res["a"].nll, res["b"].nll) and torch.equal(res["a"].argmax, res["b"].argmax)
    assert res["tq"].nll.shape == ref.shape and not torch.equal(res["tq"].nll, res["a"].nll)  # compressed history
    assert all(len(r.step_seconds) == 9 for r in res.values())
