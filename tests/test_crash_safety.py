"""Issue 11, crash safety: a process saving an index or codes file in a tight loop is SIGKILLed at
random points 200 times. After every kill the file under the final name loads intact (one of the
versions that were saved); after the next successful save no temporary file is left.

The saver is a fork of the test process (a fresh interpreter would spend ~2 s importing torch
per kill); the kill lands at a uniformly random time in the first few saves.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from turboquant import TurboQuantMSE
from turboquant.index import TurboQuantIndex
from turboquant.io import load_codes, save_codes

KILLS = 200


def _versions() -> tuple[list[TurboQuantIndex], list]:  # type: ignore[type-arg]
    rng = np.random.default_rng(0)
    indexes = []
    for v in range(3):
        index = TurboQuantIndex(32, 4, engine="torch")
        index.add(rng.standard_normal((50 + v, 32)).astype(np.float32), ids=np.arange(50 + v) * (v + 1))
        indexes.append(index)
    q = TurboQuantMSE(32, 3)
    codes = [q.quantize(torch.from_numpy(rng.standard_normal((40 + v, 32)).astype(np.float32))) for v in range(3)]
    return indexes, codes


def _saver(path: Path, kind: str, versions: list, ready: int) -> None:  # type: ignore[type-arg]
    """Child process body: save the versions round-robin until killed (writes one byte to ``ready`` first)."""
    try:
        torch.set_num_threads(1)
        os.write(ready, b"1")
        i = 0
        while True:
            if kind == "index":
                versions[i % len(versions)].save(path)
            else:
                save_codes(path, versions[i % len(versions)])
            i += 1
    finally:
        os._exit(1)  # never return into the forked pytest


def _matches(path: Path, kind: str, versions: list) -> bool:  # type: ignore[type-arg]
    if kind == "index":
        loaded = TurboQuantIndex.load(path, engine="torch")
        return any(np.array_equal(loaded.ids, v.ids) and torch.equal(loaded._codes, v._codes) for v in versions)
    loaded = load_codes(path)
    return any(torch.equal(loaded.codes, v.codes) and torch.equal(loaded.norms, v.norms) for v in versions)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_sigkill_during_save_leaves_a_loadable_file_and_no_temporaries(tmp_path: Path) -> None:
    indexes, codes = _versions()
    rng = random.Random(0)
    paths = {"index": tmp_path / "x.tq", "codes": tmp_path / "c.tq"}
    indexes[0].save(paths["index"])
    save_codes(paths["codes"], codes[0])
    # one save's duration sets the kill window, so kills land inside saves, not only between them
    start = time.perf_counter()
    for _ in range(5):
        indexes[1].save(paths["index"])
    window = 3 * (time.perf_counter() - start) / 5
    left_behind = 0
    for k in range(KILLS):
        kind = "index" if k % 2 == 0 else "codes"
        versions = indexes if kind == "index" else codes
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(ready_r)
            _saver(paths[kind], kind, versions, ready_w)
        os.close(ready_w)
        os.read(ready_r, 1)  # the child is about to save: the kill lands inside the save loop, not in fork start-up
        os.close(ready_r)
        time.sleep(rng.uniform(0, window))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert _matches(paths[kind], kind, versions), f"kill {k}: {kind} file does not load as a saved version"
        left_behind += sum(1 for p in tmp_path.iterdir() if p.name.endswith(".tmp"))
        if k % 10 == 9:  # the next successful save cleans every stale temporary of its name
            for name, path in paths.items():
                if name == "index":
                    indexes[2].save(path)
                else:
                    save_codes(path, codes[2])
            assert sorted(p.name for p in tmp_path.iterdir()) == ["c.tq", "x.tq"], f"after kill {k}"
    assert left_behind > 0, "no kill landed inside a save; the test proved nothing"
