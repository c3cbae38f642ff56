#!/usr/bin/env bash
# Train a PGD-AT ResNet-18 on the offline CIFAR-10 JPEG copy and report epoch time,
# clean and PGD-20 accuracy on the full test split. Usage (GPU):
#   bash benchmarks/target_training.sh [EPOCHS] [BATCH] [LR]
set -euo pipefail
epochs=${1:-15}; batch=${2:-256}; lr=${3:-0.2}
out=${OUT:-results/bench}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
python run_benchmark.py train --dataset cifar10-jpeg --arch resnet18 --method at \
  --epochs "$epochs" --batch-size "$batch" --lr "$lr" --n-eval 10000 --pgd-steps 20 \
  --device auto --no-progress 2>&1 | tee "$out/target_at_resnet18.log"
