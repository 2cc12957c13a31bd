#!/usr/bin/env bash
# `make bench`: the comparative scripts in order (load, memory per route, memory per held
# connection, bad canary, hot reload, fleet rollback propagation, the dark launch's cost).
# Each prints its table and writes it to bench/results/. BENCH_ONLY="load reload" runs a
# subset; BENCH_ONLY=instructions counts
# instructions and system calls per request (needs valgrind and perf; not in the default
# set: under valgrind it takes minutes).
set -euo pipefail
cd "$(dirname "$0")"
for part in ${BENCH_ONLY:-load memory held bad_canary reload fleet shadow}; do
  ./"$part".sh
done
