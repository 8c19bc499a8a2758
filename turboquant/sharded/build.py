"""Building a sharded index: one Ray task per shard, each writing one index file; the manifest last."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from ..config import TurboQuantError
from ..index import TurboQuantIndex
from .manifest import MANIFEST, Manifest, PathLike, ShardInfo, _CHUNK_ROWS
from .sources import _IdSource, _Source, _check_ids_file, _inspect, _read_rows


def _peak_rss() -> int:
    """Peak resident set of this process in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - non-Linux
        return _peak_rss()


@ray.remote(num_cpus=1)
def _build_shard(
    out: str,
    index_kwargs: dict[str, Any],
    sources: list[_Source],
    starts: list[int],
    segments: list[tuple[int, int, int]],
    id_source: _IdSource | None,
    id_start: int,
    chunk_rows: int,
) -> dict[str, Any]:
    """Ray task: encode the rows of ``segments`` (input, row0, row1) into one shard file ``out``."""
    t0, rss0 = time.perf_counter(), _rss()
    kw = dict(index_kwargs)
    index = TurboQuantIndex(kw.pop("dim"), kw.pop("bits"), kw.pop("metric"), engine="torch", **kw)
    id_max = id_start - 1
    for seg in segments:
        i, r0, r1 = seg
        for c0 in range(r0, r1, chunk_rows):
            c1 = min(r1, c0 + chunk_rows)
            x = _read_rows(sources[i], c0, c1)
            if id_source is None:  # contiguous: local ids continue 0, 1, ... (implicit, not stored)
                index.add(x)
                id_max += c1 - c0
            else:
                ids = id_source.read(sources, starts, (i, c0, c1))
                index.add(x, ids - id_start)
                id_max = max(id_max, int(ids.max()))
    index.save(out)
    return {
        "file": Path(out).name, "count": len(index), "id_max": id_max, "seconds": time.perf_counter() - t0,
        "pid": os.getpid(), "rss_start": rss0, "peak_rss": _peak_rss(),
    }  # fmt: skip


def _ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address is not None:
            kwargs["address"] = address
        elif num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        ray.init(**kwargs)


def build(
    inputs: Sequence[PathLike],
    out_dir: PathLike,
    *,
    bits: float,
    metric: str = "ip",
    rotation: str = "haar",
    seed: int = 0,
    norm_dtype: str = "float32",
    correction: bool = True,
    num_shards: int | None = None,
    ids: PathLike | Sequence[PathLike] | np.ndarray | None = None,
    column: str | None = None,
    chunk_rows: int = _CHUNK_ROWS,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Build a sharded index from ``.npy`` / Parquet embedding files with parallel Ray tasks.

    The inputs form one collection of ``N = sum(rows)`` vectors in the given order, cut into
    ``num_shards`` contiguous, balanced row ranges; one Ray task (``num_cpus=1``; as many run at
    once as the cluster has CPUs) encodes each range chunk by chunk (``chunk_rows`` rows of
    ``(chunk_rows, dim)`` float, read through a memory map of just those rows) and writes one
    shard file. The manifest is written last, atomically: a directory without ``manifest.json``
    is not an index. Uses the running Ray cluster, or starts a local one.

    Args:
        inputs: ``.npy`` files (2-D float16/32/64, C order) and/or ``.parquet`` files whose
            ``column`` (default: the only column) is a list / fixed-size list of floats.
        out_dir: directory to create (must be empty or absent unless ``overwrite``).
        bits, metric, rotation, seed, norm_dtype, correction: as :class:`TurboQuantIndex`.
        num_shards: number of shard files (default: one per input file).
        ids: optional explicit non-negative int64 ids: one ``.npy`` of ``N`` ids, one ``.npy``
            per input, or an array of ``N``. They must increase from shard to shard (each
            shard's smallest id above the previous shard's largest); default ``0..N-1``.
        chunk_rows: rows encoded per step inside a task.

    Returns:
        build report: ``count``, ``shards`` (per-task count, seconds, pid, start and peak RSS
        bytes), ``seconds`` (wall time of the build), ``manifest`` path.
    """
    t0 = time.perf_counter()
    if not inputs:
        raise TurboQuantError("inputs is empty; give at least one .npy or .parquet file")
    sources = [_inspect(p, column) for p in inputs]
    dims = {s.dim for s in sources}
    if len(dims) != 1:
        raise TurboQuantError(f"inputs have different dimensions {sorted(dims)}: " + ", ".join(s.path for s in sources))
    dim = dims.pop()
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise TurboQuantError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    index_kwargs = {"dim": dim, "bits": bits, "metric": metric, "rotation": str(getattr(rotation, "value", rotation)),
                    "seed": seed, "norm_dtype": norm_dtype, "correction": bool(correction)}  # fmt: skip
    # validate the configuration on the driver (clear errors before any task starts)
    kw = dict(index_kwargs)
    TurboQuantIndex(kw.pop("dim"), kw.pop("bits"), kw.pop("metric"), engine="torch", **kw)
    rows = [s.rows for s in sources]
    total = sum(rows)
    if total == 0:
        raise TurboQuantError("the inputs hold no vectors")
    n_shards = len(sources) if num_shards is None else num_shards
    if isinstance(n_shards, bool) or not isinstance(n_shards, int) or not 1 <= n_shards <= total:
        raise TurboQuantError(f"num_shards must be an int in [1, {total}] (number of vectors), got {num_shards!r}")
    starts = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64).tolist()
    bounds = np.linspace(0, total, n_shards + 1).round().astype(np.int64).tolist()
    plans = []  # per shard: [(input, r0, r1)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        segs = []
        for i, (s0, s1) in enumerate(zip(starts[:-1], starts[1:])):
            lo, hi = max(a, s0), min(b, s1)
            if lo < hi:
                segs.append((i, lo - s0, hi - s0))
        plans.append(segs)

    id_source, id_starts, id_maxes = None, [int(a) for a in bounds[:-1]], [int(b) - 1 for b in bounds[1:]]
    if ids is not None:
        id_source = _make_id_source(ids, sources, total)
        id_starts, id_maxes = [], []
        for segs in plans:  # per-shard id range, read on the driver: fail before any task runs
            lo, hi = None, None
            for seg in segs:
                part = id_source.read(sources, starts, seg)
                if part.size and part.min() < 0:
                    raise TurboQuantError(f"ids must be non-negative, got {part.min()}")
                lo = int(part.min()) if lo is None else min(lo, int(part.min()))
                hi = int(part.max()) if hi is None else max(hi, int(part.max()))
            if id_maxes and lo is not None and lo <= id_maxes[-1]:
                raise TurboQuantError(
                    f"explicit ids must increase from shard to shard: shard {len(id_starts)} holds id {lo}, "
                    f"shard {len(id_starts) - 1} holds id {id_maxes[-1]}; sort the inputs by id or use fewer shards"
                )
            id_starts.append(0 if not id_starts else int(lo))  # shard 0 owns [0, ...)
            id_maxes.append(int(hi))

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise TurboQuantError(f"{out} exists and is not empty; pass overwrite=True to replace its index")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the old index stops being one before its shards change
    _ensure_ray()
    ids_arg = id_source
    if id_source is not None and id_source.array is not None:  # one object-store copy for all tasks
        ids_arg = _IdSource(array=ray.put(np.asarray(id_source.array, dtype=np.int64)))
    names = [f"shard-{j:05d}.tq" for j in range(n_shards)]
    refs = [
        _build_shard.remote(
            str(out / names[j]), index_kwargs, sources, starts, plans[j], ids_arg, id_starts[j], chunk_rows
        )
        for j in range(n_shards)
    ]
    try:
        reports = ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, TurboQuantError):
            raise TurboQuantError(f"building a shard failed: {exc.cause}") from None
        raise
    shards = tuple(ShardInfo(r["file"], id_starts[j], r["count"], r["id_max"]) for j, r in enumerate(reports))
    next_id = max(s.id_max for s in shards) + 1
    manifest = Manifest(index_kwargs, next_id, shards)
    manifest.write(out)
    return {"count": total, "shards": reports, "seconds": time.perf_counter() - t0, "manifest": str(out / MANIFEST)}


def _make_id_source(ids: Any, sources: Sequence[_Source], total: int) -> _IdSource:
    if isinstance(ids, (str, os.PathLike)):
        _check_ids_file(Path(ids), total, "all inputs")
        return _IdSource(paths=(str(ids),))
    if isinstance(ids, (np.ndarray, torch.Tensor)):
        arr = ids.cpu().numpy() if isinstance(ids, torch.Tensor) else ids
        if arr.ndim != 1 or arr.shape[0] != total or (arr.size and arr.dtype.kind not in "iu"):
            raise TurboQuantError(f"ids must be a 1-D integer array of {total} ids, got {arr.dtype}{arr.shape}")
        return _IdSource(array=arr)
    paths = [Path(p) for p in ids]
    if len(paths) != len(sources):
        raise TurboQuantError(f"ids lists {len(paths)} files for {len(sources)} inputs; give one per input")
    for p, s in zip(paths, sources):
        _check_ids_file(p, s.rows, s.path)
    if len(paths) == 1:  # one input: the same as one file for all rows
        return _IdSource(paths=(str(paths[0]),))
    return _IdSource(paths=tuple(str(p) for p in paths))
