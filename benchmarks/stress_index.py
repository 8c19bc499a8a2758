"""Concurrency stress of one TurboQuantIndex: threads add, remove, search and save at once.

Every mutation is logged by the thread that made it (batch, ids given or returned, ids removed).
Threads own disjoint id sets (explicit ids from per-thread ranges, handed out downwards; one
thread takes the index's default sequential ids and logs the ids ``add`` returned), so mutations
of different threads commute and replaying the logs thread by thread must rebuild the same index.
At the end:

* the live index equals the sequential replay: same ids, and the same decoded vector for every id
  (``reconstruct`` is an exact function of the stored codes and norm);
* every vector a thread added and did not remove is there (none lost, none duplicated);
* every search returned ``k`` ids with descending scores; every saved snapshot loads with unique
  ids and ``len`` equal to its id count, has the mode the umask gives (readable by a serving
  process), and no temporary file is left; no thread raised.

Public index API only: ``add``, ``remove``, ``search`` (``(D, I)``), ``save``, ``load``, ``len``,
``ids``, ``reconstruct``.

    python benchmarks/stress_index.py                # 60 s
    python benchmarks/stress_index.py --seconds 5    # what tests/test_stress_index.py runs

Prints a table and writes benchmarks/results/stress_index.json (machine info, thread counts).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import stat
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))  # after PYTHONPATH: an explicitly chosen checkout wins

from turboquant.index import TurboQuantIndex  # noqa: E402

DIM = 32
BASE = 256  # vectors added first and never removed: searches always have k results
RANGE = 10**12  # explicit-id threads own [RANGE * (t + 1), RANGE * (t + 2)), handed out downwards


@dataclass
class Op:
    kind: str  # "add" or "remove"
    ids: np.ndarray
    x: np.ndarray | None = None


@dataclass
class Stats:
    adds: int = 0
    removes: int = 0
    vectors_added: int = 0
    vectors_removed: int = 0
    searches: int = 0
    saves: int = 0
    errors: list[str] = field(default_factory=list)


def _index() -> TurboQuantIndex:
    return TurboQuantIndex(DIM, 4, "ip", rotation="haar", seed=1)


def _mutator(index: TurboQuantIndex, t: int, explicit: bool, stop: threading.Event, log: list[Op], stats: Stats,
             seed: int, pause: float) -> None:  # fmt: skip
    rng = np.random.default_rng(seed)
    live: list[int] = []
    next_id = RANGE * (t + 2) - 1
    while not stop.wait(pause):  # the pause bounds the log: the replay's removes each copy the buffers
        if live and rng.random() < 0.45:
            take = rng.choice(len(live), size=min(len(live), int(rng.integers(1, 8))), replace=False)
            gone = np.asarray([live[i] for i in take], np.int64)
            index.remove(gone)
            log.append(Op("remove", gone))
            for i in sorted(take, reverse=True):
                live.pop(i)
            stats.removes += 1
            stats.vectors_removed += len(gone)
        else:
            n = int(rng.integers(1, 24))
            x = rng.standard_normal((n, DIM)).astype(np.float32)
            if explicit:
                ids = np.arange(next_id, next_id - n, -1, dtype=np.int64)
                next_id -= n
                got = index.add(x, ids=ids)
                assert np.array_equal(got, ids)
            else:
                ids = np.asarray(index.add(x), np.int64)
            log.append(Op("add", ids, x))
            live.extend(ids.tolist())
            stats.adds += 1
            stats.vectors_added += n


def _searcher(index: TurboQuantIndex, stop: threading.Event, stats: Stats, seed: int) -> None:
    rng = np.random.default_rng(seed)
    while not stop.is_set():
        q = rng.standard_normal((int(rng.integers(1, 16)), DIM)).astype(np.float32)
        scores, ids = index.search(q, 10)
        assert ids.shape == (len(q), 10) and scores.shape == (len(q), 10)
        assert (ids >= 0).all(), "search returned a missing result"
        assert (np.diff(scores, axis=1) <= 1e-6).all(), "scores not descending"
        stats.searches += 1


def _saver(index: TurboQuantIndex, folder: Path, stop: threading.Event, stats: Stats, mode: int) -> None:
    path = folder / "stress.tq"  # every saver writes the same file: concurrent atomic replaces
    while not stop.is_set():
        index.save(path)
        got = stat.S_IMODE(path.stat().st_mode)
        assert got == mode, f"saved file has mode {oct(got)}, the umask gives {oct(mode)} (a reader could not open it)"
        snap = TurboQuantIndex.load(path)
        ids = snap.ids
        assert len(np.unique(ids)) == len(ids) == len(snap), "saved snapshot has duplicate or missing ids"
        stats.saves += 1
        time.sleep(0.01)


def run(
    seconds: float, mutators: int = 3, searchers: int = 2, savers: int = 2, seed: int = 0, pause: float = 0.003
) -> dict[str, Any]:
    """Run the stress for ``seconds``; returns the summary (``ok`` False on any violation)."""
    index = _index()
    base = np.random.default_rng(seed).standard_normal((BASE, DIM)).astype(np.float32)
    base_ids = index.add(base)
    logs: list[list[Op]] = [[] for _ in range(mutators)]
    stats = [Stats() for _ in range(mutators + searchers + savers)]
    stop = threading.Event()
    threads = []
    with tempfile.TemporaryDirectory() as tmp:
        jobs: list[tuple[Any, tuple[Any, ...]]] = []
        for t in range(mutators):  # thread 0 takes default ids, the others explicit ones
            jobs.append((_mutator, (index, t, t > 0, stop, logs[t], stats[t], seed + 1 + t, pause)))
        for s in range(searchers):
            jobs.append((_searcher, (index, stop, stats[mutators + s], seed + 100 + s)))
        umask = os.umask(0o022)
        os.umask(umask)
        for s in range(savers):
            jobs.append((_saver, (index, Path(tmp), stop, stats[mutators + searchers + s], 0o666 & ~umask)))

        def guarded(fn: Any, args: tuple[Any, ...], st: Stats) -> None:
            try:
                fn(*args)
            except BaseException:  # noqa: BLE001 - recorded and reported as a failure
                st.errors.append(traceback.format_exc(limit=4))
                stop.set()

        start = time.perf_counter()
        for (fn, args), st in zip(jobs, stats):
            threads.append(threading.Thread(target=guarded, args=(fn, args, st), daemon=True))
        for th in threads:
            th.start()
        stop.wait(seconds)
        stop.set()
        for th in threads:
            th.join(timeout=120)
        elapsed = time.perf_counter() - start
        leftovers = sorted(p.name for p in Path(tmp).iterdir() if p.name != "stress.tq")
    hung = sum(th.is_alive() for th in threads)

    # sequential replay of the logged mutations, thread by thread
    replay = _index()
    replay.add(base, ids=base_ids)
    for log in logs:
        for op in log:
            if op.kind == "add":
                replay.add(op.x, ids=op.ids)  # type: ignore[arg-type]
            else:
                replay.remove(op.ids)
    live_ids, replay_ids = np.sort(index.ids), np.sort(replay.ids)
    expected = len(base_ids) + sum(s.vectors_added - s.vectors_removed for s in stats[:mutators])
    same_ids = bool(np.array_equal(live_ids, replay_ids))
    same_vectors = same_ids and bool(np.array_equal(index.reconstruct(live_ids), replay.reconstruct(replay_ids)))
    errors = [e for s in stats for e in s.errors]
    summary = {
        "seconds": round(elapsed, 2), "replay_seconds": round(time.perf_counter() - start - elapsed, 2),
        "threads": {"mutators": mutators, "searchers": searchers, "savers": savers, "torch": torch.get_num_threads()},
        "adds": sum(s.adds for s in stats), "removes": sum(s.removes for s in stats),
        "vectors_added": sum(s.vectors_added for s in stats), "vectors_removed": sum(s.vectors_removed for s in stats),
        "searches": sum(s.searches for s in stats), "saves": sum(s.saves for s in stats),
        "final_vectors": len(index), "expected_vectors": expected, "unique_ids": int(len(np.unique(live_ids))),
        "same_ids_as_replay": same_ids, "same_vectors_as_replay": same_vectors,
        "hung_threads": hung, "temporary_files_left": leftovers, "errors": errors,
    }  # fmt: skip
    summary["ok"] = (
        not errors and not hung and not leftovers and same_ids and same_vectors and len(index) == expected == summary["unique_ids"]
    )
    return summary


def _machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the threads run (default 60)")
    parser.add_argument("--mutators", type=int, default=3, help="threads adding and removing (default 3)")
    parser.add_argument("--searchers", type=int, default=2, help="threads searching (default 2)")
    parser.add_argument("--savers", type=int, default=2, help="threads saving (one file) and re-loading (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--pause", type=float, default=0.003, help="seconds each mutator waits between mutations")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "stress_index.json",
                        help="JSON result file")  # fmt: skip
    args = parser.parse_args(argv)
    summary = run(args.seconds, args.mutators, args.searchers, args.savers, args.seed, args.pause)
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        if key != "errors":
            print(f"{key:<{width}}  {value}")
    for err in summary["errors"]:
        print(err, file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": _machine(), "args": {k: str(v) for k, v in vars(args).items()},
                                    "result": summary}, indent=2) + "\n")  # fmt: skip
    print(f"wrote {args.out}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
