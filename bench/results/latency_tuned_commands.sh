#!/bin/bash
# Tuned latency benchmark sequence (one job at a time: 2 cores).
cd "$(dirname "$0")/../.."
D=${TUNE_DIR:-/tmp/fliqs-tvm-tune-bench}
mkdir -p $D

P=.venv/bin/python
run() { echo "=== $(date -u +%T) $*"; /usr/bin/time -f "wall %e s" $P bench/latency.py "$@"; echo "=== $(date -u +%T) rc=$?"; }
run --models resnet18 --configs fp32 --tune-trials 48 --tune-per-task 6 --tune-round 2 --tune-dir $D --out bench/results/latency_resnet18_tuned_fp32.json
run --models resnet18 --configs mixed --tune-trials 84 --tune-per-task 6 --tune-round 2 --tune-dir $D --out bench/results/latency_resnet18_tuned_mixed.json
run --models "" --layers --layer-tune-trials 4 --tune-dir $D --out bench/results/latency_layers.json
run --models cnn --tune-trials 48 --tune-per-task 4 --tune-round 2 --tune-dir $D --out bench/results/latency_cnn_tuned.json
run --models cnn --tune-trials 48 --tune-per-task 4 --tune-round 2 --tune-dir $D --out bench/results/latency_cnn_tuned_rerun.json
echo ALLDONE
