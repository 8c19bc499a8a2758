"""Mutations of saved turboquant files, shared by tests/test_fuzz_files.py and scripts/fuzz_files.py.

A file is ``8-byte table length | JSON table (tensor entries + __metadata__.turboquant header) | data``.
Four kinds of mutation:

* ``flip``: 1-8 random bit flips (half of them aimed at the JSON table, where most structure is);
* ``truncate``: the file cut at a random length;
* ``append``: 1-64 random bytes appended;
* ``edit``: one header or table field replaced, removed or added, *then every digest recomputed*
  (tensors checksum, index digest, header checksum), so only the loaders' field and shape checks
  stand between the edit and the caller.

``check(kind, original, mutated, load)`` then demands: the load raises ``TurboQuantError`` or
returns data identical to the original; for ``edit`` (a consistently re-checksummed file is a
legitimate, different file) a successful load must instead be *usable*: its contents agree with
each other and a decode / search runs.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from turboquant import TurboQuantError, TurboQuantMSE, TurboQuantProd
from turboquant.io import load_codes, save_codes
from turboquant import index_file
from turboquant.index import TurboQuantIndex

_NP = {"U8": np.uint8, "I64": np.int64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16}
_TORCH = {"U8": torch.uint8, "I64": torch.int64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass
class Parsed:
    table: dict[str, Any]  # tensor entries (without __metadata__)
    metadata: dict[str, str]
    data: bytes

    @property
    def header(self) -> dict[str, Any]:
        return json.loads(self.metadata["turboquant"])


def parse(blob: bytes) -> Parsed:
    hlen = int.from_bytes(blob[:8], "little")
    table = json.loads(blob[8 : 8 + hlen])
    metadata = table.pop("__metadata__")
    return Parsed(table, metadata, blob[8 + hlen :])


def build(p: Parsed) -> bytes:
    table = {"__metadata__": p.metadata, **p.table}
    raw = json.dumps(table, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + p.data


def _tensors(p: Parsed) -> dict[str, torch.Tensor]:
    out = {}
    for name, info in p.table.items():
        begin, end = info["data_offsets"]
        arr = np.frombuffer(p.data[begin:end], dtype=_NP[info["dtype"]]).reshape(info["shape"])
        t = torch.from_numpy(arr.copy())
        out[name] = t.view(_TORCH[info["dtype"]]) if info["dtype"] == "BF16" else t
    return out


def _tensors_checksum(p: Parsed) -> str:
    # the tensors-checksum formula (io.tensors_checksum), over the table as the file states it, so
    # a re-shaped or re-typed tensor gets a checksum that matches what a loader will read
    digest = hashlib.sha256()
    for name in sorted(p.table):
        info = p.table[name]
        begin, end = info["data_offsets"]
        dtype = _TORCH.get(info["dtype"], info["dtype"])
        digest.update(f"{name}|{dtype}|{tuple(info['shape'])}|".encode())
        digest.update(p.data[begin:end])
    return digest.hexdigest()


def reseal(p: Parsed) -> bytes:
    """Recompute every digest of a parsed (and edited) file: tensors checksum, index digest, header checksum."""
    header = p.header
    header["checksum"] = _tensors_checksum(p)
    if isinstance(header.get("index"), dict) and "index_digest" in header:
        header["index_digest"] = index_file.digest(header["index"], header["checksum"])
    if "header_checksum" in header:
        from turboquant.io import header_checksum

        header["header_checksum"] = header_checksum(header)
    p.metadata = {**p.metadata, "turboquant": json.dumps(header)}
    return build(p)


# --------------------------------------------------------------------------- the files


def make_originals(folder: Path) -> dict[str, Path]:
    """Small files of every shape the loaders handle (a few hundred bytes each)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    files = {}
    save_codes(folder / "mse.tq", TurboQuantMSE(24, 3, seed=5, norm_dtype="float16").quantize(torch.randn(2, 3, 24)))
    save_codes(folder / "prod.tq", TurboQuantProd(20, 2.5, rotation="haar", seed=7).quantize(torch.randn(4, 20)))
    files["mse.tq"] = folder / "mse.tq"
    files["prod.tq"] = folder / "prod.tq"
    index = TurboQuantIndex(16, 3, "ip", engine="torch")
    index.add(rng.standard_normal((10, 16)).astype(np.float32))
    index.save(folder / "implicit.tq")
    index = TurboQuantIndex(12, 2, "l2", rotation="hadamard", seed=3, norm_dtype="bfloat16", engine="torch")
    index.add(rng.standard_normal((6, 12)).astype(np.float32), ids=[40, 7, 99, 3, 12, 64])
    index.remove([99])
    index.save(folder / "explicit.tq")
    files["implicit.tq"] = folder / "implicit.tq"
    files["explicit.tq"] = folder / "explicit.tq"
    return files


def is_index(name: str) -> bool:
    return name in ("implicit.tq", "explicit.tq")


def load(name: str, path: Path) -> Any:
    return TurboQuantIndex.load(path, engine="torch") if is_index(name) else load_codes(path)


# --------------------------------------------------------------------------- mutations

_INTERESTING: list[Any] = [
    0, 1, -1, 2, 3, 7, 8, 9, 255, 256, 65536, 65537, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**80,
    10**400, -(2**63), 0.5, 2.5, 3.0, 1e308, -0.0, float("inf"), float("nan"), True, False, None, "", "x", "1",
    "mse", "prod", "haar", "hadamard", "ip", "l2", "cosine", "float16", "bfloat16", "float32", "int8", "codes",
    "index", "config", [], [1], {}, {"a": 1}, [[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]],
]  # fmt: skip

# index header fields the random edits leave alone (none: TurboQuantIndex.load range-checks them all)
INDEX_ONLY_FIELDS: set[tuple[str, str]] = set()


def _paths(obj: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.append((*prefix, key))
            out += _paths(value, (*prefix, key))
    return out


def _set(obj: dict[str, Any], path: tuple[str, ...], value: Any, delete: bool = False) -> None:
    for key in path[:-1]:
        obj = obj[key]
    if delete:
        obj.pop(path[-1], None)
    else:
        obj[path[-1]] = value


def edit(blob: bytes, rng: random.Random, skip: set[tuple[str, ...]] = INDEX_ONLY_FIELDS) -> bytes:
    """One header or table field changed, every digest recomputed."""
    p = parse(blob)
    header = p.header
    choice = rng.random()
    if choice < 0.7:  # the turboquant header (config, index fields, format/version/kind)
        fields = [f for f in _paths(header) if f not in skip and f[-1] not in ("checksum", "index_digest", "header_checksum")]
        field = rng.choice(fields)
        roll = rng.random()
        if roll < 0.1:
            _set(header, field, None, delete=True)
        elif roll < 0.2:
            _set(header, (*field[:-1], rng.choice(["extra", "dim", "count", "ids"])), rng.choice(_INTERESTING))
        else:
            old = header
            for key in field:
                old = old[key]
            near = [old + d for d in (-1, 1)] if isinstance(old, int) and not isinstance(old, bool) else []
            _set(header, field, rng.choice(_INTERESTING + near))
        p.metadata = {**p.metadata, "turboquant": json.dumps(header)}
    elif choice < 0.95:  # a tensor entry: dtype, shape or offsets (bytes unchanged)
        name = rng.choice(sorted(p.table))
        info = dict(p.table[name])
        what = rng.choice(["dtype", "shape", "shape", "offsets", "rename"])
        if what == "dtype":
            info["dtype"] = rng.choice(["U8", "I8", "I64", "F32", "F16", "BF16", "F64", "I32"])
        elif what == "shape":
            shape = list(info["shape"])
            options = [shape[:-1], shape + [1], [int(np.prod(shape))], shape[::-1], [0] + shape[1:]]
            if shape:
                options.append([shape[0] + rng.choice([-1, 1])] + shape[1:])
            info["shape"] = rng.choice(options)
        elif what == "offsets":
            b, e = info["data_offsets"]
            delta = rng.choice([-8, -1, 1, 8])
            info["data_offsets"] = rng.choice([[b, e + delta], [b + delta, e], [b + delta, e + delta]])
        if what == "rename":  # under another name (replacing any tensor of that name), or duplicated
            if rng.random() < 0.5:
                del p.table[name]
            p.table[rng.choice(["codes", "norms", "ids", "qjl", "residual_norms", "other"])] = info
        else:
            p.table[name] = info
    else:  # a whole tensor dropped, or one added
        if rng.random() < 0.5 and p.table:
            del p.table[rng.choice(sorted(p.table))]
        else:
            p.table[rng.choice(["ids", "qjl", "extra"])] = {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}
    return reseal(p)


def mutate(blob: bytes, rng: random.Random) -> tuple[str, bytes]:
    kind = rng.choice(["flip", "flip", "truncate", "append", "edit", "edit"])
    if kind == "flip":
        out = bytearray(blob)
        hlen = int.from_bytes(blob[:8], "little")
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(8 + hlen) if rng.random() < 0.5 else rng.randrange(len(out))
            out[pos] ^= 1 << rng.randrange(8)
        return kind, bytes(out)
    if kind == "truncate":
        return kind, blob[: rng.randrange(len(blob))]
    if kind == "append":
        return kind, blob + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    return kind, edit(blob, rng)


# --------------------------------------------------------------------------- outcome checks


def same(a: Any, b: Any) -> bool:
    """Identical loaded data (every stored field, exact)."""
    if isinstance(a, TurboQuantIndex):
        return (
            a.config == b.config and len(a) == len(b)
            and a._next_id == b._next_id and np.array_equal(a.ids, b.ids)
            and torch.equal(a._codes, b._codes) and torch.equal(a._norms, b._norms)
        )  # fmt: skip
    fields = ("codes", "norms", "qjl", "residual_norms")
    return (
        a.config == b.config and a.numpy_io == b.numpy_io
        and all((getattr(a, f) is None) == (getattr(b, f) is None) for f in fields)
        and all(getattr(a, f) is None or (getattr(a, f).dtype == getattr(b, f).dtype and torch.equal(getattr(a, f), getattr(b, f)))
                for f in fields)
    )  # fmt: skip


def usable(obj: Any) -> None:
    """Exercise a loaded object the way a caller would; raises on inconsistent contents."""
    if isinstance(obj, TurboQuantIndex):
        ids = obj.ids
        assert len(ids) == len(obj)
        if len(obj):
            q = np.ones((1, obj.dim), np.float32)
            _, found = obj.search(q, 1)
            assert found[0, 0] in set(ids.tolist())
        return
    q = (TurboQuantProd if obj.config.variant.value == "prod" else TurboQuantMSE)(
        obj.config.dim, obj.config.bits, rotation=obj.config.rotation, seed=obj.config.seed,
        norm_dtype=obj.config.norm_dtype,
    )  # fmt: skip
    x = q.dequantize(obj)
    assert tuple(x.shape) == (*obj.shape, obj.config.dim)


@dataclass
class Tally:
    loads: int = 0
    rejected: int = 0
    identical: int = 0
    different_but_valid: int = 0
    unchanged: int = 0
    failures: list[str] | None = None

    def __post_init__(self) -> None:
        self.failures = []


def check(name: str, kind: str, original: Any, blob: bytes, mutated: bytes, path: Path, tally: Tally) -> None:
    """Load ``mutated`` from ``path`` and record whether the outcome is allowed."""
    if mutated == blob:
        tally.unchanged += 1
        return
    path.write_bytes(mutated)
    tally.loads += 1
    try:
        loaded = load(name, path)
    except TurboQuantError:
        tally.rejected += 1
        return
    except Exception as exc:  # noqa: BLE001 - any other exception is the failure being hunted
        tally.failures.append(f"{name} {kind}: load raised {type(exc).__name__}: {str(exc)[:200]}")  # type: ignore[union-attr]
        return
    if same(loaded, original):
        tally.identical += 1
        return
    if kind != "edit":
        tally.failures.append(f"{name} {kind}: loaded different data without an error")  # type: ignore[union-attr]
        return
    try:
        usable(loaded)
    except TurboQuantError:
        tally.different_but_valid += 1  # a clear error on use is acceptable for a re-checksummed edit
        return
    except Exception as exc:  # noqa: BLE001
        tally.failures.append(f"{name} edit: loaded, then use raised {type(exc).__name__}: {str(exc)[:200]}")  # type: ignore[union-attr]
        return
    tally.different_but_valid += 1


def run(folder: Path, n: int, seed: int, progress: Callable[[int], None] | None = None) -> Tally:
    """``n`` mutations spread over the four original files."""
    files = make_originals(folder)
    originals = {name: (path.read_bytes(), load(name, path)) for name, path in files.items()}
    names = sorted(originals)
    rng = random.Random(seed)
    tally = Tally()
    target = folder / "mutated.tq"
    for i in range(n):
        name = names[i % len(names)]
        blob, original = originals[name]
        kind, mutated = mutate(blob, rng)
        check(name, kind, original, blob, mutated, target, tally)
        if progress is not None:
            progress(i)
    return tally
