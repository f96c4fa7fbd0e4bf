#!/usr/bin/env bash
# Idempotent set-up: creates .venv at the repo root with the CPU torch wheel first
# (an unpinned torch would pull a multi-GB CUDA build), then the project in editable mode.
# GPU users: create .venv with your own CUDA torch installed first, then run this script;
# FIPO_SKIP_TORCH=1 leaves the installed torch alone.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.fipo-setup-stamp"
want="$(cat "$root/setup.cfg" "$root/pyproject.toml" "$root/scripts/setup_venv.sh" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
if [ "${FIPO_SKIP_TORCH:-0}" != "1" ]; then
  "${pip[@]}" install "torch==2.13.0"
fi
"${pip[@]}" install -e "$root[dev]"
echo "$want" > "$stamp"
echo "set-up: $venv ready"
