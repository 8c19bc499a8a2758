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
