#!/usr/bin/env bash
# Instructions the scheduler (or, with ROLE=worker, each worker) executes per task (valgrind's callgrind: a
# repeatable count on a noisy machine). Runs a release scheduler under
# callgrind and two workers against the local RabbitMQ, submits RUNS runs
# of STEPS echo steps carrying 3 KiB of random base64 (about 4 KiB),
# PARALLEL submissions at a time, waits for them, then prints the total;
# run it with RUNS=0 for the fixed cost (start, idle, stop) and subtract.
# Needs: cargo build --release, RabbitMQ.
#   bash benches/scheduler-callgrind.sh                     # 20 runs of 100 steps: 2,000 tasks
#   RUNS=0 bash benches/scheduler-callgrind.sh              # the fixed cost
#   RUNS=1000 STEPS=1 bash benches/scheduler-callgrind.sh   # one-step runs: the cost per run
#   KEEP=/tmp/cg bash benches/scheduler-callgrind.sh        # keep the profile, for callgrind_annotate
#   ROLE=worker bash benches/scheduler-callgrind.sh         # count the two workers instead (one line each)
#   MAX_QUEUED=0 bash benches/scheduler-callgrind.sh        # the pool's max_queued (default 256; 0: no gate)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
runs="${RUNS:-20}"
steps="${STEPS:-100}"
parallel="${PARALLEL:-8}"
role="${ROLE:-scheduler}"
case "$role" in scheduler | worker) ;; *) echo "ROLE is scheduler or worker, not $role" >&2; exit 2 ;; esac
case "${MAX_QUEUED:-0}" in '' | *[!0-9]*) echo "MAX_QUEUED is a number, not ${MAX_QUEUED}" >&2; exit 2 ;; esac
work="$(mktemp -d)"
workers=()
# On exit: the workers, the files, and this namespace's queues (idle quorum
# queues left behind slow the broker down for later measurements).
cleanup() {
  kill "${workers[@]}" 2>/dev/null || true
  if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp "$work"/cg.*.out "$KEEP"/ 2>/dev/null || true; fi
  rm -rf "$work"
  if command -v rabbitmqctl >/dev/null; then
    rabbitmqctl list_queues -q name 2>/dev/null | grep "^callgrind-$$\." |
      while read -r queue; do rabbitmqctl delete_queue -q "$queue" </dev/null >/dev/null 2>&1 || true; done
  fi
}
trap cleanup EXIT
cp -r "$repo/config" "$work/config"
{
  printf 'params:\n  payload: "x"\nsteps:\n'
  for i in $(seq 0 $((steps - 1))); do printf '  - name: s%s\n    echo: "${payload}"\n' "$i"; done
} > "$work/config/workflows/bench.yaml"
if [ -n "${MAX_QUEUED:-}" ]; then printf '[pools.default]\nmax_queued = %s\n' "$MAX_QUEUED" > "$work/config/courier.toml"; fi
port=18181
export COURIER_CONFIG_DIR="$work/config" COURIER_NAMESPACE="callgrind-$$" COURIER_API_LISTEN="127.0.0.1:$port" RUST_LOG=warn
bin="${COURIER_BIN:-$repo/target/release/courier}"
# The process of ROLE runs under callgrind; each re-executes itself
# (sealed, or in its sandbox): follow it.
profiled() {
  if [ "$1" = "$role" ]; then
    exec valgrind --tool=callgrind --trace-children=yes --callgrind-out-file="$work/cg.%p.out" "${@:2}"
  else
    exec "${@:2}"
  fi
}
COURIER_DATA_DIR="$work/data" profiled scheduler "$bin" scheduler 2>"$work/scheduler.log" &
scheduler=$!
for i in 1 2; do
  COURIER_DATA_DIR="$work/w$i" profiled worker "$bin" worker --worker-id "cg-$i" --concurrency 64 >/dev/null 2>&1 &
  workers+=("$!")
done
for _ in $(seq 1 120); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 1; done
# Both workers consuming (under callgrind they start slowly).
for _ in $(seq 1 120); do
  consumers=$(rabbitmqctl list_queues -q name consumers 2>/dev/null | awk -v q="callgrind-$$.tasks.default" '$1 == q {print $2}')
  [ "$consumers" = 2 ] && break
  sleep 1
done
payload=$(head -c 3072 /dev/urandom | base64 -w0)
printf '{"workflow":"bench","params":{"payload":"%s"}}' "$payload" > "$work/run.json"
seq 1 "$runs" | xargs -r -P "$parallel" -I{} curl -sf -X POST -H 'content-type: application/json' \
  --data-binary "@$work/run.json" -o /dev/null "http://127.0.0.1:$port/api/runs"
while [ "$(curl -sf "http://127.0.0.1:$port/api/runs?status=running&limit=1")" != "[]" ]; do sleep 1; done
# Workers first: a profiled one writes its profile once it has stopped.
kill -TERM "${workers[@]}"; wait "${workers[@]}" || true
kill -TERM "$scheduler"; wait "$scheduler" || true
for f in "$work"/cg.*.out; do
  total=$(callgrind_annotate --auto=no "$f" 2>/dev/null | awk '/PROGRAM TOTALS/ {print $1}' || true)
  [ -n "$total" ] || continue # a short-lived helper process
  echo "$((runs * steps)) tasks ($runs runs): $total instructions in the $role"
  callgrind_annotate --auto=no --inclusive=yes "$f" 2>/dev/null | grep -E "Engine::(submit|apply)|frame::(encode|decode_with_info)|sqlite3_step|IoLoop<RK,C>::run" | head -8
done
