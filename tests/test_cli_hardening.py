"""Issue 11, command line: help text everywhere, positional ``index info PATH``, errors that name
the user's files and rows, label files checked against the index."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from turboquant.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]


def _subparsers(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    out = [(parser.prog, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                out += _subparsers(child)
    return out


def _undocumented(parser: argparse.ArgumentParser) -> list[str]:
    return [
        "/".join(a.option_strings) or a.dest
        for a in parser._actions
        if not isinstance(a, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction))
        and not a.help
    ]


def _forwarded_parser(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The parser a forwarded command (demo, bench NAME) builds, caught when it prints its help."""
    caught: list[argparse.ArgumentParser] = []

    def record(self: argparse.ArgumentParser, file: object = None) -> None:
        caught.append(self)

    monkeypatch.setattr(argparse.ArgumentParser, "print_help", record)
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return caught[-1]


def test_every_index_option_has_help() -> None:
    missing = {prog: m for prog, p in _subparsers(build_parser()) if (m := _undocumented(p))}
    assert missing == {}


def test_distortion_benchmark_options_have_help() -> None:
    from conftest import load_benchmark

    assert _undocumented(load_benchmark("distortion").build_parser()) == []


def test_demo_options_have_help_and_no_rst_markup(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = _forwarded_parser(["demo"], monkeypatch)
    assert _undocumented(parser) == []
    assert "``" not in parser.format_help()


def test_no_rst_double_backticks_in_index_help() -> None:
    for prog, parser in _subparsers(build_parser()):
        assert "``" not in parser.format_help(), prog


def _index(tmp_path: Path, n: int = 40, d: int = 16, metric: str = "ip") -> Path:
    x = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert main(["index", "build", "--input", str(tmp_path / "x.npy"), "--bits", "3", "--metric", metric,
                 "--out", str(tmp_path / "x.tq"), "-q"]) == 0  # fmt: skip
    return tmp_path / "x.tq"


def test_index_info_takes_a_positional_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _index(tmp_path)
    assert main(["index", "info", str(path)]) == 0
    positional = json.loads(capsys.readouterr().out)
    assert main(["index", "info", "--index", str(path)]) == 0  # the old spelling keeps working
    assert json.loads(capsys.readouterr().out) == positional
    assert positional["vectors"] == 40 and positional["config"]["dim"] == 16
    assert positional["file_bytes"] == path.stat().st_size


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("turboquant: error: ") and err.count("\n") == 1, err
    return err


def test_labels_with_the_wrong_number_of_lines_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _index(tmp_path)
    np.save(tmp_path / "q.npy", np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32))
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"vector {i}\n" for i in range(39)))
    err = _error(["index", "search", "--index", str(path), "--queries", str(tmp_path / "q.npy"), "-k", "2",
                  "--labels", str(labels)], capsys)  # fmt: skip
    assert str(labels) in err and "39 lines" in err and "40" in err
    labels.write_text("".join(f"vector {i}\n" for i in range(40)))
    qlabels = tmp_path / "qlabels.txt"
    qlabels.write_text("only one query label\n")
    err = _error(["index", "search", "--index", str(path), "--queries", str(tmp_path / "q.npy"), "-k", "2",
                  "--labels", str(labels), "--query-labels", str(qlabels)], capsys)  # fmt: skip
    assert str(qlabels) in err and "1 lines" in err and "3 rows" in err
    # right counts: every result line carries its label
    qlabels.write_text("a\nb\nc\n")
    assert main(["index", "search", "--index", str(path), "--queries", str(tmp_path / "q.npy"), "-k", "2",
                 "--labels", str(labels), "--query-labels", str(qlabels)]) == 0  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if line.startswith("query")] == ["query 0: a", "query 1: b", "query 2: c"]
    hits = [line for line in out if not line.startswith("query")]
    assert len(hits) == 6 and all(line.rstrip().endswith(f"vector {line.split('id=')[1].split()[0]}") for line in hits)


def test_errors_name_the_users_file_and_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x = np.random.default_rng(0).standard_normal((30, 8)).astype(np.float32)
    x[17, 3] = np.nan
    bad = tmp_path / "foo.npy"
    np.save(bad, x)
    err = _error(["index", "build", "--input", str(bad), "--out", str(tmp_path / "o.tq"), "-q"], capsys)
    assert f"--input {bad} contains NaN at row 17" in err
    assert " x " not in err
    x[17, 3] = 1.0
    x[5] = 0.0
    np.save(bad, x)
    err = _error(["index", "build", "--input", str(bad), "--metric", "cosine", "--out", str(tmp_path / "o.tq")], capsys)
    assert str(bad) in err and "row 5" in err and "zero vector" in err
    assert not (tmp_path / "o.tq").exists()
    ids = np.arange(30)
    ids[9] = 4
    np.save(tmp_path / "ids.npy", ids)
    x[5] = 1.0
    np.save(bad, x)
    err = _error(["index", "build", "--input", str(bad), "--ids", str(tmp_path / "ids.npy"),
                  "--out", str(tmp_path / "o.tq")], capsys)  # fmt: skip
    assert "ids.npy" in err and "id 4 appears more than once (rows 4 and 9)" in err


def test_search_errors_name_the_users_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _index(tmp_path)
    q = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    q[2, 0] = np.inf
    np.save(tmp_path / "q.npy", q)
    err = _error(["index", "search", "--index", str(path), "--queries", str(tmp_path / "q.npy")], capsys)
    assert f"--queries {tmp_path / 'q.npy'} contains Inf at row 2" in err
    np.save(tmp_path / "q.npy", q[:, :8])
    err = _error(["index", "search", "--index", str(path), "--queries", str(tmp_path / "q.npy")], capsys)
    assert "dimension 8" in err and "d=16" in err and str(path) in err
    np.save(tmp_path / "q.npy", np.ones((2, 16), np.float32))
    err = _error(["index", "search", "--index", str(path), "--queries", str(tmp_path / "q.npy"), "-k", "50"], capsys)
    assert "-k 50" in err and "40 vectors" in err and "--clip-k" in err


def test_mismatched_quantizer_error_is_short() -> None:
    import torch

    from turboquant import TurboQuantError, TurboQuantMSE

    codes = TurboQuantMSE(64, 4, seed=1).quantize(torch.randn(3, 64))
    with pytest.raises(TurboQuantError) as exc:
        TurboQuantMSE(64, 4, seed=2).dequantize(codes)
    assert len(str(exc.value)) < 200 and "<" not in str(exc.value) and "seed" in str(exc.value)


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys\nfrom turboquant.cli import main\n"
        "try:\n    main(['index', 'build', '--help'])\nexcept SystemExit:\n    pass\n"
        "sys.stderr.write(str(sorted(m for m in ('torch', 'transformers', 'faiss') if m in sys.modules)))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.stderr.strip().splitlines()[-1] == "[]"
