#!/usr/bin/env bash
# Start several quick-profile configs side by side on one GPU (each in its own process and run
# folder /tmp/<config name>, logs in /tmp/keep/<name>.log) and return at once; poll with
#   tail -n 3 /tmp/keep/*.log
# Each finished run leaves /tmp/<name>.tgz (records, tables, console log) and copies it to $OUT.
set -euo pipefail
mkdir -p /tmp/keep
for config in "$@"; do
  name=$(basename "$config" .yaml)
  setsid nohup bash -c "OUT=/tmp/keep bash benchmarks/quick_run.sh $config" > "/tmp/keep/$name.log" 2>&1 < /dev/null &
  echo "started $name (pid $!)"
done
