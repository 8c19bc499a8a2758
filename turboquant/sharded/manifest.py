"""The on-disk description of a sharded index: ``manifest.json`` (format, config, shards, id ranges)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import TurboQuantError
from ..io import atomic_write


MANIFEST = "manifest.json"
SHARDED_FORMAT = "turboquant-sharded"
SHARDED_VERSION = 1
_CHUNK_ROWS = 65536  # rows read and encoded per step in a build task: bounds worker memory
_INDEX_KEYS = ("dim", "bits", "metric", "rotation", "seed", "norm_dtype", "correction")

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class ShardInfo:
    """One shard: its file (relative to the index directory), owned id range start, count, largest id."""

    file: str
    id_start: int
    count: int
    id_max: int  # largest global id stored (id_start - 1 if none)


@dataclass(frozen=True)
class Manifest:
    """``manifest.json`` of a sharded index: configuration, id allocation and shards."""

    index: dict[str, Any]  # TurboQuantIndex constructor arguments (_INDEX_KEYS)
    next_id: int  # next default id (never reused, as in TurboQuantIndex)
    shards: tuple[ShardInfo, ...]

    @property
    def count(self) -> int:
        return sum(s.count for s in self.shards)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": SHARDED_FORMAT,
                "version": SHARDED_VERSION,
                "index": self.index,
                "count": self.count,
                "next_id": self.next_id,
                "shards": [s.__dict__ for s in self.shards],
            },
            indent=1,
        )

    @classmethod
    def read(cls, directory: PathLike) -> Manifest:
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise TurboQuantError(f"{path}: no such file; not a sharded turboquant index directory")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            if raw.get("format") != SHARDED_FORMAT or raw.get("version") != SHARDED_VERSION:
                raise ValueError(f"format {raw.get('format')!r} version {raw.get('version')!r}")
            index = {key: raw["index"][key] for key in _INDEX_KEYS}
            shards = tuple(
                ShardInfo(str(s["file"]), int(s["id_start"]), int(s["count"]), int(s["id_max"])) for s in raw["shards"]
            )
            manifest = cls(index, int(raw["next_id"]), shards)
        except (ValueError, KeyError, TypeError) as exc:
            raise TurboQuantError(f"{path}: invalid sharded-index manifest: {exc}") from None
        starts = [s.id_start for s in shards]
        if not shards or starts[0] != 0 or any(a >= b for a, b in zip(starts, starts[1:])):
            raise TurboQuantError(f"{path}: shard id_start values must begin at 0 and increase, got {starts}")
        for s in shards:
            if Path(s.file).name != s.file:  # files live in the directory: no path escapes
                raise TurboQuantError(f"{path}: shard file {s.file!r} must be a plain file name")
        return manifest

    def write(self, directory: PathLike) -> None:
        """Write atomically: a temporary file in the same directory, fsync, rename."""
        text = self.to_json().encode("utf-8")
        atomic_write(Path(directory) / MANIFEST, lambda fh: fh.write(text))


def _owner(starts: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Owning shard of each id: the last shard whose ``id_start <= id``."""
    return np.searchsorted(starts, ids, side="right") - 1
