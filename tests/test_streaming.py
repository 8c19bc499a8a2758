"""Streaming builds from .npy files (issue 10): chunked reads give exactly the in-memory index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from turboquant.config import TurboQuantError
from turboquant.index import TurboQuantIndex
from turboquant.streaming import build_index, iter_npy_rows


def _write(path: Path, x: np.ndarray) -> None:
    out = np.lib.format.open_memmap(path, mode="w+", dtype=x.dtype, shape=x.shape)
    for s in range(0, len(x), 1000):  # written in chunks, as a larger-than-RAM producer would
        out[s : s + 1000] = x[s : s + 1000]
    out.flush()
    del out


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_streamed_build_equals_the_in_memory_build(tmp_path: Path, dtype: type) -> None:
    x = np.random.default_rng(0).standard_normal((5_000, 48)).astype(dtype)
    path = tmp_path / "x.npy"
    _write(path, x)
    chunks = list(iter_npy_rows(path, batch=1_234))
    assert [len(c) for c in chunks] == [1234] * 4 + [64] and chunks[0].dtype == np.float32
    np.testing.assert_array_equal(np.concatenate(chunks), x.astype(np.float32))
    streamed = build_index(path, 3, "ip", batch=1_234, engine="torch")
    direct = TurboQuantIndex(48, 3, "ip", engine="torch")
    direct.add(x.astype(np.float32))
    assert torch.equal(streamed._codes, direct._codes) and torch.equal(streamed._norms, direct._norms)
    # reserved once for exactly n rows: no growth slack
    assert streamed._store.capacity == len(x)


def test_streamed_build_with_ids_and_a_bad_file(tmp_path: Path) -> None:
    x = np.random.default_rng(1).standard_normal((300, 16)).astype(np.float32)
    path = tmp_path / "x.npy"
    _write(path, x)
    index = build_index(path, 2, ids=np.arange(1000, 1300), batch=128)
    assert index.ids.tolist() == list(range(1000, 1300))
    with pytest.raises(TurboQuantError, match="ids have shape"):
        build_index(path, 2, ids=np.arange(5))
    bad = tmp_path / "bad.npy"
    np.save(bad, np.arange(10))
    with pytest.raises(TurboQuantError, match="bad.npy"):
        build_index(bad, 2)
    truncated = tmp_path / "cut.npy"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(TurboQuantError, match="cut.npy"):
        list(iter_npy_rows(truncated, 64))


def test_default_batch_bounds_the_chunk_and_equals_any_batch(tmp_path: Path) -> None:
    """The default chunk holds ~8 MiB of float32 rows (1,024-65,536 rows); the index does not depend on it."""
    from turboquant.streaming import _default_batch

    assert _default_batch(384) == (8 << 20) // (4 * 384) and _default_batch(8) == 65536 and _default_batch(8192) == 1024
    x = np.random.default_rng(2).standard_normal((3_000, 2048)).astype(np.float32)  # default: 1,024 rows, 3 chunks
    path = tmp_path / "x.npy"
    _write(path, x)
    a = build_index(path, 4, engine="torch")
    b = build_index(x, 4, engine="torch", batch=3_000)
    assert torch.equal(a._codes, b._codes) and torch.equal(a._norms, b._norms)
    for bad in (0, -5, 2.5, True):
        with pytest.raises(TurboQuantError, match="batch must be a positive int"):
            build_index(x, 4, batch=bad)
