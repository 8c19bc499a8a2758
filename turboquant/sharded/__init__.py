"""A collection split into shard files, built by Ray tasks and searched by Ray actors.

TurboQuant needs no training (paper §4.4: the rotation and the Lloyd-Max codebooks are fixed by
``(dim, bits, seed)``), so every shard encodes its vectors independently and produces byte for
byte the codes one :class:`~turboquant.index.TurboQuantIndex` with the same seed would produce:
no coordination step, no shared state besides the configuration.

On disk a sharded index is a directory::

    manifest.json        format, index configuration, next id, and per shard: file, id_start, count, id_max
    shard-00000.tq       a TurboQuantIndex file (the existing format), ids stored minus id_start
    shard-00001.tq       ...

Ids. Global ids are contiguous in input order (file after file) unless ids are given. Shard ``j``
owns the id range ``[id_start[j], id_start[j+1])`` (``id_start[0] = 0``, the last range is open):
every id has exactly one owning shard, ``add``/``remove`` route by that range, and a shard stores
``id - id_start[j]`` — the shards of a default-id build store no ids at all (implicit, 0 bytes).
Explicit ids must therefore increase from shard to shard (within a shard any order).

Search semantics (``engine``, per shard):

* ``"torch"`` (default): every shard scores every vector exactly from its codes (the torch
  engine of :class:`~turboquant.index.TurboQuantIndex`); the client merges per-shard top-k by
  (score, then smaller id). The result is identical — same ids, bit-identical scores — to one
  ``TurboQuantIndex(..., engine="torch")`` over the whole collection with the same seed: a
  vector's score depends only on its codes, its norm and the query (measured bit-equal on the
  Brown set across shard boundaries and thread counts; tests/test_sharded.py), and the global
  top-k is the top-k of the union of per-shard top-k lists.
* ``"fastscan"`` / ``"auto"``: each shard runs the single-machine default (FAISS fast-scan
  shortlist, exact re-rank). Not identical to one fast-scan index: each shard shortlists its own
  candidates, and the union of per-shard shortlists contains the single index's shortlist, so
  the merged answer is the exact top-k of a *superset* of candidates — its sorted scores are,
  rank by rank, at least the single fast-scan index's (up to ties in the coarse scan).
  Faster for single queries on large shards; use ``"torch"`` when exact equality matters.

Failure handling. Shard actors are created with ``max_restarts``; Ray re-runs the actor's
constructor after a crash, which reloads its shard files, and ``add``/``remove`` are written
through to the shard file (atomic rewrite) before they return, so a restarted actor holds every
acknowledged change ("nothing is lost"; pass ``write_through=False`` to batch changes until
:meth:`ShardedIndex.save`, at the price of losing unsaved changes if an actor dies). ``search``
calls are idempotent and Ray retries them across a restart: a search during a restart **waits**
up to ``timeout`` seconds and then raises :class:`~turboquant.config.TurboQuantError`; once an
actor's restarts are exhausted, calls fail at once with a TurboQuantError naming its shards.
``add``/``remove`` are not retried automatically (a retry could apply a change twice); if the
owning actor dies during one, a TurboQuantError says so and the shard holds its last saved state.

Ray is optional: ``pip install 'turboquant[ray]'``. Parquet input needs ``pyarrow``.
"""

from __future__ import annotations

try:
    import ray  # noqa: F401
except ImportError as _exc:  # pragma: no cover - exercised only without ray
    raise ImportError("turboquant.sharded needs Ray, which is not installed: pip install 'turboquant[ray]'") from _exc

from .build import build
from .client import ShardedIndex, cli_build, cli_open, merge_topk
from .manifest import MANIFEST, Manifest, ShardInfo

__all__ = ["MANIFEST", "Manifest", "ShardInfo", "ShardedIndex", "build", "cli_build", "cli_open", "merge_topk"]
