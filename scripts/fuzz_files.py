"""Fuzz the file loaders at scale: N mutated index and codes files (default 100,000).

Same engine and acceptance rule as tests/test_fuzz_files.py (tests/_file_mutations.py): every
load raises TurboQuantError or returns data identical to the original; a re-checksummed header
or table edit may load only as a usable, self-consistent file.

    PYTHONPATH=. python scripts/fuzz_files.py [-n 100000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.append(str(REPO))

import _file_mutations as fm  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=100_000, help="mutations to try (default 100000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tally = fm.run(Path(tmp), args.n, args.seed,
                       progress=lambda i: print(f"  {i + 1} mutations", file=sys.stderr) if (i + 1) % 10_000 == 0 else None)
    elapsed = time.perf_counter() - start
    result = {k: v for k, v in vars(tally).items() if k != "failures"}
    result.update(mutations=args.n, seed=args.seed, seconds=round(elapsed, 1), bad_outcomes=len(tally.failures or []))
    print(json.dumps(result, indent=2))
    for failure in (tally.failures or [])[:20]:
        print(failure)
    return 0 if not tally.failures else 1


if __name__ == "__main__":
    sys.exit(main())
