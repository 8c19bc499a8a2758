"""Streaming index builds from ``.npy`` files larger than RAM.

The input is read with plain file reads, one chunk of rows at a time (never memory-mapped as a
whole: a mapped file's touched pages count towards the process's resident memory), converted to
float32 per chunk, and appended to a :class:`~turboquant.index.TurboQuantIndex` whose buffers
were reserved once for all rows. Peak memory is therefore the codes and norms (plus ids when given)
and one chunk: for d=384 at 4 bits, 196 B/vector plus ``batch × 384 × 4`` bytes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .config import Metric, TurboQuantError
from .index import TurboQuantIndex


def npy_shape(path: str | os.PathLike[str]) -> tuple[tuple[int, int], np.dtype, int]:
    """``(shape, dtype, data_offset)`` of a 2-D float C-order ``.npy`` file, read from its header only."""
    path = Path(path)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)  # maps, reads no data pages
    except (OSError, ValueError) as exc:
        raise TurboQuantError(f"{path}: not a readable .npy file: {exc}") from None
    if not isinstance(arr, np.memmap) or arr.ndim != 2 or arr.dtype.kind != "f" or not arr.flags.c_contiguous:
        raise TurboQuantError(f"{path}: expected a 2-D C-order float array, got shape {arr.shape} dtype {arr.dtype}")
    shape, dtype, offset = (int(arr.shape[0]), int(arr.shape[1])), arr.dtype, int(arr.offset)
    del arr
    return shape, dtype, offset


def iter_npy_rows(path: str | os.PathLike[str], batch: int = 65536) -> Iterator[np.ndarray]:
    """Float32 chunks ``(≤ batch, d)`` of a 2-D ``.npy`` file, read sequentially (memory: one chunk)."""
    (n, d), dtype, offset = npy_shape(path)
    row = d * dtype.itemsize
    with open(path, "rb") as fh:
        fh.seek(offset)
        for start in range(0, n, batch):
            rows = min(batch, n - start)
            buf = fh.read(rows * row)
            if len(buf) != rows * row:
                raise TurboQuantError(f"{path}: truncated at row {start + len(buf) // row} of {n}")
            yield np.frombuffer(buf, dtype=dtype).reshape(rows, d).astype(np.float32, copy=False)


def build_index(
    source: str | os.PathLike[str] | np.ndarray,
    bits: float,
    metric: Metric | str = Metric.IP,
    *,
    ids: np.ndarray | None = None,
    batch: int | None = None,
    progress: bool = False,
    **options: Any,
) -> TurboQuantIndex:
    """Build a :class:`~turboquant.index.TurboQuantIndex` from a ``.npy`` file (or an array) in chunks.

    Args:
        source: path of a 2-D float ``.npy`` file (streamed; may exceed RAM) or an array
            (e.g. ``np.load(path, mmap_mode="r")``), read ``batch`` rows at a time (default: 8 MiB
            of float32 input, 1,024-65,536 rows: encoding a row takes ~15x its float32 bytes in
            temporaries, so the build peaks near codes + ~100 MiB whatever ``d``).
        bits, metric, options: as for :class:`~turboquant.index.TurboQuantIndex`; ``engine="torch"``
            skips the fast-scan mirror (built on first search instead), the least memory.
        ids: optional ``(n,)`` ids (unique).
        progress: show a tqdm progress bar on stderr.

    All or nothing per chunk: a bad chunk raises and the partial index is discarded.
    """
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise TurboQuantError(f"batch must be a positive int, got {batch!r}")
    if isinstance(source, (str, os.PathLike)):
        (n, d), _, _ = npy_shape(source)
        rows = batch or _default_batch(d)
        chunks: Iterator[np.ndarray] = iter_npy_rows(source, rows)
    else:
        if source.ndim != 2:
            raise TurboQuantError(f"source must be 2-D, got shape {source.shape}")
        n, d = source.shape
        rows = batch or _default_batch(d)
        chunks = (np.asarray(source[s : s + rows], dtype=np.float32) for s in range(0, n, rows))
    if ids is not None and np.shape(ids) != (n,):
        raise TurboQuantError(f"ids have shape {np.shape(ids)}, expected ({n},)")
    index = TurboQuantIndex(d, bits, metric, **options)
    index.reserve(n)  # one allocation of exactly n rows: no 2x growth slack
    from tqdm import tqdm

    with tqdm(total=n, desc="encoding", unit="vec", unit_scale=True, disable=not progress, file=sys.stderr, leave=False) as bar:
        done = 0
        for x in chunks:
            index.add(x, None if ids is None else ids[done : done + len(x)])
            done += len(x)
            bar.update(len(x))
    return index


def _default_batch(dim: int) -> int:
    # 8 MiB of float32 rows: the temporaries of one chunk (~15x its bytes) stay near 100 MiB; at 5M
    # vectors of d=384 that keeps the build within codes + 10% (benchmarks/ann_scale.py)
    return max(1024, min(65536, (8 << 20) // (4 * max(dim, 1))))


__all__ = ["build_index", "iter_npy_rows", "npy_shape"]
