#!/usr/bin/env bash
# Every speed figure of issue 8 except the matrix run, in one command on a CUDA machine:
#   bash benchmarks/gpu_speed.sh            # about 7-10 minutes on one H100 (a PGD-AT ResNet-18 is
#                                           # trained first, about a minute, then cached)
# Near the device tool's 10-minute call limit, start it in the background and poll its log:
#   OUT=/tmp/speed setsid nohup bash benchmarks/gpu_speed.sh > /tmp/speed.log 2>&1 < /dev/null &
#   tail -n 5 /tmp/speed.log        # later calls; then copy /tmp/speed/*.log to $OUT
#   bash benchmarks/gpu_speed.sh --toy DIR  # the same steps at toy sizes on CIFAR-10 python batches in DIR
#                                           # (how the tests run it on a CPU)
# Logs go to $OUT (default results/bench); the last thing printed is the targets of every script.
# The quick Table 1 profile (target <= 25 min, training included) runs longer than one device call:
#   bash benchmarks/gpu_parallel.sh configs/quick/cifar10_table1.yaml    # returns at once; poll
#   python benchmarks/matrix_time.py /tmp/cifar10_table1                  # when it has finished
# The GPU machine has neither pyautoattack nor torchattacks: prepare with
#   ../shared/tools/gpu-prepare torchattacks      # then carry [".gpu"], PYTHONPATH=$PWD/.gpu/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
out=${OUT:-results/bench}
py=${PYTHON:-python}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$out/device.txt" || true
git rev-parse HEAD 2>/dev/null | tee -a "$out/device.txt" || echo "no git: name the commit by hand" | tee -a "$out/device.txt"
for module in torchattacks pyautoattack; do
  "$py" -c "import $module" 2>/dev/null || echo "** $module cannot be imported: its rows (and the ratio to it) will be missing" | tee -a "$out/missing.txt"
done
step() {  # step NAME COMMAND...: run it, keep its log, go on if it fails (the summary says so)
  local name=$1; shift
  echo "== $name: $*"
  if ! "$@" 2>&1 | tee "$out/$name.log"; then echo "** $name failed (see $out/$name.log)" | tee -a "$out/failed.txt"; fi
}
if [ "${1:-}" = "--toy" ]; then
  data=(--dataset cifar10 --root "${2:?--toy needs a folder with cifar-10-batches-py}")
  n_none=8 n_dir=4 steps=1 repeats=1 n_train=16 epochs=1 n_prof=4
else
  data=()
  n_none=10000 n_dir=2000 steps=20 repeats=2 n_train=50000 epochs=2 n_prof=512
fi
step throughput-none "$py" benchmarks/attack_throughput.py --n $n_none --steps $steps --repeats $repeats \
  --through none --compile "${data[@]}"
step throughput-dir "$py" benchmarks/attack_throughput.py --n $n_dir --steps $steps --repeats $repeats \
  --through dir "${data[@]}"
step training "$py" benchmarks/training_speed.py --n $n_train --epochs $epochs "${data[@]}"
step profile "$py" benchmarks/profile_step.py --n $n_prof --steps 5 "${data[@]}"
echo
echo "== targets"
for name in throughput-none training; do
  sed -n '/^Targets/,$p' "$out/$name.log" 2>/dev/null || true
done
[ -f "$out/failed.txt" ] && cat "$out/failed.txt" && exit 1 || true
