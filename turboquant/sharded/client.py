"""Searching and updating a sharded index through Ray actors that hold its shards; the CLI entry points."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError

from ..config import TurboQuantError
from ..index import TurboQuantIndex
from .build import _ensure_ray, _peak_rss, _rss, build
from .manifest import Manifest, PathLike, ShardInfo, _owner


@ray.remote
class _ShardActor:
    """Holds (memory-maps) some shard files. Ray re-runs ``__init__`` on restart: it reloads the files."""

    def __init__(self, directory: str, files: dict[int, str], engine: str, mmap: bool) -> None:
        self.directory = Path(directory)
        self.files = files
        self.engine = engine
        self.shards = {j: TurboQuantIndex.load(self.directory / f, mmap=mmap, engine=engine) for j, f in files.items()}
        self.loaded_at = time.time()

    def counts(self) -> dict[int, int]:
        return {j: len(ix) for j, ix in self.shards.items()}

    def search(self, q: np.ndarray, k: int, offsets: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Top-k over this actor's shards: ``(nq, <=k)`` scores and global ids, pre-merged."""
        parts_d, parts_i = [], []
        metric = None
        for j, ix in self.shards.items():
            if len(ix) == 0:
                continue
            d, i = ix.search(q, min(k, len(ix)))
            parts_d.append(d)
            parts_i.append(i + offsets[j])
            metric = ix.metric
        if not parts_d:
            return np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.int64)
        return merge_topk(parts_d, parts_i, k, metric == "l2")

    def missing(self, j: int, local_ids: np.ndarray) -> np.ndarray:
        """The ids among ``local_ids`` that shard ``j`` does not hold."""
        return local_ids[~np.isin(local_ids, self.shards[j].ids)]

    def max_id(self, j: int) -> int:
        ids = self.shards[j].ids
        return int(ids.max()) if ids.size else -1

    def add(self, j: int, x: np.ndarray, local_ids: np.ndarray, save: bool) -> int:
        self.shards[j].add(x, local_ids)
        if save:
            self.shards[j].save(self.directory / self.files[j])
        return len(self.shards[j])

    def remove(self, j: int, local_ids: np.ndarray, save: bool) -> int:
        removed = self.shards[j].remove(local_ids)
        if save:
            self.shards[j].save(self.directory / self.files[j])
        return removed

    def save(self) -> None:
        for j, ix in self.shards.items():
            ix.save(self.directory / self.files[j])

    def stats(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(), "rss": _rss(), "peak_rss": _peak_rss(), "loaded_at": self.loaded_at,
            "shards": {j: {"count": len(ix), "memory_bytes": ix.memory_bytes} for j, ix in self.shards.items()},
        }  # fmt: skip


def merge_topk(
    scores: Sequence[np.ndarray], ids: Sequence[np.ndarray], k: int, ascending: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard ``(nq, k_j)`` results into ``(nq, min(k, sum k_j))``: best score first, ties by smaller id."""
    d, i = np.concatenate(scores, axis=1), np.concatenate(ids, axis=1)
    order = np.lexsort((i, d if ascending else -d), axis=-1)[:, :k]
    return np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)


# --------------------------------------------------------------------------- client


class ShardedIndex:
    """Client of a sharded index directory: Ray actors hold the shards, ``search`` merges their top-k.

    Args:
        directory: the index directory written by :func:`build` (``manifest.json`` + shard files).
        num_actors: shard actors (default: one per shard); shard ``j`` lives on actor ``j % num_actors``.
        engine: per-shard search engine: ``"torch"`` (exact; identical to one
            ``TurboQuantIndex(engine="torch")``), ``"fastscan"`` or ``"auto"`` (see module docstring).
        mmap: actors memory-map their shard files (pages shared with the OS cache).
        timeout: seconds a call waits for the actors (a search during an actor restart waits this long).
        max_restarts: Ray restarts per actor after a crash (each reloads its shard files).
        write_through: ``add``/``remove`` rewrite the owning shard file before returning.
        address: Ray cluster address (default: the running one, else a new local cluster).
        actor_options: extra ``.options(...)`` for the actors (e.g. ``{"num_cpus": 1}``).
    """

    def __init__(
        self,
        directory: PathLike,
        *,
        num_actors: int | None = None,
        engine: str = "torch",
        mmap: bool = True,
        timeout: float = 120.0,
        max_restarts: int = 3,
        write_through: bool = True,
        address: str | None = None,
        actor_options: dict[str, Any] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self._manifest = Manifest.read(self.directory)
        for s in self._manifest.shards:
            if not (self.directory / s.file).is_file():
                raise TurboQuantError(f"{self.directory}: shard file {s.file} listed in the manifest is missing")
        if engine not in ("torch", "fastscan", "auto"):
            raise TurboQuantError(f"engine={engine!r} is not supported; choose 'torch', 'fastscan' or 'auto'")
        n_shards = len(self._manifest.shards)
        n_actors = n_shards if num_actors is None else num_actors
        if isinstance(n_actors, bool) or not isinstance(n_actors, int) or not 1 <= n_actors <= n_shards:
            raise TurboQuantError(
                f"num_actors must be an int in [1, {n_shards}] (number of shards), got {num_actors!r}"
            )
        if not timeout > 0:
            raise TurboQuantError(f"timeout must be positive seconds, got {timeout!r}")
        self.engine, self.timeout, self.write_through = engine, float(timeout), bool(write_through)
        self._lock = threading.RLock()
        _ensure_ray(address)
        self._actor_of = [j % n_actors for j in range(n_shards)]
        opts = {"max_restarts": max_restarts, "max_task_retries": 0, "num_cpus": 0, **(actor_options or {})}
        self.actors = [
            _ShardActor.options(**opts).remote(
                str(self.directory),
                {j: s.file for j, s in enumerate(self._manifest.shards) if self._actor_of[j] == a},
                engine,
                mmap,
            )
            for a in range(n_actors)
        ]
        self._reconcile()

    # ----------------------------------------------------------------- bookkeeping

    def _call(self, refs: list[Any], what: str) -> list[Any]:
        try:
            return ray.get(refs, timeout=self.timeout)
        except GetTimeoutError:
            raise TurboQuantError(
                f"{what}: shard actors did not answer within timeout={self.timeout:g} s (restarting or overloaded)"
            ) from None
        except RayActorError as exc:
            raise TurboQuantError(
                f"{what}: a shard actor died and could not be restarted (max_restarts exhausted?): {exc}"
            ) from None
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, TurboQuantError):  # bad input found by a shard: same message as one index
                raise TurboQuantError(str(exc.cause)) from None
            raise

    def _reconcile(self) -> None:
        """Counts from the shard files win over the manifest (a crash between the two writes)."""
        counts: dict[int, int] = {}
        for c in self._call([a.counts.remote() for a in self.actors], "loading shards"):
            counts.update(c)
        shards = list(self._manifest.shards)
        stale = [j for j, s in enumerate(shards) if counts[j] != s.count]
        for j in stale:
            local = self._call([self.actors[self._actor_of[j]].max_id.remote(j)], "loading shards")[0]
            shards[j] = ShardInfo(shards[j].file, shards[j].id_start, counts[j], shards[j].id_start + local)
        if stale:
            next_id = max(self._manifest.next_id, max(s.id_max for s in shards) + 1)
            self._manifest = Manifest(self._manifest.index, next_id, tuple(shards))
            self._manifest.write(self.directory)

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def config(self) -> dict[str, Any]:
        """TurboQuantIndex arguments of every shard: dim, bits, metric, rotation, seed, norm_dtype, correction."""
        return dict(self._manifest.index)

    @property
    def dim(self) -> int:
        return int(self._manifest.index["dim"])

    @property
    def metric(self) -> str:
        return str(self._manifest.index["metric"])

    def __len__(self) -> int:
        return self._manifest.count

    @property
    def ntotal(self) -> int:
        return len(self)

    def shard_actor(self, shard: int) -> Any:
        """The Ray actor handle holding shard ``shard``."""
        return self.actors[self._actor_of[shard]]

    def stats(self) -> list[dict[str, Any]]:
        """Per actor: pid, current and peak RSS bytes, per-shard counts and :attr:`TurboQuantIndex.memory_bytes`."""
        return self._call([a.stats.remote() for a in self.actors], "stats")

    # ----------------------------------------------------------------- search

    def search(self, queries: Any, k: int) -> tuple[Any, Any]:
        """The ``k`` best vectors per query over all shards, FAISS-shaped.

        Args:
            queries: ``(nq, dim)`` (or ``(dim,)``) float numpy array or torch tensor.
            k: results per query, ``1 <= k <= len(self)``.

        Returns:
            ``(scores, ids)``, each ``(nq, k)``: float32 scores (descending for ip/cosine,
            ascending squared distances for l2) and int64 global ids; numpy for numpy queries,
            CPU torch tensors for tensors. Ties are broken by the smaller id.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise TurboQuantError(f"k must be a positive int, got {k!r}")
        k = int(k)
        is_torch = isinstance(queries, torch.Tensor)
        q = _queries(queries, self.dim)
        with self._lock:
            if len(self) == 0:
                raise TurboQuantError("the index is empty; add vectors before searching")
            if k > len(self):
                raise TurboQuantError(f"k={k} exceeds the number of stored vectors ({len(self)})")
            if len(q) == 0:
                d, i = np.empty((0, k), np.float32), np.empty((0, k), np.int64)
            else:
                offsets = {j: s.id_start for j, s in enumerate(self._manifest.shards)}
                q_ref = ray.put(q)  # one object-store copy read by every actor
                parts = self._call(
                    [a.search.options(max_task_retries=-1).remote(q_ref, k, offsets) for a in self.actors], "search"
                )
                d, i = merge_topk([p[0] for p in parts], [p[1] for p in parts], k, self.metric == "l2")
        if is_torch:
            return torch.from_numpy(d), torch.from_numpy(i)
        return d, i

    # ----------------------------------------------------------------- add / remove / save

    def add(self, x: Any, ids: Any = None) -> np.ndarray:
        """Encode and append vectors, each to the shard owning its id; returns the int64 global ids.

        Default ids continue after the largest id ever assigned and go to the last shard. With
        ``write_through`` the owning shard files are rewritten before this returns.
        """
        v = _queries(x, self.dim, "x")
        with self._lock:
            if ids is None:
                new = np.arange(self._manifest.next_id, self._manifest.next_id + len(v), dtype=np.int64)
            else:
                raw = ids.cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
                if raw.ndim != 1 or raw.shape[0] != len(v) or (raw.size and raw.dtype.kind not in "iu"):
                    raise TurboQuantError(
                        f"ids must be a 1-D integer sequence of {len(v)} ids, got {raw.dtype}{raw.shape}"
                    )
                new = raw.astype(np.int64)
                if new.size and new.min() < 0:
                    raise TurboQuantError(f"ids must be non-negative, got {new.min()}")
            if len(v) == 0:
                return new
            starts = np.array([s.id_start for s in self._manifest.shards], np.int64)
            owner = _owner(starts, new)
            shards = list(self._manifest.shards)
            refs, touched = [], []
            for j in np.unique(owner).tolist():
                sel = owner == j
                local = new[sel] - starts[j]
                refs.append(self.shard_actor(j).add.remote(j, ray.put(v[sel]), local, self.write_through))
                touched.append((j, int(new[sel].max())))
            counts = self._call(refs, "add")
            for (j, top), count in zip(touched, counts):
                s = shards[j]
                shards[j] = ShardInfo(s.file, s.id_start, count, max(s.id_max, top))
            self._commit(shards, max(self._manifest.next_id, int(new.max()) + 1))
            return new

    def remove(self, ids: Any) -> int:
        """Remove vectors by global id; returns how many. Raises (removing nothing) if an id is absent."""
        raw = ids.cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
        raw = raw.reshape(-1)
        if raw.size and raw.dtype.kind not in "iu":
            raise TurboQuantError(f"ids must be integers, got dtype {raw.dtype}")
        wanted = np.unique(raw.astype(np.int64))
        if wanted.size and wanted.min() < 0:
            raise TurboQuantError(f"ids must be non-negative, got {wanted.min()}")
        if wanted.size == 0:
            return 0
        with self._lock:
            starts = np.array([s.id_start for s in self._manifest.shards], np.int64)
            owner = _owner(starts, wanted)
            groups = {j: wanted[owner == j] - starts[j] for j in np.unique(owner).tolist()}
            # all-or-nothing across shards: check every owner first (each shard's remove is atomic by itself)
            missing = self._call(
                [self.shard_actor(j).missing.remote(j, local) for j, local in groups.items()], "remove"
            )
            absent = np.concatenate([m + starts[j] for j, m in zip(groups, missing)])
            if absent.size:
                shown = ", ".join(str(i) for i in absent[:10]) + (" ..." if absent.size > 10 else "")
                raise TurboQuantError(f"{absent.size} id(s) not in the index: {shown}")
            removed = self._call(
                [self.shard_actor(j).remove.remote(j, local, self.write_through) for j, local in groups.items()],
                "remove",
            )
            shards = list(self._manifest.shards)
            for j, r in zip(groups, removed):
                s = shards[j]
                shards[j] = ShardInfo(s.file, s.id_start, s.count - r, s.id_max)
            self._commit(shards, self._manifest.next_id)
            return int(sum(removed))

    def _commit(self, shards: list[ShardInfo], next_id: int) -> None:
        self._manifest = Manifest(self._manifest.index, next_id, tuple(shards))
        if self.write_through:
            self._manifest.write(self.directory)

    def save(self) -> None:
        """Rewrite every shard file from its actor, then the manifest (both atomic)."""
        with self._lock:
            self._call([a.save.remote() for a in self.actors], "save")
            self._manifest.write(self.directory)

    def close(self) -> None:
        """Stop the actors (the files stay)."""
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []

    def __enter__(self) -> ShardedIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        c = self._manifest.index
        return (
            f"ShardedIndex(dim={c['dim']}, bits={c['bits']}, metric={c['metric']!r}, n={len(self)}, "
            f"shards={len(self._manifest.shards)}, actors={len(self.actors)}, engine={self.engine!r})"
        )


def _queries(x: Any, dim: int, name: str = "queries") -> np.ndarray:
    """``(n, dim)`` float32 C-contiguous numpy (the single index computes in float32 too)."""
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise TurboQuantError(f"{name} has unsupported dtype {x.dtype}; use a floating dtype")
        x = x.detach().cpu().float().numpy()
    elif isinstance(x, np.ndarray):
        if x.dtype not in (np.float16, np.float32, np.float64):
            raise TurboQuantError(f"{name} has unsupported dtype {x.dtype}; use float16, float32 or float64")
    else:
        raise TurboQuantError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[1] != dim:
        raise TurboQuantError(f"{name} must have shape (n, {dim}), got {tuple(x.shape)}")
    return np.ascontiguousarray(x, dtype=np.float32)


def cli_build(args: Any) -> int:
    """``turboquant index build --ray``: ``args.input`` (files), ``args.out`` (directory), ``args.shards``,
    ``args.ids`` (one .npy of ids for all rows), ``args.column`` (Parquet), ``args.ray_address``."""
    _ensure_ray(args.ray_address)
    report = build(
        args.input, args.out, bits=args.bits, metric=args.metric, rotation=args.rotation, seed=args.seed,
        norm_dtype=args.norm_dtype, num_shards=args.shards, ids=args.ids, column=args.column, chunk_rows=args.batch,
    )  # fmt: skip
    if not args.quiet:
        print(
            f"indexed {report['count']} vectors into {len(report['shards'])} shards in {report['seconds']:.2f} s; "
            f"manifest {report['manifest']}"
        )
    return 0


def cli_open(args: Any) -> ShardedIndex:
    """``turboquant index search --ray``: open ``args.index`` (a directory) with ``args.actors`` actors."""
    return ShardedIndex(args.index, num_actors=args.actors, engine=args.engine, address=args.ray_address)
