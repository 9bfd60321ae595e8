#!/usr/bin/env bash
# The embedded demo: installs into .venv if needed, then runs `guidedrl demo` offline on the CPU.
# Extra arguments go to `guidedrl demo` (e.g. --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/guidedrl demo "$@"
