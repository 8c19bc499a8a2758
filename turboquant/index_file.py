"""The index file: header fields, their range checks, and the tensors they must agree with.

An index file is a :mod:`turboquant.io` file of kind ``"index"``: tensors ``norms`` ``(count,)``
and, once ids are explicit, ``ids`` ``(count,)`` int64, plus the codes in one of two layouts
(header field ``codes_layout``, index version 2):

* ``"rows"``: ``codes`` ``(count, code_bytes)`` uint8, one row per vector (the only layout of
  version 1 files, which still load);
* ``{"bits": b, "vnni": bool, "mpad": p}``, the split storage of
  :mod:`turboquant.kernels.scan_split`: ``scan_blocks`` ``(ceil(count/64), Mp·32)`` uint8, the C
  scan's blocked nibbles of a ``b``-bit scan (``Mp`` = nibble positions padded to a multiple of
  ``p``; ``vnni``: the 16-vector sub-block layout), and, when the scan drops bits, ``low_bits``
  ``(count, ceil(code_bytes/2))`` uint8. Memory-mapped by a machine with the same scan layout
  and searched in place; elsewhere rebuilt into rows at load.

The header is ``{"index": {...}, "index_digest": sha256}``. Every header field
is type- and range-checked here (dims, bits, seeds through
:class:`~turboquant.config.QuantizerConfig`; ``count`` against the tensor shapes; ``next_id``
within int64 and above every stored id) before the index allocates anything from it, and every
problem raises :class:`~turboquant.config.TurboQuantError` naming the user's path.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .codec import code_bytes
from .config import Metric, QuantizerConfig, TurboQuantError, Variant
from .fastscan import nibble_plan
from .io import config_from_header, load_tensors, require_bool, require_choice, require_int, save_tensors, tensors_checksum

INDEX_KIND = "index"
INDEX_VERSION = 2
_READABLE_VERSIONS = (1, 2)  # version 1: row-major codes only, no codes_layout field
MAX_ID = int(np.iinfo(np.int64).max)


@dataclass(frozen=True)
class IndexHeader:
    """The checked fields of an index file's header."""

    config: QuantizerConfig
    metric: Metric
    correction: bool
    count: int
    next_id: int
    explicit_ids: bool
    scan: dict[str, Any] | None = None  # the split storage's layout; None: row-major codes
    version: int = INDEX_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "index_version": INDEX_VERSION,
            "codes_layout": "rows" if self.scan is None else self.scan,
            "config": self.config.to_dict(),
            "metric": self.metric.value,
            "correction": self.correction,
            "count": self.count,
            "next_id": self.next_id,
            "explicit_ids": self.explicit_ids,
        }


def digest(header: dict[str, Any], tensor_checksum: str) -> str:
    """sha256 over the index header and the tensors' checksum (the core checksum covers tensor bytes only)."""
    return hashlib.sha256((json.dumps(header, sort_keys=True) + tensor_checksum).encode()).hexdigest()


def write_index_file(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], header: IndexHeader) -> None:
    """Atomically write ``tensors`` (``codes``, ``norms``, optional ``ids``) with ``header``."""
    meta = header.to_dict()
    save_tensors(path, tensors, INDEX_KIND, {"index": meta, "index_digest": digest(meta, tensors_checksum(tensors))})


def parse_header(path: Path, meta: Any) -> IndexHeader:
    """Type- and range-check the ``"index"`` header dict (nothing is allocated from it yet)."""
    if not isinstance(meta, dict):
        raise TurboQuantError(f"{path}: missing index header; not a turboquant index file")
    version = meta.get("index_version")
    if isinstance(version, bool) or version not in _READABLE_VERSIONS:
        raise TurboQuantError(f"{path}: index version {version!r} is not supported (this turboquant reads {_READABLE_VERSIONS})")
    qcfg = config_from_header(path, meta.get("config"))  # range-checks dim, bits, seed, norm dtype
    metric = Metric(require_choice(path, meta, "metric", [m.value for m in Metric]))
    if qcfg.variant is not Variant.MSE:
        raise TurboQuantError(f"{path}: index codes must be variant 'mse', got {qcfg.variant.value!r}")
    count, next_id = require_int(path, meta, "count", 0, MAX_ID), require_int(path, meta, "next_id", 0, MAX_ID)
    explicit = require_bool(path, meta, "explicit_ids")
    if not explicit and next_id < count:
        raise TurboQuantError(f"{path}: invalid index header: next_id={next_id} is below the implicit ids 0..{count - 1}")
    scan = None
    if version >= 2 and meta.get("codes_layout") != "rows":
        raw = meta.get("codes_layout")
        if not isinstance(raw, dict) or set(raw) != {"bits", "vnni", "mpad"}:
            raise TurboQuantError(f"{path}: invalid index header: codes_layout must be 'rows' or {{bits, vnni, mpad}}")
        scan = {"bits": require_int(path, raw, "bits", 1, 4), "vnni": require_bool(path, raw, "vnni"),
                "mpad": require_choice(path, raw, "mpad", [2, 8])}  # fmt: skip
        if nibble_plan(qcfg, scan["bits"]) is None:
            raise TurboQuantError(f"{path}: invalid index header: no {scan['bits']}-bit scan of {qcfg.bits}-bit codes")
    elif version == 1 and "codes_layout" in meta:
        raise TurboQuantError(f"{path}: invalid index header: codes_layout in a version 1 file")
    return IndexHeader(qcfg, metric, require_bool(path, meta, "correction"), count, next_id, explicit, scan, version)


def read_index_file(path: str | os.PathLike[str], *, mmap: bool = False) -> tuple[dict[str, torch.Tensor], IndexHeader]:
    """Read, verify and check an index file; returns its tensors and header.

    Checks, in order: the core format and tensor checksum (:func:`turboquant.io.load_tensors`),
    the index header's fields and ranges, the digest binding header and tensors, the tensors'
    names, dtypes and shapes against ``count``, and the stored ids (non-negative, unique, below
    ``next_id``).
    """
    path = Path(path)
    tensors, raw = load_tensors(path, INDEX_KIND, mmap=mmap)
    header = parse_header(path, raw.get("index"))
    # load_tensors verified raw["checksum"] == tensors_checksum(tensors): reuse it (hashing twice doubled the load time)
    if raw.get("index_digest") != digest(raw["index"], raw["checksum"]):
        raise TurboQuantError(f"{path}: index header checksum mismatch; the file is corrupt")
    count = header.count
    expect: dict[str, tuple[tuple[int, ...], torch.dtype]] = {"norms": ((count,), getattr(torch, header.config.norm_dtype))}
    if header.scan is None:
        expect["codes"] = ((count, code_bytes(header.config)), torch.uint8)
    else:
        plan = nibble_plan(header.config, header.scan["bits"])
        assert plan is not None
        mp = -(-len(plan.coords) // header.scan["mpad"]) * header.scan["mpad"]
        expect["scan_blocks"] = ((-(-count // 64), mp * 32), torch.uint8)
        if not plan.identity:  # the bits the scan drops
            expect["low_bits"] = ((count, -(-code_bytes(header.config) // 2)), torch.uint8)
    if header.explicit_ids:
        expect["ids"] = ((count,), torch.int64)
    if set(tensors) != set(expect):
        raise TurboQuantError(f"{path}: tensors {sorted(tensors)} do not match the header (expected {sorted(expect)})")
    for name, (shape, dtype) in expect.items():
        if tuple(tensors[name].shape) != shape or tensors[name].dtype != dtype:
            raise TurboQuantError(
                f"{path}: tensor {name!r} is {tensors[name].dtype}{tuple(tensors[name].shape)}, expected {dtype}{shape}"
            )
    if header.explicit_ids and count:
        ids = tensors["ids"].numpy()
        if int(ids.min()) < 0 or int(ids.max()) >= header.next_id:
            raise TurboQuantError(
                f"{path}: invalid index: stored ids span [{int(ids.min())}, {int(ids.max())}], "
                f"outside [0, next_id={header.next_id})"
            )
        # ids are usually ascending (one O(n) pass); otherwise sort to prove them unique
        if not bool((ids[1:] > ids[:-1]).all()) and np.unique(ids).size != count:
            raise TurboQuantError(f"{path}: invalid index: duplicate stored ids")
    return tensors, header
