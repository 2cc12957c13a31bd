#!/usr/bin/env bash
# Fleet rollback propagation: three `kanaria run` replicas sharing a [fleet] through a real
# redis-server on loopback; a rollback posted to one replica, 20 times (each replica in
# turn), timed until the other two replicas' status shows it. Runs the fleet test that
# measures it (tests/fleet.rs, a_rollback_on_any_replica_reaches_every_replica) with the
# release build and writes its figure to bench/results/. Knob: BENCH_FLEET_PROFILE
# (`release`, the default, or `debug`).
set -euo pipefail
BENCH_DIR="$(cd "$(dirname "$0")" && pwd)"
RESULTS_DIR="${BENCH_RESULTS_DIR:-$BENCH_DIR/results}"
mkdir -p "$RESULTS_DIR"
command -v redis-server >/dev/null || { echo "bench/fleet.sh needs redis-server (make test-deps installs it)"; exit 1; }
PROFILE_FLAG=--release
[ "${BENCH_FLEET_PROFILE:-release}" = debug ] && PROFILE_FLAG=
OUT="$(mktemp /tmp/kanaria-fleet-bench.XXXXXX)"
(cd "$BENCH_DIR/.." && cargo test $PROFILE_FLAG --test fleet a_rollback_on_any_replica_reaches_every_replica -- --exact --nocapture) >"$OUT" 2>&1 || {
  cat "$OUT"; rm -f "$OUT"; exit 1; }
LINE="$(grep -m1 '^fleet rollback propagation' "$OUT")"
rm -f "$OUT"
STAMP="$(date -u +%Y%m%d-%H%M%S)"
{
  echo "# Fleet rollback propagation ($STAMP UTC, ${BENCH_FLEET_PROFILE:-release} build)"
  echo
  echo "- host: $(nproc) CPUs, load average at start: $(cut -d' ' -f1-3 /proc/loadavg); $(redis-server --version | awk '{print $1, $2, $3}')"
  echo "- $LINE"
} | tee "$RESULTS_DIR/fleet-$STAMP.md"
