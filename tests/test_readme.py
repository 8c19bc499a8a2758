"""Issue 11: the README's examples run and print what the README shows.

* the API tour (a ```python block) runs as written and prints the value its comment claims;
* the vector-search Python block runs against the shared Brown embeddings;
* the index command-line block runs (``turboquant`` = ``python -m turboquant.cli``) and its
  output has the README's shape: as many queries and hits per query as the README's pasted
  output, and every pasted line matches the real one (up to a trailing "...").
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
README = (REPO / "README.md").read_text(encoding="utf-8")


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _block(lang: str, marker: str) -> str:
    (block,) = [b for b in _blocks(lang) if marker in b]
    return block


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_api_tour_runs_and_prints_what_it_claims(tmp_path: Path) -> None:
    code = _block("python", "TurboQuantMSE(dim=128")
    claimed = [m.group(1) for m in re.finditer(r"print\(.*?\)\s+# (\S+)", code)]
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert claimed and done.stdout.split() == claimed


def _needs_data() -> None:
    if not (DATA / "brown_minilm_base.npy").exists() or not (DATA / "brown_sentences_base.txt").exists():
        pytest.skip(f"shared data not found at {DATA}")


def test_vector_search_block_runs(tmp_path: Path) -> None:
    _needs_data()
    code = _block("python", "TurboQuantIndex(384").replace("../shared/data", str(DATA))
    code += "\nprint(scores.shape, ids.shape, len(index))\n"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[-2] == "(1000, 10) (1000, 10) 53992"
    assert (tmp_path / "brown.tq").is_file()


def _command_block() -> tuple[str, list[str]]:
    block = _block("bash", "turboquant index search")
    commands = [line for line in block.splitlines() if not line.startswith("#")]
    shown = [line[2:] for line in block.splitlines() if line.startswith("# ")]
    return "\n".join(commands), shown


def test_index_command_block_prints_what_the_readme_shows(tmp_path: Path) -> None:
    _needs_data()
    script, shown = _command_block()
    script = script.replace("D=../shared/data", f"D={DATA}")
    prelude = f'turboquant() {{ "{sys.executable}" -m turboquant.cli "$@"; }}\nset -e\n'
    done = subprocess.run(["bash", "-c", prelude + script], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    out = [line for line in done.stdout.splitlines() if line.startswith("query ") or re.match(r"\s+\d+\. id=", line)]
    assert '"vectors": 53992' in done.stdout  # the block's `index info` line
    queries = [i for i, line in enumerate(out) if line.startswith("query ")]
    shown_queries = [i for i, line in enumerate(shown) if line.startswith("query ")]
    limit = int(re.search(r"--limit (\d+)", script).group(1))  # type: ignore[union-attr]
    k = int(re.search(r"-k (\d+)", script).group(1))  # type: ignore[union-attr]
    assert len(queries) == limit and len(shown_queries) == limit, "README shows a different number of queries"
    hits_real = [b - a - 1 for a, b in zip(queries, [*queries[1:], len(out)])]
    hits_shown = [b - a - 1 for a, b in zip(shown_queries, [*shown_queries[1:], len(shown)])]
    assert hits_real == [k] * limit and hits_shown == hits_real, "README shows a different number of hits per query"
    for pasted, real in zip(shown, out):
        norm_p, norm_r = " ".join(pasted.split()), " ".join(real.split())
        if norm_p.endswith("..."):
            assert norm_r.startswith(norm_p[:-3].rstrip()), (pasted, real)
        else:
            assert norm_p == norm_r, (pasted, real)
    info = subprocess.run([sys.executable, "-m", "turboquant.cli", "index", "info", "brown.tq"], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert info.returncode == 0 and '"vectors": 53992' in info.stdout
