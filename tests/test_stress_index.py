"""Issue 11, concurrency: a short run of benchmarks/stress_index.py (threads adding, removing,
searching and saving one index at once; the result must equal a sequential replay of the logged
mutations). The script's default is 60 s; here 5 s."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "stress_index.py"


def test_concurrent_add_remove_search_save_equals_sequential_replay() -> None:
    spec = importlib.util.spec_from_file_location("stress_index", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["stress_index"] = module
    spec.loader.exec_module(module)
    summary = module.run(5.0, pause=0.02)  # ~5 mutations per thread per 0.1 s keeps the replay short
    assert summary["errors"] == [] and summary["hung_threads"] == 0
    assert summary["adds"] > 20 and summary["removes"] > 10 and summary["searches"] > 10 and summary["saves"] > 5
    assert summary["same_ids_as_replay"] and summary["same_vectors_as_replay"]
    assert summary["final_vectors"] == summary["expected_vectors"] == summary["unique_ids"]
    assert summary["temporary_files_left"] == []
    assert summary["ok"]
