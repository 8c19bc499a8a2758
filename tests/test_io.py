"""Files: round trip, atomic writes, and clear errors on corrupt or mismatched files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from turboquant import TurboQuantError, TurboQuantMSE, TurboQuantProd
from turboquant.io import load_codes, load_config, save_codes, save_config


@pytest.mark.parametrize("cls,bits", [(TurboQuantMSE, 3), (TurboQuantMSE, 2.5), (TurboQuantProd, 4)])
def test_codes_round_trip(tmp_path: Path, cls: type, bits: float) -> None:
    q = cls(128, bits, seed=3, norm_dtype="float16")
    codes = q.quantize(torch.randn(4, 5, 128))
    path = tmp_path / "codes.tq"
    save_codes(path, codes)
    loaded = load_codes(path)
    assert loaded.config == q.config
    assert torch.equal(loaded.codes, codes.codes) and torch.equal(loaded.norms, codes.norms)
    torch.testing.assert_close(q.dequantize(loaded), q.dequantize(codes), rtol=0, atol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["codes.tq"]  # no temp files left behind


def test_config_round_trip(tmp_path: Path) -> None:
    q = TurboQuantProd(96, 3.5, rotation="haar", seed=12)
    save_config(tmp_path / "c.tq", q.config)
    assert load_config(tmp_path / "c.tq") == q.config


def _saved(tmp_path: Path) -> Path:
    path = tmp_path / "codes.tq"
    save_codes(path, TurboQuantMSE(64, 4).quantize(torch.randn(50, 64)))
    return path


def test_truncated_file(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    data = path.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(TurboQuantError, match="truncated or corrupt"):
            load_codes(path)


def test_flipped_payload_byte_fails_checksum(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x5A
    path.write_bytes(bytes(data))
    with pytest.raises(TurboQuantError, match="checksum"):
        load_codes(path)


def test_wrong_kind_and_missing_file(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    with pytest.raises(TurboQuantError, match="holds 'codes'"):
        load_config(path)
    with pytest.raises(TurboQuantError, match="no such file"):
        load_codes(tmp_path / "absent.tq")
    (tmp_path / "junk.tq").write_bytes(b"\x00" * 64)
    with pytest.raises(TurboQuantError):
        load_codes(tmp_path / "junk.tq")


def test_foreign_safetensors_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(TurboQuantError, match="missing turboquant header"):
        load_codes(tmp_path / "other.safetensors")
