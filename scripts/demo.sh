#!/usr/bin/env bash
# Main job: set up, then run SmolLM2-135M-Instruct with the TurboQuant KV cache and print memory/quality.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m turboquant.cli demo "$@"
