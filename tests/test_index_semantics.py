"""Index semantics (issue 11): unique ids, all-or-nothing add/remove, range-checked file headers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from turboquant.config import TurboQuantError
from turboquant.index import TurboQuantIndex
from turboquant.io import load_tensors, save_tensors, tensors_checksum

DIM = 32


def _data(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def _state(index: TurboQuantIndex) -> tuple[Any, ...]:
    """What a user can observe: size, ids in order, and every stored vector's reconstruction."""
    ids = index.ids
    return len(index), ids.tolist(), index.reconstruct(ids) if len(ids) else None


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return a[:2] == b[:2] and (a[2] is b[2] is None or np.array_equal(a[2], b[2]))


@pytest.mark.parametrize("engine", ["torch", "auto"])
def test_duplicate_ids_in_one_batch_are_rejected_and_nothing_is_added(engine: str) -> None:
    index = TurboQuantIndex(DIM, 4, "cosine", engine=engine)
    index.add(_data(5), ids=[10, 11, 12, 13, 14])
    before = _state(index)
    with pytest.raises(TurboQuantError, match="duplicates within the batch: 7"):
        index.add(_data(3, 1), ids=[7, 8, 7])
    assert _same(before, _state(index))


def test_an_already_stored_id_is_rejected_unless_upsert() -> None:
    index = TurboQuantIndex(DIM, 4, "ip", engine="torch")
    x = _data(6)
    index.add(x)  # ids 0..5
    before = _state(index)
    with pytest.raises(TurboQuantError, match=r"1 id\(s\) already in the index: 3.*upsert=True"):
        index.add(_data(2, 1), ids=[100, 3])
    assert _same(before, _state(index))

    y = _data(2, 2)
    out = index.add(y, ids=[3, 100], upsert=True)
    assert out.tolist() == [3, 100]
    assert len(index) == 7 and sorted(index.ids.tolist()) == [0, 1, 2, 3, 4, 5, 100]
    # id 3 now holds the new vector: its reconstruction is close to y[0], not x[3]
    rec = index.reconstruct([3])[0]
    assert np.linalg.norm(rec - y[0]) < 0.3 * np.linalg.norm(y[0]) < np.linalg.norm(rec - x[3])
    scores, ids = index.search(y[:1], 1)
    assert ids[0, 0] == 3


def test_sequential_ids_continue_after_explicit_ones_without_collisions() -> None:
    index = TurboQuantIndex(DIM, 2, "ip", engine="torch")
    index.add(_data(2), ids=[0, 5])
    assert index.add(_data(2, 1)).tolist() == [6, 7]
    with pytest.raises(TurboQuantError, match="already in the index: 5"):
        index.add(_data(1, 2), ids=[5])


def test_sequential_ids_never_overflow_int64() -> None:
    index = TurboQuantIndex(DIM, 2, "ip", engine="torch")
    index.add(_data(1), ids=[2**63 - 2])
    index.add(_data(1, 1))  # gets 2**63 - 1, the last id
    before = _state(index)
    with pytest.raises(TurboQuantError, match="2\\*\\*63 - 1"):
        index.add(_data(1, 2))
    assert _same(before, _state(index))


@pytest.mark.parametrize("engine", ["torch", "auto"])
@pytest.mark.parametrize("n", [3, 40_000])  # one chunk, and three chunks encoded in parallel
def test_a_batch_with_one_nan_row_adds_nothing(engine: str, n: int) -> None:
    index = TurboQuantIndex(DIM, 4, "cosine", engine=engine)
    base = _data(50)
    index.add(base)
    before = _state(index)
    bad = _data(n, 1)
    bad[-1, 3] = np.nan  # the last row of the last chunk: earlier chunks encode fine first
    with pytest.raises(TurboQuantError, match="NaN"):
        index.add(bad)
    assert _same(before, _state(index))
    _, ids = index.search(base[:4], 1)
    assert ids[:, 0].tolist() == [0, 1, 2, 3]  # the search structures saw nothing of the failed batch
    assert index.add(_data(2, 2)).tolist() == [50, 51]  # ids were not consumed


def test_remove_with_one_unknown_id_removes_nothing() -> None:
    index = TurboQuantIndex(DIM, 4, "ip", engine="torch")
    index.add(_data(10))
    before = _state(index)
    with pytest.raises(TurboQuantError, match="not in the index: 99"):
        index.remove([1, 2, 99])
    assert _same(before, _state(index))


# --------------------------------------------------------------------------- crafted file headers


def _rewrite(src: Path, dst: Path, edit: Any, tensors_edit: Any = None) -> None:
    """Copy an index file with an edited header and a recomputed (consistent) digest and checksum."""
    tensors, header = load_tensors(src, "index")
    tensors = {k: v.clone() for k, v in tensors.items()}
    if tensors_edit is not None:
        tensors_edit(tensors)
    meta = dict(header["index"])
    meta["config"] = dict(meta["config"])
    edit(meta)
    digest = hashlib.sha256((json.dumps(meta, sort_keys=True) + tensors_checksum(tensors)).encode()).hexdigest()
    save_tensors(dst, tensors, "index", {"index": meta, "index_digest": digest})


def _set(**fields: Any) -> Any:
    def edit(meta: dict[str, Any]) -> None:
        for key, value in fields.items():
            if key.startswith("config_"):
                meta["config"][key[7:]] = value
            else:
                meta[key] = value

    return edit


def _explicit(tmp_path: Path) -> Path:
    index = TurboQuantIndex(DIM, 3, "ip", engine="torch")
    index.add(_data(8), ids=np.arange(100, 108))
    path = tmp_path / "explicit.tq"
    index.save(path)
    return path


BAD_HEADERS = {
    "seed beyond 64 bits": _set(config_seed=2**80),
    "huge dim": _set(config_dim=10**9),
    "negative count": _set(count=-1),
    "count larger than the tensors": _set(count=9),
    "count as a float": _set(count=8.0),
    "count as a bool": _set(count=True),
    "count as a string": _set(count="8"),
    "next_id beyond int64": _set(next_id=2**63),
    "next_id not above the stored ids": _set(next_id=107),
    "explicit_ids as a string": _set(explicit_ids="false"),
    "unknown metric": _set(metric="manhattan"),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_crafted_header_fields_are_range_checked(tmp_path: Path, case: str) -> None:
    bad = tmp_path / "user_file.tq"
    _rewrite(_explicit(tmp_path), bad, BAD_HEADERS[case])
    for mmap in (False, True):
        with pytest.raises(TurboQuantError, match="user_file.tq"):
            TurboQuantIndex.load(bad, mmap=mmap)


def test_crafted_duplicate_or_negative_stored_ids_are_rejected(tmp_path: Path) -> None:
    src = _explicit(tmp_path)
    bad = tmp_path / "dups.tq"
    _rewrite(src, bad, lambda m: None, lambda t: t["ids"].__setitem__(slice(0, 2), torch.tensor([104, 104])))
    with pytest.raises(TurboQuantError, match="dups.tq.*duplicate"):
        TurboQuantIndex.load(bad)
    _rewrite(src, bad, lambda m: None, lambda t: t["ids"].__setitem__(0, -5))
    with pytest.raises(TurboQuantError, match="dups.tq"):
        TurboQuantIndex.load(bad)


def test_implicit_ids_need_next_id_at_least_count(tmp_path: Path) -> None:
    index = TurboQuantIndex(DIM, 2, "ip", engine="torch")
    index.add(_data(8))
    good, bad = tmp_path / "good.tq", tmp_path / "bad.tq"
    index.save(good)
    _rewrite(good, bad, _set(next_id=3))  # would hand out ids 3.. again
    with pytest.raises(TurboQuantError, match="bad.tq.*next_id=3"):
        TurboQuantIndex.load(bad)
    loaded = TurboQuantIndex.load(good)  # the unedited file still loads and adds after id 7
    assert loaded.add(_data(1, 1)).tolist() == [8]
