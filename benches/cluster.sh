#!/usr/bin/env bash
# How `arbor eval --coordinator` scales with the worker pool: the same comparison through a
# coordinator over 1 worker, then over W workers (one core each, RAYON_NUM_THREADS=1), timed, and
# the traces compared (the same seeds must give the same cells).
#
# Usage: benches/cluster.sh [W] [QUESTIONS] [BUDGET]     (defaults: 2 workers, 8 questions, 256)
# Needs a release build (cargo build --release). The questions are the first of the training
# split (never the development split, its last 500).
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-2}
Q=${2:-8}
BUDGET=${3:-256}
ARBOR=target/release/arbor
DATA=../shared/data/gsm8k/train.jsonl
TMP=$(mktemp -d)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; rm -rf "$TMP"' EXIT

# Starts `arbor ARGS…` in the background, waits for its "listening on ADDR" line, and sets ADDR.
start() {
    local log=$TMP/log.$RANDOM
    RAYON_NUM_THREADS=1 "$ARBOR" "$@" >/dev/null 2>"$log" &
    PIDS+=($!)
    for _ in $(seq 600); do
        ADDR=$(grep -m1 -oP 'listening on \K[0-9.:]+' "$log" || true)
        if [ -n "$ADDR" ]; then return; fi
        sleep 0.1
    done
    echo "no listening line from arbor $*" >&2; cat "$log" >&2; exit 1
}

run() { # run N OUT: one coordinator over N workers, the comparison through it; sets WALL
    local n=$1 out=$2 workers=()
    for _ in $(seq "$n"); do start worker --listen 127.0.0.1:0; workers+=("$ADDR"); done
    start serve --listen 127.0.0.1:0 --workers "$(IFS=,; echo "${workers[*]}")"
    local t0 t1
    t0=$(date +%s.%N)
    "$ARBOR" eval --coordinator "http://$ADDR" --dataset "$DATA" --limit "$Q" \
        --strategies beam,weighted-best-of-n --budgets "$BUDGET" --concurrency $((8 * n)) \
        --out "$out" >/dev/null 2>"$out.log"
    t1=$(date +%s.%N)
    kill "${PIDS[@]}" 2>/dev/null || true
    wait 2>/dev/null || true
    PIDS=()
    WALL=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b - a}')
}

run 1 "$TMP/one"
one=$WALL
run "$W" "$TMP/many"
many=$WALL
# The cells must agree: same answers and costs for the same seeds.
key() { python3 -c '
import json, sys
for l in open(sys.argv[1]):
    c = json.loads(l)
    print(c["index"], c["strategy"], c["budget"], c["answer"], c["costs"]["generated_tokens"])
' "$1" | sort; }
if diff <(key "$TMP/one/traces.jsonl") <(key "$TMP/many/traces.jsonl") >/dev/null; then same=yes; else same=NO; fi
cells=$(wc -l < "$TMP/one/traces.jsonl")
echo "| workers | wall | speed-up |"
echo "|---|---|---|"
echo "| 1 | ${one} s | 1.00x |"
echo "| $W | ${many} s | $(awk -v a="$one" -v b="$many" 'BEGIN{printf "%.2fx", a/b}') |"
echo "$cells cells ($Q questions x beam, weighted-best-of-n at $BUDGET tokens); traces equal: $same"
