#!/usr/bin/env bash
# Idempotent set-up: creates .venv at the repo root with the CPU torch wheel first
# (an unpinned torch would pull a multi-GB CUDA build), then the project in editable mode.
# GPU users: create .venv with your own CUDA torch installed first, then run this script;
# FIPO_SKIP_TORCH=1 leaves the installed torch alone.
#
# The stamp records the set-up inputs *and* this checkout's path: a .venv copied from another
# checkout still imports that checkout's code (the editable install points there, and the
# scripts in .venv/bin start the other venv's python), so it is re-pointed here.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.fipo-setup-stamp"
inputs="$(cat "$root/setup.cfg" "$root/pyproject.toml" "$root/scripts/setup_venv.sh" | sha256sum | cut -d' ' -f1)"
want="$inputs $root"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

# Re-point a venv copied from another checkout: script shebangs and activate scripts name
# the venv they were made in; the first python shebang tells which one that was.
origin=""
for script in "$venv"/bin/*; do
  [ -f "$script" ] && [ ! -L "$script" ] || continue
  first="$(head -n 1 "$script")"
  case "$first" in
    "#!"*/bin/python*) origin="${first#\#!}"; origin="${origin%/bin/python*}"; break ;;
  esac
done
case "$origin" in */.venv) ;; *) origin="" ;; esac  # only another checkout's .venv
if [ -n "$origin" ] && [ "$origin" != "$venv" ]; then
  echo "set-up: $venv was made at $origin; re-pointing it here"
  for script in "$venv"/bin/*; do
    [ -f "$script" ] && [ ! -L "$script" ] || continue
    if head -n 1 "$script" | grep -q "^#!$origin/bin/python"; then
      sed -i "1s|^#!$origin/bin/|#!$venv/bin/|" "$script"
    fi
    case "$(basename "$script")" in
      activate*) sed -i "s|$origin|$venv|g" "$script" ;;
    esac
  done
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
