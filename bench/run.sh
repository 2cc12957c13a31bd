#!/usr/bin/env bash
# `make bench`: the comparative scripts in order (load, bad canary, hot reload). Each prints
# its table and writes it to bench/results/. BENCH_ONLY="load reload" runs a subset.
set -euo pipefail
cd "$(dirname "$0")"
for part in ${BENCH_ONLY:-load bad_canary reload}; do
  ./"$part".sh
done
