#!/usr/bin/env bash
# Main job: set up (.venv, see scripts/setup.sh), then run SmolLM2-135M-Instruct with the
# TurboQuant KV cache and print memory/quality. Options are passed to `turboquant demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
py="$(bash scripts/setup.sh | tail -n 1)"
echo "[demo] running: $py -m turboquant.cli demo $*" >&2
exec "$py" -m turboquant.cli demo "$@"
