#!/usr/bin/env bash
# Parts of configs (`parts:` in a config; every quick config has them) in one GPU job, under a deadline:
#   bash benchmarks/quick_parts.sh OUTDIR CONFIG:PART [CONFIG:PART ...]
# e.g. bash benchmarks/quick_parts.sh $OUT configs/quick/cifar10_dir.yaml:dir
# Each part runs as `run CONFIG --part PART --out OUTDIR/<config name>-<part>`, on the original CIFAR-10
# or, where it is missing and the offline JPEG copy is there, on the copy (its tables say so). A part
# starts only if its `--plan` estimate times SLACK (default 1.2) fits in what is left of DEADLINE
# seconds (default 540); one that runs out of time is stopped (its finished cells are kept). Written to
# OUTDIR: parts.json (per part: the plan's estimate, the wall time, the exit status, skipped or not),
# <config name>-<part>.tar.gz (its records, checks, tables, report and run.log; not the checkpoints),
# and a log per part. Merge the parts' folders with `run_benchmark.py report FOLDER... --out DIR`.
# SET="--set KEY=VALUE ..." adds overrides to every part (the tests run toy sizes on a CPU so).
# On the GPU machine: carry [".gpu"], PYTHONPATH=$PWD/.gpu/site:$PWD, and the offline copy through
# PURIFYBENCH_CIFAR10_JPEG=$PWD/.gpu/data; pass the commit as PURIFYBENCH_GIT_COMMIT (no .git there).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
py=${PYTHON:-python}
[ $# -ge 2 ] || { echo "usage: quick_parts.sh OUTDIR CONFIG:PART [CONFIG:PART ...]" >&2; exit 2; }
out=$1; shift
deadline=${DEADLINE:-540} slack=${SLACK:-1.2}
read -r -a extra <<< "${SET:-}"
mkdir -p "$out"
copy_needed() {  # exit 3: CONFIG reads CIFAR-10, which is not here, and the offline copy is
  "$py" -c "import sys; from benchmark.experiment import load_config; from benchmark.registry import DATASETS as D
here = lambda name: D.metadata(name)['locate'](None, False)[1]
cifar = any(d.name == 'cifar10' for d in load_config(sys.argv[1]).datasets)
sys.exit(3 if cifar and not here('cifar10') and here('cifar10-jpeg') else 0)" "$1"
}
start=$SECONDS
entries=()
for item in "$@"; do
  config=${item%:*} part=${item##*:}
  if [ "$config" = "$item" ] || [ -z "$part" ]; then
    echo "quick_parts.sh: $item is not CONFIG:PART" >&2; exit 2
  fi
  offline=()
  copy_needed "$config"
  case $? in
    0) ;;
    3) offline=(--set datasets.cifar10.name=cifar10-jpeg)
       echo "-- the original CIFAR-10 is not here: $item runs on the offline JPEG copy" ;;
    *) echo "quick_parts.sh: cannot read $config" >&2; exit 2 ;;
  esac
  plan=$("$py" run_benchmark.py run "$config" --part "$part" "${offline[@]}" "${extra[@]}" --plan 2>&1) || {
    echo "$plan" >&2; exit 2; }
  name=$(sed -n 's/^plan: .* -> .*\/\([^/ ]*\) (profile.*/\1/p' <<< "$plan")
  estimate=$(sed -n 's/^total: about .* (\([0-9,.]*\) s) on one H100.*/\1/p' <<< "$plan" | tr -d ,)
  left=$((deadline - (SECONDS - start)))
  needs=$("$py" -c "import math; print(math.ceil($estimate * $slack))")
  if [ "$left" -lt "$needs" ]; then
    echo "** $name skipped: $left s left of the $deadline s deadline, its plan says $estimate s (x $slack)"
    entries+=("{\"config\": \"$config\", \"part\": \"$part\", \"plan_s\": $estimate, \"skipped\": true}")
    continue
  fi
  echo "== $name ($left s left, plan $estimate s)"
  t0=$SECONDS
  timeout --signal=INT --kill-after=10 "$left" "$py" run_benchmark.py run "$config" --part "$part" "${offline[@]}" \
    "${extra[@]}" --out "$out/$name" --no-progress 2>&1 | tee "$out/$name.log"
  rc=${PIPESTATUS[0]}
  entries+=("{\"config\": \"$config\", \"part\": \"$part\", \"plan_s\": $estimate, \"wall_s\": $((SECONDS - t0)), \"rc\": $rc}")
  [ "$rc" = 0 ] || echo "** $name exited with $rc (124/137: stopped at the deadline; see $out/$name.log)"
  (cd "$out" && tar czf "$name.tar.gz" --exclude=artifacts --exclude='*.safetensors' --exclude='*.pt' "$name") || true
done
{ echo "{\"device\": \"$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)\", "
  echo "\"commit\": \"${PURIFYBENCH_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || true)}\", \"deadline_s\": $deadline, \"parts\": ["
  (IFS=,; echo "${entries[*]}")
  echo "]}"; } > "$out/parts.json"
"$py" -m json.tool "$out/parts.json"
