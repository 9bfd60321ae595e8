#!/usr/bin/env bash
# The GPU measurements of docs/performance.md in one go (run from the repo root on a CUDA machine):
# GPU tests, the GPU job on both sides, and guidedrl's completion-length sweep. Logs and JSON go to
# ${OUT:-bench_out}; AUTOCAST=1 adds the GPU job with model.autocast=bfloat16 (guidedrl alone).
# Wheels in .whl (trl, datasets, pydantic, ...) are installed first when present.
set -o pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
t0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)" | tee -a "$OUT/gpu.txt"
timeout "${T_TESTS:-110}" python3 -m pytest tests/gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
echo "tests done at $(( $(date +%s) - t0 )) s"
timeout "${T_DIAG:-90}" python3 bench/diag_bf16.py 2>&1 | grep -v Warning | tee "$OUT/diag_bf16.log"
echo "bf16 diagnosis done at $(( $(date +%s) - t0 )) s"
timeout "${T_BENCH:-240}" python3 bench/bench_trl.py --job gpu --warmup 2 --steps 4 --json "$OUT/gpu.json" 2>&1 \
  | grep -v "^{'loss'" | tee "$OUT/gpu_bench.log"
echo "bench done at $(( $(date +%s) - t0 )) s"
for L in ${SWEEP:-128 512}; do
  timeout "${T_SWEEP:-55}" python3 bench/bench_trl.py --job gpu --sides guidedrl --completion-len "$L" --warmup 1 \
    --steps 3 --json "$OUT/sweep_$L.json" 2>&1 | tee "$OUT/sweep_$L.log"
  echo "sweep $L done at $(( $(date +%s) - t0 )) s"
done
if [ -n "${AUTOCAST:-}" ]; then  # mixed precision (float32 weights, trunk under bf16 autocast), guidedrl alone
  timeout "${T_AUTOCAST:-90}" python3 bench/bench_trl.py --job gpu --sides guidedrl --set model.autocast=bfloat16 \
    --warmup 1 --steps 3 --json "$OUT/gpu_autocast.json" 2>&1 | tee "$OUT/gpu_autocast.log"
  echo "autocast done at $(( $(date +%s) - t0 )) s"
fi
