#!/usr/bin/env bash
# The main job: a Dyck run with the default callbacks (any Hydra overrides may follow).
#   bash scripts/run.sh                      # task=dyck
#   bash scripts/run.sh task=modular seed=1
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/ensure_env.sh"
exec "$root/.venv/bin/python" -m grokedge.train task=dyck "$@"
