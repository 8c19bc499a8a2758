"""Issue 11, files: modes honour the umask, errors name the user's path, header fields range-checked."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from turboquant import TurboQuantError, TurboQuantMSE
from turboquant.config import QuantizerConfig
from turboquant.index import TurboQuantIndex
from turboquant.io import load_codes, save_codes, save_config


def _save_all(folder: Path) -> list[Path]:
    save_codes(folder / "c.tq", TurboQuantMSE(32, 3).quantize(torch.randn(4, 32)))
    save_config(folder / "cfg.tq", QuantizerConfig(32, 3))
    index = TurboQuantIndex(16, 4, engine="torch")
    index.add(np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32))
    index.save(folder / "i.tq")
    return [folder / "c.tq", folder / "cfg.tq", folder / "i.tq"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_saved_files_honour_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        paths = _save_all(tmp_path)
    finally:
        os.umask(old)
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in paths} == {p.name: oct(mode) for p in paths}


def test_saving_into_a_missing_folder_names_the_users_path(tmp_path: Path) -> None:
    target = tmp_path / "no" / "such" / "x.tq"
    codes = TurboQuantMSE(32, 3).quantize(torch.randn(2, 32))
    with pytest.raises(TurboQuantError) as exc:
        save_codes(target, codes)
    assert str(target) in str(exc.value) and ".tmp" not in str(exc.value) and "does not exist" in str(exc.value)
    index = TurboQuantIndex(16, 4, engine="torch")
    with pytest.raises(TurboQuantError, match="x.tq"):
        index.save(target)
    assert not (tmp_path / "no").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_saving_into_a_read_only_folder_names_the_users_path(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(TurboQuantError, match="ro/x.tq"):
            save_codes(folder / "x.tq", TurboQuantMSE(32, 3).quantize(torch.randn(2, 32)))
    finally:
        folder.chmod(0o755)


def test_stale_temporaries_of_dead_savers_are_removed_by_the_next_save(tmp_path: Path) -> None:
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)  # a PID that no longer runs: its temporaries are stale
    stale = [tmp_path / f".c.tq.{dead}.{'ab' * 8}.tmp", tmp_path / f".c.tq.{os.getpid()}.{'cd' * 8}.tmp"]
    other_live = tmp_path / f".c.tq.{os.getppid()}.{'ef' * 8}.tmp"  # a running process: maybe mid-save
    unrelated = [tmp_path / f".d.tq.{dead}.{'ab' * 8}.tmp", tmp_path / "notes.tmp"]
    for p in [*stale, other_live, *unrelated]:
        p.write_bytes(b"partial")
    save_codes(tmp_path / "c.tq", TurboQuantMSE(32, 3).quantize(torch.randn(2, 32)))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["c.tq", other_live.name, *(p.name for p in unrelated)])


def test_require_helpers_name_file_and_field() -> None:
    from turboquant.io import require_bool, require_choice, require_int

    header = {"count": 2**70, "flag": 1, "metric": "dot", "n": 5}
    assert require_int("f.tq", header, "n", 0, 10) == 5
    with pytest.raises(TurboQuantError, match=r"f.tq: header field 'count' = .* out of range \[0, 100\]"):
        require_int("f.tq", header, "count", 0, 100)
    with pytest.raises(TurboQuantError, match="'missing' must be an integer, got None"):
        require_int("f.tq", header, "missing", 0, 100)
    with pytest.raises(TurboQuantError, match="'flag' must be true or false"):
        require_bool("f.tq", header, "flag")
    with pytest.raises(TurboQuantError, match="'metric' = 'dot' is not one of"):
        require_choice("f.tq", header, "metric", ("ip", "l2"))


def test_config_range_checks_name_the_field() -> None:
    for kwargs, field in [({"seed": 2**64}, "seed"), ({"seed": -1}, "seed"), ({"dim": 2**17}, "dim"),
                          ({"bits": 10**400}, "bits"), ({"version": True}, "version")]:  # fmt: skip
        with pytest.raises(TurboQuantError, match=field):
            QuantizerConfig(**{"dim": 64, "bits": 4, **kwargs})
    assert QuantizerConfig(64, 4, seed=2**64 - 1).seed == 2**64 - 1


def test_legacy_files_without_a_header_checksum_still_load(tmp_path: Path) -> None:
    # files written before the header checksum existed: same fields, no header_checksum
    import json

    import _file_mutations as fm

    path = tmp_path / "c.tq"
    codes = TurboQuantMSE(32, 3).quantize(torch.randn(3, 32))
    save_codes(path, codes)
    p = fm.parse(path.read_bytes())
    header = p.header
    del header["header_checksum"]
    p.metadata = {"turboquant": json.dumps(header)}
    path.write_bytes(fm.build(p))
    assert torch.equal(load_codes(path).codes, codes.codes)
    header["stray"] = 1  # but an unknown field without a header checksum is corruption
    p.metadata = {"turboquant": json.dumps(header)}
    path.write_bytes(fm.build(p))
    with pytest.raises(TurboQuantError, match="unknown fields"):
        load_codes(path)
