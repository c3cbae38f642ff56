#!/usr/bin/env bash
# Every speed figure of the suite, in one short job on a CUDA machine, written as data:
#   bash benchmarks/gpu_speed.sh [--smoke] [OUTDIR]
# It stops itself within DEADLINE seconds (default 360; 25 of them kept back for stopping a step and
# collecting the figures): a step that would start with less time left than it needs is skipped,
# one that runs out of time is stopped, and both are said so in the log and in the JSON. Figures go to benchmarks/gpu/<YYYY-MM-DD>-<gpu-model>.json (a copy in
# OUTDIR, default results/bench): device, commit, torch, and `figures` (benchmarks/gpu_figures.py
# renders them into RESULTS.md). Logs of every step are kept in OUTDIR.
#   --smoke      first run the CUDA smoke matrix (configs/smoke/cuda.yaml, about 4 min, not counted in
#                DEADLINE; stopped after SMOKE_LIMIT seconds, default 300, its finished cells kept):
#                records `cuda_smoke_seconds`, and tars its records, tables and logs into
#                OUTDIR/smoke-cuda.tar.gz
#   --toy DIR    the same steps at toy sizes on CIFAR-10 python batches in DIR (how the tests run it
#                on a CPU)
# STEPS="name ..." runs only those steps (throughput-none training-dir throughput-dir aa-rand profile
# determinism exact-memory), for a job that measures what an earlier one did not.
# The GPU machine has neither pyautoattack nor torchattacks: prepare with
#   ../shared/tools/gpu-prepare torchattacks      # then carry [".gpu"], PYTHONPATH=$PWD/.gpu/site:$PWD
# The machine has no .git: pass the commit as PURIFYBENCH_GIT_COMMIT=$(git rev-parse HEAD).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
py=${PYTHON:-python}
smoke=0 toy=""
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) smoke=1; shift ;;
    --toy) toy=${2:?--toy needs a folder with cifar-10-batches-py}; shift 2 ;;
    -*) echo "gpu_speed.sh: unknown option $1 (allowed: --smoke, --toy DIR, OUTDIR)" >&2; exit 2 ;;
    *) break ;;
  esac
done
[ $# -le 1 ] || { echo "gpu_speed.sh: options go before OUTDIR (got: $*)" >&2; exit 2; }
out=${1:-${OUT:-results/bench}}
deadline=${DEADLINE:-360}
margin=25  # seconds kept back in the budget: a stopped step's 10 s grace, then collecting the figures
mkdir -p "$out"
rm -f "$out/failed.txt" "$out/skipped.txt" "$out/missing.txt" "$out"/*.json "$out"/*.log
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$out/device.txt" || true
for module in torchattacks pyautoattack; do
  "$py" -c "import $module" 2>/dev/null || echo "** $module cannot be imported: its rows (and the ratio to it) will be missing" | tee -a "$out/missing.txt"
done

if [ "$smoke" = 1 ]; then
  # The CUDA smoke reads the original CIFAR-10 (download: true); a machine without it or internet runs it on
  # the offline JPEG copy where that is present (its tables say so).
  offline=()
  "$py" -c "import sys; from benchmark.registry import DATASETS as D
sys.exit(0 if D.metadata('cifar10')['locate'](None, False)[1] or not D.metadata('cifar10-jpeg')['locate'](None, False)[1] else 3)"
  if [ $? = 3 ]; then
    offline=(--set datasets.cifar10.name=cifar10-jpeg)
    echo "-- the original CIFAR-10 is not here: the CUDA smoke runs on the offline JPEG copy (${offline[*]})"
  fi
  echo "== cuda-smoke: run configs/smoke/cuda.yaml"
  rm -rf "$out/smoke-cuda"  # from scratch: its time is the whole run's
  t0=$SECONDS
  timeout --signal=INT --kill-after=10 "${SMOKE_LIMIT:-300}" \
    "$py" run_benchmark.py run configs/smoke/cuda.yaml "${offline[@]}" --out "$out/smoke-cuda" --no-progress --keep-going 2>&1 | tee "$out/cuda-smoke.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 0 ]; then
    echo "{\"figures\": {\"cuda_smoke_seconds\": $((SECONDS - t0))}, \"conditions\": {\"cuda_smoke_seconds\": {\"config\": \"configs/smoke/cuda.yaml\", \"what\": \"whole run, data decode and training included\"}}}" > "$out/cuda-smoke.json"
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "** cuda-smoke stopped after ${SMOKE_LIMIT:-300} s, its finished cells kept (see $out/cuda-smoke.log)" | tee -a "$out/skipped.txt"
  else
    echo "** cuda-smoke failed (see $out/cuda-smoke.log: ERROR lines name each failure)" | tee -a "$out/failed.txt"
  fi
  (cd "$out" && tar czf smoke-cuda.tar.gz --exclude='*.safetensors' --exclude='*.pt' --exclude=checkpoints smoke-cuda) || true
fi

start=$SECONDS
step() {  # step NAME NEEDS_SECONDS COMMAND...: run it if NEEDS_SECONDS are left, stop it at the deadline
  local name=$1 needs=$2; shift 2
  if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then
    echo "-- $name not run (STEPS=$STEPS)"
    return
  fi
  local left=$((deadline - margin - (SECONDS - start)))
  if [ "$left" -lt "$needs" ] || [ "$left" -le 0 ]; then
    echo "** $name skipped: $(( left > 0 ? left : 0 )) s left of the $deadline s deadline, it needs about $needs s" | tee -a "$out/skipped.txt"
    return
  fi
  echo "== $name ($left s left): $*"
  timeout --signal=INT --kill-after=10 "$left" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "** $name stopped at the deadline (see $out/$name.log)" | tee -a "$out/skipped.txt"
  elif [ "$rc" != 0 ]; then
    echo "** $name failed (see $out/$name.log)" | tee -a "$out/failed.txt"
  fi
}
if [ -n "$toy" ]; then
  data=(--dataset cifar10 --root "$toy")
  n_none=8 n_dir=4 steps=1 repeats=1 n_dir_train=16 epochs=2 n_prof=4 n_det=16
  need_none=1 need_dir_train=1 need_dir=1 need_prof=1 need_det=1 need_mem=1
  aa=(--n 2 --iterations 2 --eot 2 --draws 2) need_aa=1
  memory=(configs/smoke/default.yaml --rows ME-Net --batch 4)
else
  data=()
  # DIR's epochs are timed on 16,384 images and scaled to 50,000 (epoch time is linear in the images).
  # Measured on one H200 (2026-11-27): throughput-none 152 s (its model's training included), training-dir 71 s
  n_none=10000 n_dir=2000 steps=20 repeats=2 n_dir_train=16384 epochs=2 n_prof=512 n_det=16384
  need_none=150 need_dir_train=75 need_dir=90 need_prof=40 need_det=60 need_mem=120
  # AutoAttack-rand on 100 images behind DIR, native and pyautoattack backends (derived: DIR's pass at 95 us
  # per image, 2 x 100 x 20 passes, about 40 s natively; pyautoattack's sequential EOT slower)
  aa=(--n 100) need_aa=150
  memory=(configs/smoke/cuda.yaml configs/quick/cifar10_table3.yaml --timeout 120)
fi
# The throughput step trains its PGD-AT ResNet-18 on all training images first: its epochs give at_epoch_seconds.
step throughput-none $need_none "$py" benchmarks/attack_throughput.py --n $n_none --steps $steps --repeats $repeats \
  --through none --compile --json "$out/throughput-none.json" "${data[@]}"
step training-dir $need_dir_train "$py" benchmarks/training_speed.py --skip-at --n $n_dir_train --epochs $epochs \
  --json "$out/training-dir.json" "${data[@]}"
step throughput-dir $need_dir "$py" benchmarks/attack_throughput.py --n $n_dir --steps $steps --repeats $repeats \
  --through dir --json "$out/throughput-dir.json" "${data[@]}"
step aa-rand $need_aa "$py" benchmarks/aa_rand_speed.py "${aa[@]}" --json "$out/aa-rand.json" "${data[@]}"
step profile $need_prof "$py" benchmarks/profile_step.py --n $n_prof --steps 5 "${data[@]}"
# Deterministic target training: two deterministic trainings bit-identical, and its cost per epoch.
step determinism $need_det "$py" benchmarks/determinism.py --n $n_det --epochs 3 --json "$out/determinism.json" \
  "${data[@]}"
# Peak memory of one input gradient through each exact-gradient row, BPDA and exact.
step exact-memory $need_mem "$py" benchmarks/exact_memory.py "${memory[@]}" --json "$out/exact-memory.json"
echo
echo "== figures"
"$py" benchmarks/gpu_figures.py collect "$out" ${toy:+--into "$out"} || echo "** collecting the figures failed" | tee -a "$out/failed.txt"
echo "== targets"
for name in throughput-none training-dir; do
  sed -n '/^Targets/,$p' "$out/$name.log" 2>/dev/null || true
done
[ -f "$out/skipped.txt" ] && cat "$out/skipped.txt"
[ -f "$out/failed.txt" ] && cat "$out/failed.txt" && exit 1
exit 0
