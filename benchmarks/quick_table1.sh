#!/usr/bin/env bash
# Run the quick Table 1 profile (none row) on the GPU and pack its records and tables into $OUT.
#   bash benchmarks/quick_table1.sh [CONFIG]
set -euo pipefail
config=${1:-configs/quick/cifar10_table1.yaml}
run=${RUN_DIR:-/tmp/quick-run}
out=${OUT:-results/bench}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
start=$(date +%s)
python run_benchmark.py run "$config" --out "$run" --no-progress 2>&1 | tee "$out/quick_run.log"
echo "wall seconds: $(( $(date +%s) - start ))" | tee -a "$out/quick_run.log"
tar czf "$out/quick_run.tgz" -C "$run" --exclude=artifacts/*.safetensors --exclude='*.safetensors' .
