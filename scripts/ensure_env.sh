#!/usr/bin/env bash
# Create (on first use) and reuse the project's virtual environment at .venv/.
# - keeps a torch the machine already has (a GPU user's CUDA build is seen through
#   --system-site-packages); installs the CPU build only when no torch is importable;
# - (re)installs grokedge with its test extras when pyproject.toml is newer than the last
#   install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python="${PYTHON:-python3}"
torch_pin="torch==2.13.0"
torch_index="${GROKEDGE_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"

if [ ! -x "$venv/bin/python" ]; then
  echo "grokedge: creating $venv" >&2
  "$python" -m venv --system-site-packages "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
fi
if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "grokedge: no torch found, installing the CPU build ($torch_pin)" >&2
  "$venv/bin/python" -m pip install --quiet --retries 1 --timeout 30 \
    --extra-index-url "$torch_index" "$torch_pin" >&2
fi
stamp="$venv/.grokedge-installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  echo "grokedge: installing grokedge and its test extras into $venv" >&2
  "$venv/bin/python" -m pip install --quiet -e "$root[test]" >&2
  touch "$stamp"
fi
