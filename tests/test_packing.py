"""Bit packing: exact LSB-first bit-stream layout for widths 1..8."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from turboquant.config import TurboQuantError
from turboquant.packing import pack_codes, packed_size, unpack_codes


def _reference_pack(codes: list[int], width: int) -> bytes:
    stream = 0
    for j, c in enumerate(codes):
        stream |= c << (j * width)
    return stream.to_bytes(packed_size(len(codes), width), "little")


@settings(max_examples=200, deadline=None)
@given(width=st.integers(1, 8), data=st.data())
def test_pack_matches_python_bitstream(width: int, data: st.DataObject) -> None:
    codes = data.draw(st.lists(st.integers(0, (1 << width) - 1), min_size=1, max_size=70))
    packed = pack_codes(torch.tensor(codes), width)
    assert bytes(packed.tolist()) == _reference_pack(codes, width)
    assert packed.shape[-1] == packed_size(len(codes), width)
    assert unpack_codes(packed, width, len(codes)).tolist() == codes


@pytest.mark.parametrize("width", range(1, 9))
@pytest.mark.parametrize("shape", [(5,), (3, 4), (2, 3, 7)])
def test_round_trip_batched(width: int, shape: tuple[int, ...]) -> None:
    n = 37
    codes = torch.randint(0, 1 << width, (*shape, n), dtype=torch.uint8)
    packed = pack_codes(codes, width)
    assert packed.shape == (*shape, (n * width + 7) // 8)
    assert torch.equal(unpack_codes(packed, width, n), codes)


def test_errors() -> None:
    with pytest.raises(TurboQuantError):
        pack_codes(torch.zeros(4, dtype=torch.uint8), 9)
    with pytest.raises(TurboQuantError, match="bytes per vector"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, 8)
    with pytest.raises(TurboQuantError, match="uint8"):
        unpack_codes(torch.zeros(4, dtype=torch.int32), 4, 8)
