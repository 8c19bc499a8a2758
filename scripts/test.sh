#!/usr/bin/env bash
# Test command: set up (.venv, see scripts/setup.sh), then run the suite (CPU; Triton kernels run
# under TRITON_INTERPRET=1). Options are passed to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
py="$(bash scripts/setup.sh | tail -n 1)"
echo "[test] running: $py -m pytest -q -p no:cacheprovider $*" >&2
exec "$py" -m pytest -q -p no:cacheprovider "$@"
