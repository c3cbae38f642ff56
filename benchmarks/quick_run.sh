#!/usr/bin/env bash
# Run a quick-profile config on the GPU and pack its records, tables and log into $OUT.
#   bash benchmarks/quick_run.sh CONFIG
# For runs longer than one device call: start it with `setsid nohup ... &` and poll the log.
set -euo pipefail
config=${1:?config}
name=$(basename "$config" .yaml)
run=${RUN_DIR:-/tmp/$name}
out=${OUT:-results/bench}
mkdir -p "$out" "$run"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
start=$(date +%s)
python run_benchmark.py run "$config" --out "$run" --no-progress 2>&1 | tee "$run/console.log"
echo "wall seconds: $(( $(date +%s) - start ))" | tee -a "$run/console.log"
tar czf "$run.tgz" -C "$run" --exclude='*.safetensors' .
cp "$run.tgz" "$out/" 2>/dev/null || true
