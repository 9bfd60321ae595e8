#!/usr/bin/env bash
# Creates .venv (once) and installs guidedrl with its pinned dependencies.
# torch goes first, from the pinned CPU wheel; everything after it is constrained to that torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The code sandbox's jail is bubblewrap (docs/security.md); prlimit comes with util-linux.
if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then SUDO=""
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null && command -v apt-get >/dev/null 2>&1; then SUDO="sudo -n"
  else SUDO=none
  fi
  if [ "$SUDO" = none ] || ! { $SUDO apt-get install -y -q bubblewrap >/dev/null \
      || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q bubblewrap >/dev/null; }; }; then
    echo "error: the code sandbox needs bubblewrap (\`bwrap\`) and it could not be installed here" >&2
    echo "       (needs apt-get as root or passwordless sudo). Install it with your package manager" >&2
    echo "       (Debian/Ubuntu: bubblewrap, Fedora: bubblewrap, Arch: bubblewrap) and rerun." >&2
    exit 1
  fi
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.guidedrl-installed
want=$(cat pyproject.toml constraints.txt | sha1sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev,gguf]"
  echo "$want" > "$stamp"
fi
