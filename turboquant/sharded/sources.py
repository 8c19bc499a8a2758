"""Reading embedding files for a build: ``.npy`` (memory-mapped, chunked) and Parquet (optional)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray

from ..config import TurboQuantError
from .manifest import PathLike


@dataclass(frozen=True)
class _Source:
    """One input file: ``.npy`` (2-D float, C order) or Parquet (one list-of-float column)."""

    path: str
    rows: int
    dim: int
    kind: str  # "npy" | "parquet"
    column: str | None = None
    dtype: str = "float32"
    offset: int = 0  # .npy data offset in bytes


def _inspect(path: PathLike, column: str | None) -> _Source:
    p = Path(path)
    if not p.is_file():
        raise TurboQuantError(f"input file {p} does not exist")
    if p.suffix == ".npy":
        try:
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise TurboQuantError(f"{p}: not a readable .npy file: {exc}") from None
        if not isinstance(arr, np.memmap) or arr.ndim != 2 or arr.dtype not in (np.float16, np.float32, np.float64):
            raise TurboQuantError(f"{p}: expected a 2-D float16/32/64 array, got shape {arr.shape} dtype {arr.dtype}")
        if not arr.flags.c_contiguous and arr.shape[0] > 1:
            raise TurboQuantError(f"{p}: Fortran-ordered arrays are not supported; save with np.save(C-ordered)")
        return _Source(str(p), arr.shape[0], arr.shape[1], "npy", dtype=str(arr.dtype), offset=int(arr.offset))
    if p.suffix in (".parquet", ".pq"):
        pq = _pyarrow_parquet()
        pf = pq.ParquetFile(p)
        names = pf.schema_arrow.names
        col = column or (names[0] if len(names) == 1 else None)
        if col is None or col not in names:
            raise TurboQuantError(f"{p}: name the embedding column with column=... (columns: {names})")
        rows = pf.metadata.num_rows
        first = _parquet_rows(str(p), col, 0, min(rows, 1)) if rows else None
        if first is None or first.shape[0] == 0:
            raise TurboQuantError(f"{p}: no rows")
        return _Source(str(p), rows, first.shape[1], "parquet", column=col)
    raise TurboQuantError(f"input {p.name}: expected a .npy or .parquet file")


def _pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise TurboQuantError("Parquet input needs pyarrow: pip install pyarrow") from None
    return pq


def _parquet_rows(path: str, column: str, r0: int, r1: int) -> np.ndarray:
    """Rows ``[r0, r1)`` of a list-of-float Parquet column as ``(r1 - r0, dim)`` float32.

    Reads only the row groups that overlap the range."""
    import pyarrow as pa
    import pyarrow.compute as pc

    pq = _pyarrow_parquet()
    pf = pq.ParquetFile(path)
    parts, start = [], 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        lo, hi = max(r0, start), min(r1, start + n)
        if lo < hi:
            col = pf.read_row_group(g, columns=[column]).column(column).combine_chunks().slice(lo - start, hi - lo)
            parts.append(col)
        start += n
    if not parts:
        return np.empty((0, 0), np.float32)
    arr = pa.concat_arrays(parts) if len(parts) > 1 else parts[0]
    if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type)):
        raise TurboQuantError(f"{path}: column {column!r} must be a list of floats, got {arr.type}")
    if arr.null_count:
        raise TurboQuantError(f"{path}: column {column!r} has null rows")
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    if lengths.size and (lengths != lengths[0]).any():
        raise TurboQuantError(f"{path}: column {column!r} has rows of different lengths")
    values = arr.flatten()
    if not pa.types.is_floating(values.type):
        raise TurboQuantError(f"{path}: column {column!r} must hold floats, got {values.type}")
    dim = int(lengths[0]) if lengths.size else 0
    return values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(arr), dim)


def _read_rows(src: _Source, r0: int, r1: int) -> np.ndarray:
    """Rows ``[r0, r1)`` of an input. ``.npy``: a memory map of just those rows, copied and unmapped,
    so a worker's resident memory stays one chunk however large the file."""
    if src.kind == "parquet":
        assert src.column is not None
        return _parquet_rows(src.path, src.column, r0, r1)
    dtype = np.dtype(src.dtype)
    mm = np.memmap(src.path, dtype=dtype, mode="r", offset=src.offset + r0 * src.dim * dtype.itemsize,
                   shape=(r1 - r0, src.dim))  # fmt: skip
    out = np.array(mm)
    del mm
    return out


@dataclass(frozen=True)
class _IdSource:
    """Explicit ids: one int64 ``.npy`` per input (``per_input``) or one for all rows, or an in-memory array."""

    paths: tuple[str, ...] = ()
    array: Any = None  # np.ndarray (driver) or a Ray ObjectRef (tasks)

    def read(self, sources: Sequence[_Source], starts: Sequence[int], seg: tuple[int, int, int]) -> np.ndarray:
        i, r0, r1 = seg
        if len(self.paths) > 1:
            return np.asarray(np.load(self.paths[i], mmap_mode="r")[r0:r1], dtype=np.int64)
        g0 = starts[i] + r0
        if self.paths:
            return np.asarray(np.load(self.paths[0], mmap_mode="r")[g0 : g0 + r1 - r0], dtype=np.int64)
        arr = ray.get(self.array) if isinstance(self.array, ray.ObjectRef) else self.array
        return np.asarray(arr[g0 : g0 + r1 - r0], dtype=np.int64)


def _check_ids_file(path: Path, n: int, what: str) -> None:
    if not path.is_file() or path.suffix != ".npy":
        raise TurboQuantError(f"ids file {path} does not exist or is not a .npy file")
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    if arr.ndim != 1 or arr.shape[0] != n or arr.dtype.kind not in "iu":
        raise TurboQuantError(f"{path}: ids must be a 1-D integer array of {n} ({what}), got {arr.dtype}{arr.shape}")
