"""The ``turboquant`` command: subcommand wiring (the index commands are tested in test_index.py)."""

from __future__ import annotations

import json

import pytest

from turboquant.cli import main


@pytest.mark.parametrize("argv, usage", [
    (["demo", "--help"], "usage: turboquant demo"),
    (["bench", "distortion", "--help"], "usage: turboquant bench distortion"),
])  # fmt: skip
def test_forwarded_commands_own_their_options(argv: list[str], usage: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    assert usage in capsys.readouterr().out


def test_unknown_benchmark_and_missing_command_fail(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["bench", "nope"], []):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_bench_distortion_runs_through_the_cli(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "distortion", "--quick", "--dims", "64", "--bits", "2", "--no-real", "--no-rotation",
                 "--no-plot", "--out", str(tmp_path)])  # fmt: skip
    assert code == 0
    result = json.loads((tmp_path / "distortion.json").read_text())
    (row,) = [r for r in result["random"] if r["variant"] == "mse" and r["rotation"] == "hadamard"]
    assert (row["dim"], row["bits"]) == (64, 2)
    assert abs(row["mse_rel_err"]) < 0.05  # measured MSE vs the exact Lloyd-Max cost
