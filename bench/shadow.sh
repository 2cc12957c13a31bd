#!/usr/bin/env bash
# What a dark launch costs (issue 22): Kanaria with `[routes.shadow] share = 100` (every
# stable user's request copied to the canary after its answer, and compared) against the
# same config without it (`kanaria-nolog`, both without the access log), in the same run,
# rounds alternating:
#   - the load (wrk): requests per second and the users' latency, p50/p99 (load.sh);
#   - the CPU per user request: instructions (callgrind, every thread of the process, so
#     the copies' sending and comparing count too), system calls and task-clock
#     (instructions.sh; needs valgrind and perf, skipped without them).
# Prints both tables and writes them to bench/results/.
set -euo pipefail
cd "$(dirname "$0")"
BENCH_PROXIES="kanaria-nolog kanaria-shadow" ./load.sh
if command -v valgrind >/dev/null 2>&1 && command -v perf >/dev/null 2>&1; then
  BENCH_IR_PROXIES="kanaria-nolog kanaria-shadow" BENCH_IR_ROUNDS="${BENCH_IR_ROUNDS:-3}" \
    BENCH_IR_REQUESTS="${BENCH_IR_REQUESTS:-10000}" ./instructions.sh
else
  echo "shadow.sh: valgrind or perf missing: instructions per request skipped" >&2
fi
