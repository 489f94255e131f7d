#!/usr/bin/env bash
# The test suite (slow real runs included; add `-m "not slow"` for the quick part).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/ensure_env.sh"
cd "$root"
# Tests never talk to a W&B server; the user's own setting wins outside the tests.
export WANDB_MODE="${WANDB_MODE:-disabled}"
exec "$root/.venv/bin/python" -m pytest "$@"
