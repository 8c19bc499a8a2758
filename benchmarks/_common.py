"""What every benchmark script shares: machine info, timing, tables and result files.

Benchmarks are scripts (``python benchmarks/NAME.py``); Python puts this folder on ``sys.path``,
so ``from _common import ...`` needs no path manipulation, and ``turboquant`` is the installed
package.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SHARED_DATA = REPO.parent / "shared" / "data"


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser whose ``--help`` shows the script's docstring as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def run_with_package(code: str, args: list[str], lib: Path) -> str:
    """stdout of ``python -c code *args`` in a fresh process importing the ``turboquant`` package found in ``lib``."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(lib)}
    # cwd: not the checkout, whose turboquant would shadow PYTHONPATH (sys.path[0] of "-c" is the cwd)
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=True,
                          cwd=lib).stdout  # fmt: skip


def machine_info() -> dict[str, Any]:
    """CPU model, core count, thread counts, library versions, load average and the GPU (if any)."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    info: dict[str, Any] = {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_avg_1_5_15": [round(v, 2) for v in load],
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    if "transformers" in sys.modules:  # recorded by the scripts that load a model
        info["transformers"] = sys.modules["transformers"].__version__
    try:
        import faiss

        info["faiss"] = faiss.__version__
        info["faiss_threads"] = faiss.omp_get_max_threads()
    except ImportError:
        pass
    return info


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def log(*args: Any) -> None:
    """Print with a time stamp, flushed at once (long runs are followed through a log file)."""
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str], floatfmt: str = ".4g") -> str:
    """A plain fixed-width text table (floats formatted with ``floatfmt``)."""

    def cell(v: Any) -> str:
        return format(v, floatfmt) if isinstance(v, float) else str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_json(name: str, data: Any, folder: Path = RESULTS) -> Path:
    """Write ``data`` as indented JSON to ``folder/name`` (atomically) and return the path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


def out_folder(default: Path = RESULTS) -> Path:
    """Where results go: ``$OUT`` when set (the GPU machine collects files from there), else ``default``."""
    return Path(os.environ["OUT"]) if os.environ.get("OUT") else default


def save_figure(fig: Any, path: Path, dpi: int = 110) -> Path:
    """Write a matplotlib figure to ``path`` (folders created), close it and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def pyplot() -> Any:
    """matplotlib's pyplot with the Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
