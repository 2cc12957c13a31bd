#!/usr/bin/env bash
# `make bench`: the comparative scripts in order (load, bad canary, hot reload). Each prints
# its table and writes it to bench/results/ (then the fleet rollback propagation figure).
# BENCH_ONLY="load reload" runs a subset.
set -euo pipefail
cd "$(dirname "$0")"
for part in ${BENCH_ONLY:-load bad_canary reload fleet}; do
  ./"$part".sh
done
