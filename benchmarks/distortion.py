"""Distortion of TurboQuant beside the paper's theory (same as ``turboquant bench distortion``).

Measured MSE and inner-product error of the ``mse`` and ``prod`` variants for d ∈ {64, 128,
256, 1536} and bits 1–8 (plus 2.5 / 3.5) on random unit vectors and on the real MiniLM
embeddings in ``../shared/data``, next to the exact Lloyd-Max cost and the paper's bounds; the
bias of each estimator with a 95% CI; Hadamard vs Haar rotations on structured inputs
(one-hot, sparse, real) including d = 80, 96, 384. The logic lives in
:mod:`turboquant.distortion`; this script only sets the default outputs.

    python benchmarks/distortion.py            # full run (a few minutes on 2 cores)
    python benchmarks/distortion.py --quick    # small n (< 30 s)

Writes ``benchmarks/results/distortion.json`` and ``distortion.png`` (PNG needs matplotlib).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from turboquant.distortion import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--out" not in argv:
        argv = ["--out", str(ROOT / "benchmarks" / "results"), *argv]
    if "--data" not in argv:
        argv = ["--data", str(ROOT.parent / "shared" / "data"), *argv]
    raise SystemExit(main(argv))
